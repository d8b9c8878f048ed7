//! A silver table's transformation as polars operations: typed columns -> filter ->
//! expectations -> de-duplication -> join; or the table's SQL. Pure: frames in, frames out.

use std::collections::BTreeMap;

use medallion_spec::{
    ColumnSpec, ColumnType, ExpectationAction, JoinHow, Keep, Layer, SilverSpec, TableRef,
};
use medallion_stage::{ExpectationCount, TaskError};
use polars::prelude::*;

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

fn column_expr(
    table: &str,
    i: usize,
    col: &ColumnSpec,
    input: &DataFrame,
) -> Result<Expr, TaskError> {
    // The input column taken as is (renamed by `from`), unless the column is computed.
    let source = col
        .expr
        .is_none()
        .then(|| col.from.as_deref().unwrap_or(&col.name));
    let base = match (&col.expr, source) {
        (Some(sql), _) => parse_expr(table, &format!("columns[{i}].expr"), sql)?,
        (None, name) => polars::prelude::col(name.unwrap_or(&col.name)),
    };
    let from_string = source
        .and_then(|name| input.schema().get(name).cloned())
        .is_some_and(|dt| dt == DataType::String);
    // Strict: a value that does not convert fails the task, naming the column and values.
    let options = StrptimeOptions {
        strict: true,
        exact: true,
        cache: true,
        ..Default::default()
    };
    let typed = match col.data_type {
        // Text dates and times are parsed, not cast (casting strings to dates is deprecated in polars).
        Some(ColumnType::Date) if from_string => base.str().to_date(options),
        Some(ColumnType::Timestamp) if from_string => base.str().to_datetime(
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

/// Refines `spec` from its input frames (keyed by table).
///
/// The inputs are consumed: an input's raw (string) columns are freed as soon as they are typed.
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
    let from = spec
        .from
        .as_ref()
        .ok_or_else(|| invalid(t, "from", "missing"))?;
    let joined_with_itself = spec.join.as_ref().is_some_and(|j| &j.with == from);
    let input = if joined_with_itself {
        inputs.get(from).cloned()
    } else {
        inputs.remove(from)
    }
    .ok_or_else(|| TaskError::Internal(format!("silver.{t}: input {from} was not read")))?;
    let input_names: Vec<String> = input
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let exprs = match &spec.columns {
        Some(cols) => Some(
            cols.iter()
                .enumerate()
                .map(|(i, c)| column_expr(t, i, c, &input))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let mut lf = input.lazy();
    if let Some(exprs) = exprs {
        lf = lf.select(exprs);
    }
    if let Some(filter) = &spec.filter {
        lf = lf.filter(parse_expr(t, "filter", filter)?);
    }
    let mut df = lf.collect().map_err(|e| invalid(t, "columns", e))?;

    let (expectations, quarantine) = if spec.expectations.is_empty() {
        (Vec::new(), None)
    } else {
        let (counts, kept, quarantined) = apply_expectations(spec, df)?;
        df = kept;
        (counts, quarantined)
    };

    let mut lf = df.lazy();
    if let Some(dedupe) = &spec.dedupe {
        if let Some(order) = &dedupe.order_by {
            lf = lf.sort(
                [order.as_str()],
                SortMultipleOptions::default().with_maintain_order(true),
            );
        }
        let keep = match dedupe.keep {
            Keep::First => UniqueKeepStrategy::First,
            Keep::Last => UniqueKeepStrategy::Last,
        };
        let keys: Vec<Expr> = dedupe.keys.iter().map(|k| col(k.as_str())).collect();
        // `first`/`last` follow the (sorted) row order; the output order itself does not
        // matter for a table, so polars need not maintain it (much faster).
        lf = lf.unique_generic(Some(keys), keep);
    }
    if let Some(join) = &spec.join {
        let other = inputs.get(&join.with).ok_or_else(|| {
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
        lf = lf.join(
            right,
            left_on,
            right_on,
            JoinArgs::new(how).with_coalesce(JoinCoalesce::CoalesceColumns),
        );
        // The right keys equal the left keys after the join; keep only what was asked for.
        let mut keep_cols: Vec<Expr> = Vec::new();
        let left_names: Vec<String> = match &spec.columns {
            Some(cols) => cols.iter().map(|c| c.name.clone()).collect(),
            None => input_names.clone(),
        };
        keep_cols.extend(left_names.iter().map(|c| col(c.as_str())));
        keep_cols.extend(taken.iter().map(|c| col(c.as_str())));
        lf = lf.select(keep_cols);
    }
    let silver = lf.collect().map_err(|e| invalid(t, "dedupe/join", e))?;
    Ok(Refined {
        silver,
        quarantine,
        expectations,
    })
}

type ExpectationOutcome = (Vec<ExpectationCount>, DataFrame, Option<DataFrame>);

/// Evaluates every expectation once per row; a null result counts as a failure.
fn apply_expectations(spec: &SilverSpec, df: DataFrame) -> Result<ExpectationOutcome, TaskError> {
    let t = spec.name.as_str();
    let checked = df.height() as u64;
    let flag = |i: usize| format!("__expect_{i}");
    let mut flags = Vec::new();
    for (i, e) in spec.expectations.iter().enumerate() {
        let expr = parse_expr(t, &format!("expectations[{i}].expr"), &e.expr)?;
        flags.push(expr.fill_null(lit(false)).alias(flag(i).as_str()));
    }
    let flagged = df
        .lazy()
        .with_columns(flags)
        .collect()
        .map_err(|e| invalid(t, "expectations", e))?;
    let mut counts = Vec::new();
    for (i, e) in spec.expectations.iter().enumerate() {
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
        if e.action == ExpectationAction::Fail && failed > 0 {
            let sample = flagged
                .clone()
                .lazy()
                .filter(col(flag(i).as_str()).not())
                .limit(3)
                .collect()
                .map(|d| {
                    d.select(df_columns(&flagged))
                        .map(|d| d.to_string())
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            return Err(TaskError::ExpectationFailed(format!(
                "silver.{t}: expectation `{}` ({}) failed for {failed} of {checked} rows; nothing was committed. First failing rows:\n{sample}",
                e.name, e.expr
            )));
        }
        counts.push(ExpectationCount {
            name: e.name.clone(),
            action: e.action,
            failed_rows: failed,
            checked_rows: checked,
        });
    }
    let all_true = |action: ExpectationAction| -> Expr {
        spec.expectations
            .iter()
            .enumerate()
            .filter(|(_, e)| e.action == action)
            .map(|(i, _)| col(flag(i).as_str()))
            .reduce(|a, b| a.and(b))
            .unwrap_or(lit(true))
    };
    let keep = all_true(ExpectationAction::Drop).and(all_true(ExpectationAction::Quarantine));
    let columns = df_columns(&flagged);
    let has_quarantine = spec
        .expectations
        .iter()
        .any(|e| e.action == ExpectationAction::Quarantine);
    let quarantine = if has_quarantine {
        let names: Vec<Expr> = spec
            .expectations
            .iter()
            .enumerate()
            .map(|(i, e)| {
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
        Some(q)
    } else {
        None
    };
    let kept = flagged
        .lazy()
        .filter(keep)
        .select(columns.iter().map(|c| col(c.as_str())).collect::<Vec<_>>())
        .collect()
        .map_err(|e| invalid(t, "expectations", e))?;
    Ok((counts, kept, quarantine))
}

/// The data columns of a frame that also carries expectation flags.
fn df_columns(df: &DataFrame) -> Vec<String> {
    df.get_column_names()
        .iter()
        .map(|c| c.to_string())
        .filter(|c| !c.starts_with("__expect_"))
        .collect()
}
