//! A silver table's transformation as polars operations: typed columns -> filter ->
//! expectations -> de-duplication -> join; or the table's SQL. Pure: frames in, frames out.

use std::collections::BTreeMap;

use medallion_spec::{
    ColumnSpec, ColumnType, ExpectationAction, JoinHow, Keep, Layer, SilverSpec, TableRef,
};
use medallion_stage::{ExpectationCount, TaskError};
use polars::prelude::*;

use crate::buckets::Spill;

/// Column of quarantined rows naming the expectations each row failed.
pub const FAILED_EXPECTATIONS: &str = "_failed_expectations";

/// The outcome of refining one table.
pub struct Refined {
    pub silver: DataFrame,
    /// Rows removed by `quarantine` expectations, with [`FAILED_EXPECTATIONS`].
    pub quarantine: Option<DataFrame>,
    pub expectations: Vec<ExpectationCount>,
}

fn invalid(table: &str, what: &str, e: impl std::fmt::Display) -> TaskError {
    TaskError::Invalid(format!("silver.{table}: {what}: {e}"))
}

fn parse_expr(table: &str, what: &str, sql: &str) -> Result<Expr, TaskError> {
    polars::sql::sql_expr(sql).map_err(|e| invalid(table, what, e))
}

pub fn polars_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::String => DataType::String,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Date => DataType::Date,
        ColumnType::Timestamp => DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC)),
        ColumnType::Decimal { precision, scale } => {
            DataType::Decimal(precision as usize, scale as usize)
        }
    }
}

fn column_expr(table: &str, i: usize, col: &ColumnSpec, input: &Schema) -> Result<Expr, TaskError> {
    // The input column taken as is (renamed by `from`), unless the column is computed.
    let source = col
        .expr
        .is_none()
        .then(|| col.from.as_deref().unwrap_or(&col.name));
    let base = match (&col.expr, source) {
        (Some(sql), _) => parse_expr(table, &format!("columns[{i}].expr"), sql)?,
        (None, name) => polars::prelude::col(name.unwrap_or(&col.name)),
    };
    let input_type = source.and_then(|name| input.get(name).cloned());
    let from_string = input_type.as_ref() == Some(&DataType::String);
    // A declared format parses text; an input of another type would be cast, not parsed.
    if let (Some(format), Some(name), Some(dt)) = (&col.format, source, &input_type)
        && *dt != DataType::String
    {
        return Err(TaskError::Invalid(format!(
            "{table}: columns[{i}].format: `{format}` parses text, but input column {name} is {dt}"
        )));
    }
    // With a format, a computed column is parsed too (its expression must give text).
    let parse = from_string || col.format.is_some();
    // Strict: a value that does not convert fails the task, naming the column and values.
    // A declared format is parsed by polars' fixed-format parser, several times faster than
    // the per-value parse of an inferred one. No parse cache: polars' holds √rows values, so a
    // column with more distinct dates than that (TPC-H's 2,526 in a 256k-row chunk) misses on
    // most rows, and a lookup costs more than the fixed-format parse it would save.
    let options = StrptimeOptions {
        format: col.format.as_deref().map(Into::into),
        strict: true,
        exact: true,
        cache: false,
        ..Default::default()
    };
    let typed = match col.data_type {
        // Text dates and times are parsed, not cast (casting strings to dates is deprecated in polars).
        Some(ColumnType::Date) if parse => base.str().to_date(options),
        Some(ColumnType::Timestamp) if parse => base.str().to_datetime(
            Some(TimeUnit::Microseconds),
            Some(TimeZone::UTC),
            options,
            lit("raise"),
        ),
        Some(t) => base.strict_cast(polars_type(t)),
        None => base,
    };
    Ok(typed.alias(col.name.as_str()))
}

/// The row-by-row part of a silver definition: typed columns, filter and expectations. It
/// gives the same result on a whole table as on each of its chunks in turn (see
/// [`RowStage::chunkable`]), so the refiner runs it on its input as the input streams in and
/// never holds the raw (string) table whole.
pub struct RowStage {
    table: String,
    columns: Option<Vec<Expr>>,
    filter: Option<Expr>,
    expectations: Vec<(medallion_spec::ExpectationSpec, Expr)>,
}

/// What the row stage kept, quarantined and counted so far.
#[derive(Default)]
pub struct RowOutput {
    kept: Kept,
    quarantine: Vec<DataFrame>,
    counts: Vec<ExpectationCount>,
    /// The first rows that failed a `fail` expectation, by expectation index.
    fail_samples: BTreeMap<usize, String>,
}

/// The rows the row stage kept: in memory, or spilled into hash buckets.
pub enum Kept {
    Frames(Vec<DataFrame>),
    Spilled(Spill),
}

impl Default for Kept {
    fn default() -> Self {
        Kept::Frames(Vec::new())
    }
}

impl RowStage {
    /// Prepares the stage for input frames of `input_schema`.
    pub fn new(spec: &SilverSpec, input_schema: &Schema) -> Result<Self, TaskError> {
        let t = spec.name.as_str();
        let columns = match &spec.columns {
            Some(cols) => Some(
                cols.iter()
                    .enumerate()
                    .map(|(i, c)| column_expr(t, i, c, input_schema))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let filter = match &spec.filter {
            Some(f) => Some(parse_expr(t, "filter", f)?),
            None => None,
        };
        let expectations = spec
            .expectations
            .iter()
            .enumerate()
            .map(|(i, e)| {
                parse_expr(t, &format!("expectations[{i}].expr"), &e.expr).map(|x| (e.clone(), x))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RowStage {
            table: spec.name.clone(),
            columns,
            filter,
            expectations,
        })
    }

    /// Whether every expression of the stage is row-local, so that chunk by chunk equals whole.
    pub fn chunkable(spec: &SilverSpec) -> bool {
        let exprs = spec
            .columns
            .iter()
            .flatten()
            .filter_map(|c| c.expr.as_deref())
            .chain(spec.filter.as_deref())
            .chain(spec.expectations.iter().map(|e| e.expr.as_str()));
        spec.sql.is_none() && exprs.into_iter().all(medallion_spec::is_row_local)
    }

    /// Runs the stage on one chunk of input (or the whole input), adding to `out`. Run it at
    /// least once, on an empty frame if there is no input, so the output has its columns.
    pub fn apply(&self, input: DataFrame, out: &mut RowOutput) -> Result<(), TaskError> {
        let t = self.table.as_str();
        let mut lf = input.lazy();
        if let Some(exprs) = &self.columns {
            lf = lf.select(exprs.clone());
        }
        if let Some(filter) = &self.filter {
            lf = lf.filter(filter.clone());
        }
        let df = lf.collect().map_err(|e| invalid(t, "columns", e))?;
        if self.expectations.is_empty() {
            return out.keep(t, df);
        }
        self.check(df, out)
    }

    /// Evaluates every expectation once per row; a null result counts as a failure.
    fn check(&self, df: DataFrame, out: &mut RowOutput) -> Result<(), TaskError> {
        let t = self.table.as_str();
        let checked = df.height() as u64;
        let flag = |i: usize| format!("__expect_{i}");
        let flags: Vec<Expr> = self
            .expectations
            .iter()
            .enumerate()
            .map(|(i, (_, expr))| expr.clone().fill_null(lit(false)).alias(flag(i).as_str()))
            .collect();
        let columns = df_columns(&df);
        let flagged = df
            .lazy()
            .with_columns(flags)
            .collect()
            .map_err(|e| invalid(t, "expectations", e))?;
        if out.counts.is_empty() {
            out.counts = self
                .expectations
                .iter()
                .map(|(e, _)| ExpectationCount {
                    name: e.name.clone(),
                    action: e.action,
                    failed_rows: 0,
                    checked_rows: 0,
                })
                .collect();
        }
        for (i, (e, _)) in self.expectations.iter().enumerate() {
            let passed = flagged
                .column(&flag(i))
                .and_then(|c| c.bool().map(|b| b.sum().unwrap_or(0) as u64))
                .map_err(|err| {
                    invalid(
                        t,
                        &format!("expectations[{i}].expr `{}` must be boolean", e.expr),
                        err,
                    )
                })?;
            let failed = checked - passed;
            out.counts[i].failed_rows += failed;
            out.counts[i].checked_rows += checked;
            if e.action == ExpectationAction::Fail
                && failed > 0
                && !out.fail_samples.contains_key(&i)
            {
                let sample = flagged
                    .clone()
                    .lazy()
                    .filter(col(flag(i).as_str()).not())
                    .limit(3)
                    .select(columns.iter().map(|c| col(c.as_str())).collect::<Vec<_>>())
                    .collect()
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                out.fail_samples.insert(i, sample);
            }
        }
        if !out.fail_samples.is_empty() {
            return Ok(()); // the task fails in `finish`; keep counting, skip the rows
        }
        let all_true = |action: ExpectationAction| -> Expr {
            self.expectations
                .iter()
                .enumerate()
                .filter(|(_, (e, _))| e.action == action)
                .map(|(i, _)| col(flag(i).as_str()))
                .reduce(|a, b| a.and(b))
                .unwrap_or(lit(true))
        };
        let keep = all_true(ExpectationAction::Drop).and(all_true(ExpectationAction::Quarantine));
        let quarantines = self
            .expectations
            .iter()
            .any(|(e, _)| e.action == ExpectationAction::Quarantine);
        if quarantines {
            let names: Vec<Expr> = self
                .expectations
                .iter()
                .enumerate()
                .map(|(i, (e, _))| {
                    when(col(flag(i).as_str()).not())
                        .then(lit(e.name.as_str()))
                        .otherwise(lit(NULL))
                })
                .collect();
            let mut select: Vec<Expr> = columns.iter().map(|c| col(c.as_str())).collect();
            select.push(concat_str(names, ",", true).alias(FAILED_EXPECTATIONS));
            let q = flagged
                .clone()
                .lazy()
                .filter(all_true(ExpectationAction::Quarantine).not())
                .select(select)
                .collect()
                .map_err(|e| invalid(t, "quarantine", e))?;
            out.quarantine.push(q);
        }
        let kept = flagged
            .lazy()
            .filter(keep)
            .select(columns.iter().map(|c| col(c.as_str())).collect::<Vec<_>>())
            .collect()
            .map_err(|e| invalid(t, "expectations", e))?;
        out.keep(t, kept)
    }
}

/// The row stage's output once every chunk passed: the task goes on to write it.
pub struct Staged {
    pub kept: Kept,
    /// Rows removed by `quarantine` expectations, with [`FAILED_EXPECTATIONS`].
    pub quarantine: Option<DataFrame>,
    pub expectations: Vec<ExpectationCount>,
}

impl RowOutput {
    /// An output whose kept rows go into hash buckets on disk instead of memory.
    pub fn spilling(spill: Spill) -> RowOutput {
        RowOutput {
            kept: Kept::Spilled(spill),
            ..RowOutput::default()
        }
    }

    /// Rows kept so far.
    pub fn rows(&self) -> u64 {
        match &self.kept {
            Kept::Frames(frames) => frames.iter().map(|f| f.height() as u64).sum(),
            Kept::Spilled(spill) => spill.rows(),
        }
    }

    fn keep(&mut self, table: &str, df: DataFrame) -> Result<(), TaskError> {
        match &mut self.kept {
            Kept::Frames(frames) => frames.push(df),
            Kept::Spilled(spill) => spill
                .push(&df)
                .map_err(|e| TaskError::Internal(format!("silver.{table}: {e}")))?,
        }
        Ok(())
    }

    /// Fails the task when a `fail` expectation failed anywhere; otherwise the kept rows, the
    /// quarantined rows as one frame, and the expectation counts.
    pub fn checked(self, spec: &SilverSpec) -> Result<Staged, TaskError> {
        let t = spec.name.as_str();
        if let Some((&i, sample)) = self.fail_samples.iter().next() {
            let (e, count) = (&spec.expectations[i], &self.counts[i]);
            return Err(TaskError::ExpectationFailed(format!(
                "silver.{t}: expectation `{}` ({}) failed for {} of {} rows; nothing was committed. First failing rows:\n{sample}",
                e.name, e.expr, count.failed_rows, count.checked_rows
            )));
        }
        Ok(Staged {
            kept: self.kept,
            quarantine: concat(t, self.quarantine)?,
            expectations: self.counts,
        })
    }
}

/// Frames of one schema stacked into one; `None` for no frames.
fn concat(table: &str, frames: Vec<DataFrame>) -> Result<Option<DataFrame>, TaskError> {
    let mut frames = frames.into_iter();
    let Some(mut first) = frames.next() else {
        return Ok(None);
    };
    for f in frames {
        first
            .vstack_mut_owned(f)
            .map_err(|e| invalid(table, "columns", e))?;
    }
    Ok(Some(first))
}

/// Refines `spec` from its input frames (keyed by table), whole.
pub fn refine(
    spec: &SilverSpec,
    mut inputs: BTreeMap<TableRef, DataFrame>,
) -> Result<Refined, TaskError> {
    let t = spec.name.as_str();
    if let Some(sql) = &spec.sql {
        let mut ctx = polars::sql::SQLContext::new();
        // Plain names in silver SQL mean the bronze table of that name, else the silver one:
        // bronze is registered last so it wins.
        let mut tables: Vec<_> = inputs.into_iter().collect();
        tables.sort_by_key(|(table, _)| table.layer == Layer::Bronze);
        for (table, df) in tables {
            ctx.register(&table.name, df.lazy());
        }
        let silver = ctx
            .execute(sql)
            .and_then(|lf| lf.collect())
            .map_err(|e| invalid(t, "sql", e))?;
        return Ok(Refined {
            silver,
            quarantine: None,
            expectations: Vec::new(),
        });
    }
    let from = from_table(spec)?;
    let joined_with_itself = spec.join.as_ref().is_some_and(|j| &j.with == from);
    let input = if joined_with_itself {
        inputs.get(from).cloned()
    } else {
        inputs.remove(from)
    }
    .ok_or_else(|| TaskError::Internal(format!("silver.{t}: input {from} was not read")))?;
    let stage = RowStage::new(spec, &input.schema())?;
    let mut out = RowOutput::default();
    stage.apply(input, &mut out)?;
    finish(spec, out, &inputs)
}

/// The table a declarative silver definition reads row by row.
pub fn from_table(spec: &SilverSpec) -> Result<&TableRef, TaskError> {
    spec.from
        .as_ref()
        .ok_or_else(|| invalid(&spec.name, "from", "missing"))
}

/// The whole-table part of a declarative silver definition, after the row stage: de-duplication
/// and the join with `others` (the inputs other than `from`).
pub fn finish(
    spec: &SilverSpec,
    rows: RowOutput,
    others: &BTreeMap<TableRef, DataFrame>,
) -> Result<Refined, TaskError> {
    let t = spec.name.as_str();
    let staged = rows.checked(spec)?;
    let kept = match staged.kept {
        Kept::Frames(frames) => concat(t, frames)?.unwrap_or_default(),
        Kept::Spilled(_) => {
            return Err(TaskError::Internal(format!(
                "silver.{t}: rows spilled into buckets are refined bucket by bucket"
            )));
        }
    };
    let joined = spec.join.as_ref().and_then(|j| others.get(&j.with));
    Ok(Refined {
        silver: dedupe_and_join(spec, kept, joined)?,
        quarantine: staged.quarantine,
        expectations: staged.expectations,
    })
}

/// De-duplicates `df` (the whole table's rows after the row stage, or one bucket of them) and
/// joins it with `joined`, the table `join.with` (whole, or the same bucket of it).
pub fn dedupe_and_join(
    spec: &SilverSpec,
    mut df: DataFrame,
    joined: Option<&DataFrame>,
) -> Result<DataFrame, TaskError> {
    let t = spec.name.as_str();
    if let Some(dedupe) = &spec.dedupe
        && let Some(order) = &dedupe.order_by
    {
        df = keep_by_order(df, &dedupe.keys, order, dedupe.keep)
            .map_err(|e| invalid(t, "dedupe", e))?;
    }
    let mut lf = df.lazy();
    if let Some(dedupe) = &spec.dedupe
        && dedupe.order_by.is_none()
    {
        // Without `order_by`, first/last follow the input order; the output order itself does
        // not matter for a table, so polars need not maintain it (much faster).
        let keys: Vec<Expr> = dedupe.keys.iter().map(|k| col(k.as_str())).collect();
        lf = lf.unique_generic(
            Some(keys),
            match dedupe.keep {
                Keep::First => UniqueKeepStrategy::First,
                Keep::Last => UniqueKeepStrategy::Last,
            },
        );
    }
    if let Some(join) = &spec.join {
        let other = joined.ok_or_else(|| {
            TaskError::Internal(format!("silver.{t}: input {} was not read", join.with))
        })?;
        let right_keys: Vec<&str> = join.on.iter().map(|k| k.right.as_str()).collect();
        let taken: Vec<String> = match &join.columns {
            Some(cols) => cols.clone(),
            None => other
                .get_column_names()
                .iter()
                .map(|c| c.to_string())
                .filter(|c| !right_keys.contains(&c.as_str()))
                .collect(),
        };
        let mut right_cols: Vec<Expr> = right_keys.iter().map(|k| col(*k)).collect();
        right_cols.extend(
            taken
                .iter()
                .filter(|c| !right_keys.contains(&c.as_str()))
                .map(|c| col(c.as_str())),
        );
        let right = other.clone().lazy().select(right_cols);
        let left_on: Vec<Expr> = join.on.iter().map(|k| col(k.left.as_str())).collect();
        let right_on: Vec<Expr> = join.on.iter().map(|k| col(k.right.as_str())).collect();
        let how = match join.how {
            JoinHow::Inner => JoinType::Inner,
            JoinHow::Left => JoinType::Left,
        };
        // The left side's columns after the row stage, in order; the join keeps those and
        // what was taken from the right (the right keys equal the left keys after the join).
        let mut keep_cols: Vec<Expr> = lf
            .collect_schema()
            .map_err(|e| invalid(t, "join", e))?
            .iter_names()
            .map(|c| col(c.as_str()))
            .collect();
        lf = lf.join(
            right,
            left_on,
            right_on,
            JoinArgs::new(how).with_coalesce(JoinCoalesce::CoalesceColumns),
        );
        keep_cols.extend(taken.iter().map(|c| col(c.as_str())));
        lf = lf.select(keep_cols);
    }
    lf.collect().map_err(|e| invalid(t, "dedupe/join", e))
}

/// Keeps, per key, the row that sorts first (`first`) or last (`last`) by `order`, ties in
/// input order. The sort runs on a narrow frame (keys, order, row number) to find the winning
/// rows, which are then gathered once: the table's other columns are never sorted or copied
/// twice.
fn keep_by_order(
    df: DataFrame,
    keys: &[String],
    order: &str,
    keep: Keep,
) -> PolarsResult<DataFrame> {
    const ROW: &str = "__medallion_row";
    let mut narrow: Vec<Expr> = keys.iter().map(|k| col(k.as_str())).collect();
    narrow.push(col(order));
    let winners = df
        .clone()
        .lazy()
        .select(narrow)
        .with_row_index(ROW, None)
        .sort(
            [order],
            SortMultipleOptions::default().with_maintain_order(true),
        )
        .unique_generic(
            Some(keys.iter().map(|k| col(k.as_str())).collect()),
            match keep {
                Keep::First => UniqueKeepStrategy::First,
                Keep::Last => UniqueKeepStrategy::Last,
            },
        )
        .select([col(ROW)])
        .collect()?;
    // Gathering in row order keeps the table's order and reads memory in sequence.
    let rows = winners.column(ROW)?.idx()?.sort(false);
    df.take(&rows)
}

/// The data columns of a frame that also carries expectation flags.
fn df_columns(df: &DataFrame) -> Vec<String> {
    df.get_column_names()
        .iter()
        .map(|c| c.to_string())
        .filter(|c| !c.starts_with("__expect_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_on_an_input_that_is_not_text_is_refused() {
        let pipeline = medallion_spec::Pipeline::parse(
            r#"
name: p
sources:
  - { name: s, format: parquet, path: s.parquet, columns: [id, day] }
silver:
  - name: t
    from: bronze.s
    columns:
      - { name: id, type: int64 }
      - { name: day, type: date, format: "%Y%m%d" }
"#,
        )
        .expect("valid spec");
        let spec = pipeline.silver("t").expect("silver.t");
        let typed = Schema::from_iter([
            Field::new("id".into(), DataType::Int64),
            Field::new("day".into(), DataType::Int64),
        ]);
        let Err(TaskError::Invalid(message)) = RowStage::new(spec, &typed) else {
            panic!("a format over an integer column must be refused");
        };
        assert!(message.contains("columns[1].format"), "{message}");
        assert!(message.contains("input column day is i64"), "{message}");
        let text = Schema::from_iter([
            Field::new("id".into(), DataType::String),
            Field::new("day".into(), DataType::String),
        ]);
        assert!(RowStage::new(spec, &text).is_ok());
    }
}
