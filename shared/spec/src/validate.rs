//! Semantic checks of a parsed spec and the DAG they imply.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::ControlFlow,
    str::FromStr,
};

use sqlparser::{
    ast::{
        Expr, ObjectNamePart, Query, SelectItem, SetExpr, Visit, Visitor, visit_expressions,
        visit_relations,
    },
    dialect::GenericDialect,
    parser::Parser,
};

use crate::{ColumnType, LINEAGE_COLUMNS, Layer, PipelineSpec, SpecError, TableRef};

/// One table of the pipeline and the tables it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagNode {
    pub table: TableRef,
    pub depends_on: Vec<TableRef>,
}

/// Every table of a pipeline in dependency order: each node after all the nodes it reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dag {
    pub nodes: Vec<DagNode>,
}

impl Dag {
    pub fn node(&self, table: &TableRef) -> Option<&DagNode> {
        self.nodes.iter().find(|n| &n.table == table)
    }

    /// The given tables plus everything upstream of them, in dependency order.
    pub fn with_upstream(&self, tables: &[TableRef]) -> Vec<TableRef> {
        let mut wanted: BTreeSet<TableRef> = tables.iter().cloned().collect();
        for node in self.nodes.iter().rev() {
            if wanted.contains(&node.table) {
                wanted.extend(node.depends_on.iter().cloned());
            }
        }
        self.nodes
            .iter()
            .filter(|n| wanted.contains(&n.table))
            .map(|n| n.table.clone())
            .collect()
    }
}

/// Columns a table is known to have; `None` when only the data can tell (SQL, undeclared sources).
type Columns = Option<BTreeSet<String>>;

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses a SQL expression and returns the column names it reads.
pub fn column_references(expr: &str) -> Result<BTreeSet<String>, String> {
    let parsed = Parser::new(&GenericDialect {})
        .try_with_sql(expr)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| format!("not a valid SQL expression: {e}"))?;
    let mut columns = BTreeSet::new();
    let _ = visit_expressions(&parsed, |e| {
        match e {
            Expr::Identifier(ident) => {
                columns.insert(ident.value.clone());
            }
            Expr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    columns.insert(last.value.clone());
                }
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(columns)
}

/// Functions whose value for a row depends on that row alone (polars SQL names).
const ROW_FUNCTIONS: &[&str] = &[
    "abs",
    "cbrt",
    "ceil",
    "ceiling",
    "exp",
    "floor",
    "ln",
    "log",
    "log10",
    "log2",
    "mod",
    "pow",
    "power",
    "round",
    "sign",
    "sqrt",
    "bit_length",
    "btrim",
    "char_length",
    "concat",
    "concat_ws",
    "ends_with",
    "initcap",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "octet_length",
    "regexp_like",
    "replace",
    "reverse",
    "right",
    "rpad",
    "rtrim",
    "split_part",
    "starts_with",
    "strpos",
    "strptime",
    "substr",
    "substring",
    "timestamp",
    "upper",
    "coalesce",
    "greatest",
    "ifnull",
    "least",
    "nullif",
    "date",
    "date_part",
    "date_trunc",
    "strftime",
];

/// Whether a SQL expression computes each row from that row alone: no aggregate, window or
/// subquery, and only functions known to be row-wise. Such an expression gives the same result
/// on a whole table as on each of its chunks; anything else (or anything unparsable) is `false`.
pub fn is_row_local(expr: &str) -> bool {
    let Ok(mut parser) = Parser::new(&GenericDialect {}).try_with_sql(expr) else {
        return false;
    };
    let Ok(parsed) = parser.parse_expr() else {
        return false;
    };
    if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
        return false; // trailing text: not one expression
    }
    let flow = visit_expressions(&parsed, |e| match e {
        Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => ControlFlow::Break(()),
        Expr::Function(f) => {
            let name = f.name.to_string().to_ascii_lowercase();
            if f.over.is_some() || f.filter.is_some() || !ROW_FUNCTIONS.contains(&name.as_str()) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        _ => ControlFlow::Continue(()),
    });
    flow.is_continue()
}

/// The column names a SQL query may read: every identifier in it (aliases too, which only
/// over-approximates). `None` when only the data can tell: `*`, `USING` or `NATURAL` joins.
pub fn sql_column_references(sql: &str) -> Result<Option<BTreeSet<String>>, String> {
    fn selects_all(body: &SetExpr) -> bool {
        match body {
            SetExpr::Select(select) => select.projection.iter().any(|i| {
                matches!(
                    i,
                    SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
                )
            }),
            SetExpr::Query(q) => selects_all(&q.body),
            SetExpr::SetOperation { left, right, .. } => selects_all(left) || selects_all(right),
            _ => false,
        }
    }
    struct Identifiers {
        names: BTreeSet<String>,
        all: bool,
    }
    impl Visitor for Identifiers {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            self.all |= selects_all(&query.body);
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Identifier(ident) => {
                    self.names.insert(ident.value.clone());
                }
                Expr::CompoundIdentifier(parts) => {
                    if let Some(last) = parts.last() {
                        self.names.insert(last.value.clone());
                    }
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let statements =
        Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| format!("not valid SQL: {e}"))?;
    let upper = sql.to_ascii_uppercase();
    let mut found = Identifiers {
        names: BTreeSet::new(),
        all: upper.contains("USING") || upper.contains("NATURAL"),
    };
    for statement in &statements {
        let _ = statement.visit(&mut found);
    }
    Ok((!found.all).then_some(found.names))
}

/// Parses SQL query text and returns the table names it reads (CTE names excluded).
pub fn sql_table_references(sql: &str) -> Result<BTreeSet<String>, String> {
    let statements =
        Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| format!("not valid SQL: {e}"))?;
    if statements.len() != 1 {
        return Err(format!(
            "expected exactly one SQL query, found {}",
            statements.len()
        ));
    }
    let mut ctes = BTreeSet::new();
    if let sqlparser::ast::Statement::Query(q) = &statements[0] {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                ctes.insert(cte.alias.name.value.clone());
            }
        }
    } else {
        return Err("expected a SELECT query".into());
    }
    let mut tables = BTreeSet::new();
    let _ = visit_relations(&statements[0], |name| {
        if let Some(ObjectNamePart::Identifier(ident)) = name.0.last()
            && !ctes.contains(&ident.value)
        {
            tables.insert(ident.value.clone());
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(tables)
}

struct Checker<'a> {
    spec: &'a PipelineSpec,
    columns: BTreeMap<TableRef, Columns>,
}

impl Checker<'_> {
    fn expect_columns(&self, path: &str, expr: &str, available: &Columns) -> Result<(), SpecError> {
        let used = column_references(expr).map_err(|m| SpecError::new(path, m))?;
        if let Some(available) = available
            && let Some(missing) = used.iter().find(|c| !available.contains(*c))
        {
            return Err(SpecError::new(
                path,
                format!(
                    "unknown column `{missing}` (available: {})",
                    join(available)
                ),
            ));
        }
        Ok(())
    }

    fn expect_column(
        &self,
        path: &str,
        column: &str,
        available: &Columns,
    ) -> Result<(), SpecError> {
        match available {
            Some(cols) if !cols.contains(column) => Err(SpecError::new(
                path,
                format!("unknown column `{column}` (available: {})", join(cols)),
            )),
            _ => Ok(()),
        }
    }

    /// Resolves a reference to an existing bronze or silver table.
    fn expect_table(
        &self,
        path: &str,
        table: &TableRef,
        allowed: &[Layer],
    ) -> Result<(), SpecError> {
        if !allowed.contains(&table.layer) {
            let names: Vec<_> = allowed.iter().map(|l| l.as_str()).collect();
            return Err(SpecError::new(
                path,
                format!("`{table}` must be a {} table", names.join(" or ")),
            ));
        }
        let exists = match table.layer {
            Layer::Bronze => self.spec.sources.iter().any(|s| s.name == table.name),
            Layer::Silver => self.spec.silver.iter().any(|s| s.name == table.name),
            Layer::Gold => self.spec.gold.iter().any(|s| s.name == table.name),
            Layer::Quarantine => false,
        };
        if exists {
            Ok(())
        } else {
            Err(SpecError::new(path, format!("unknown table `{table}`")))
        }
    }
}

fn join(cols: &BTreeSet<String>) -> String {
    cols.iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_names<'a>(section: &str, names: impl Iterator<Item = &'a str>) -> Result<(), SpecError> {
    let mut seen = BTreeSet::new();
    for (i, name) in names.enumerate() {
        let path = format!("{section}[{i}].name");
        if !is_identifier(name) {
            return Err(SpecError::new(
                path,
                format!("`{name}` is not a valid table name (letters, digits, _)"),
            ));
        }
        if !seen.insert(name) {
            return Err(SpecError::new(
                path,
                format!("duplicate table name `{name}`"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate(spec: &PipelineSpec) -> Result<Dag, SpecError> {
    if !is_identifier(&spec.name) {
        return Err(SpecError::new(
            "name",
            format!(
                "`{}` is not a valid pipeline name (letters, digits, _)",
                spec.name
            ),
        ));
    }
    if let Some(schedule) = &spec.schedule {
        cron::Schedule::from_str(schedule.cron()).map_err(|e| {
            SpecError::new(
                "schedule",
                format!("invalid cron expression `{}`: {e}", schedule.cron()),
            )
        })?;
    }
    if spec.mode == crate::PipelineMode::Streaming && spec.schedule.is_some() {
        return Err(SpecError::new(
            "schedule",
            "a `mode: streaming` pipeline runs continuously; it takes no schedule",
        ));
    }
    check_policy("defaults", &spec.defaults)?;
    for (section, policies) in [
        (
            "sources",
            spec.sources.iter().map(|s| s.policy).collect::<Vec<_>>(),
        ),
        ("silver", spec.silver.iter().map(|s| s.policy).collect()),
        ("gold", spec.gold.iter().map(|s| s.policy).collect()),
    ] {
        for (i, p) in policies.iter().enumerate() {
            check_policy(&format!("{section}[{i}].policy"), &p.apply(spec.defaults))?;
        }
    }
    if spec.sources.is_empty() {
        return Err(SpecError::new(
            "sources",
            "a pipeline needs at least one source",
        ));
    }
    check_names("sources", spec.sources.iter().map(|s| s.name.as_str()))?;
    check_names("silver", spec.silver.iter().map(|s| s.name.as_str()))?;
    check_names("gold", spec.gold.iter().map(|s| s.name.as_str()))?;

    let mut checker = Checker {
        spec,
        columns: BTreeMap::new(),
    };
    let mut nodes = Vec::new();

    for (i, source) in spec.sources.iter().enumerate() {
        check_source_location(i, source)?;
        let columns = source.columns.as_ref().map(|cols| {
            cols.iter()
                .cloned()
                .chain(LINEAGE_COLUMNS.iter().map(|c| c.to_string()))
                .collect()
        });
        let table = TableRef::new(Layer::Bronze, &source.name);
        checker.columns.insert(table.clone(), columns);
        nodes.push(DagNode {
            table,
            depends_on: Vec::new(),
        });
    }

    // Silver tables may read each other: order them topologically, rejecting cycles.
    let silver_deps: Vec<Vec<TableRef>> = spec
        .silver
        .iter()
        .enumerate()
        .map(|(i, s)| silver_dependencies(&checker, i, s))
        .collect::<Result<_, _>>()?;
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    while order.len() < spec.silver.len() {
        let ready = (0..spec.silver.len()).find(|&i| {
            !done.contains(&spec.silver[i].name)
                && silver_deps[i]
                    .iter()
                    .all(|d| d.layer != Layer::Silver || done.contains(&d.name))
        });
        match ready {
            Some(i) => {
                done.insert(spec.silver[i].name.clone());
                order.push(i);
            }
            None => {
                let stuck: Vec<_> = spec
                    .silver
                    .iter()
                    .filter(|s| !done.contains(&s.name))
                    .map(|s| s.name.as_str())
                    .collect();
                let first = spec
                    .silver
                    .iter()
                    .position(|s| !done.contains(&s.name))
                    .unwrap_or(0);
                return Err(SpecError::new(
                    format!("silver[{first}]"),
                    format!(
                        "dependency cycle between silver tables: {}",
                        stuck.join(" -> ")
                    ),
                ));
            }
        }
    }
    for i in order {
        let columns = silver_columns(&checker, i)?;
        let table = TableRef::new(Layer::Silver, &spec.silver[i].name);
        checker.columns.insert(table.clone(), columns);
        nodes.push(DagNode {
            table,
            depends_on: silver_deps[i].clone(),
        });
    }

    for (i, gold) in spec.gold.iter().enumerate() {
        let depends_on = gold_dependencies(&checker, i, gold)?;
        nodes.push(DagNode {
            table: TableRef::new(Layer::Gold, &gold.name),
            depends_on,
        });
    }

    if let Some(warehouse) = &spec.warehouse {
        check_warehouse(warehouse)?;
    }
    if spec.gold.iter().any(|g| g.warehouse.is_some()) && spec.warehouse.is_none() {
        let i = spec
            .gold
            .iter()
            .position(|g| g.warehouse.is_some())
            .unwrap_or(0);
        return Err(SpecError::new(
            format!("gold[{i}].warehouse"),
            "a gold table is loaded into the warehouse but the spec has no `warehouse` section",
        ));
    }
    Ok(Dag { nodes })
}

/// A file source needs a path; an HTTP source needs a usable `http` block.
fn check_source_location(i: usize, source: &crate::SourceSpec) -> Result<(), SpecError> {
    let at = |field: &str| format!("sources[{i}].{field}");
    if (source.format == crate::SourceFormat::KafkaDebezium) != source.kafka.is_some() {
        return Err(SpecError::new(
            at("kafka"),
            "`format: kafka-debezium` sources, and only they, take a `kafka` block",
        ));
    }
    if let Some(kafka) = &source.kafka {
        if !source.path.is_empty() {
            return Err(SpecError::new(
                at("path"),
                "a kafka-debezium source reads `kafka.topics`",
            ));
        }
        if kafka.brokers.trim().is_empty() {
            return Err(SpecError::new(at("kafka.brokers"), "empty"));
        }
        if kafka.topics.is_empty() || kafka.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(SpecError::new(
                at("kafka.topics"),
                "give at least one topic name",
            ));
        }
        if kafka.max_batch_rows == 0 || kafka.idle_ms == 0 {
            return Err(SpecError::new(
                at("kafka"),
                "`max_batch_rows` and `idle_ms` must be above 0",
            ));
        }
        const DAY_MS: u64 = 86_400_000;
        if kafka.idle_ms > DAY_MS || kafka.max_task_ms > DAY_MS {
            return Err(SpecError::new(
                at("kafka"),
                "`idle_ms` and `max_task_ms` must be at most 86400000 (a day)",
            ));
        }
        if kafka.readers.is_some_and(|r| r == 0 || r > 64) {
            return Err(SpecError::new(
                at("kafka.readers"),
                "must be between 1 and 64",
            ));
        }
        return Ok(());
    }
    let Some(http) = &source.http else {
        if source.format == crate::SourceFormat::HttpJson {
            return Err(SpecError::new(
                at("http"),
                "an http-json source needs an `http` block",
            ));
        }
        if source.path.trim().is_empty() {
            return Err(SpecError::new(at("path"), "a source needs a path"));
        }
        return Ok(());
    };
    if source.format != crate::SourceFormat::HttpJson {
        return Err(SpecError::new(
            at("http"),
            "only `format: http-json` sources take an `http` block",
        ));
    }
    if !source.path.is_empty() {
        return Err(SpecError::new(
            at("path"),
            "an http-json source takes its address from `http.url`",
        ));
    }
    if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
        return Err(SpecError::new(
            at("http.url"),
            "must be an http:// or https:// URL",
        ));
    }
    if !matches!(http.method.to_ascii_uppercase().as_str(), "GET" | "POST") {
        return Err(SpecError::new(at("http.method"), "GET or POST"));
    }
    if http
        .rate_limit_per_sec
        .is_some_and(|r| !(0.001..=10_000.0).contains(&r))
    {
        return Err(SpecError::new(
            at("http.rate_limit_per_sec"),
            "between 0.001 and 10000",
        ));
    }
    if http.timeout_secs == 0 || http.timeout_secs > 3600 {
        return Err(SpecError::new(
            at("http.timeout_secs"),
            "between 1 and 3600",
        ));
    }
    if http.retries > 20 {
        return Err(SpecError::new(at("http.retries"), "at most 20"));
    }
    if let Some(p) = &http.pagination {
        let styles = [
            p.next_link.is_some(),
            p.page_param.is_some(),
            p.offset_param.is_some(),
            p.cursor_param.is_some(),
        ];
        if styles.iter().filter(|s| **s).count() != 1 {
            return Err(SpecError::new(
                at("http.pagination"),
                "give one of `next_link`, `page_param`, `offset_param` or `cursor_param`",
            ));
        }
        if p.offset_param.is_some() && p.limit.is_none() {
            return Err(SpecError::new(
                at("http.pagination.limit"),
                "offset pagination needs a page size",
            ));
        }
        let blank = |v: &Option<String>| v.as_deref().is_some_and(|v| v.trim().is_empty());
        if blank(&p.next_link) || blank(&p.cursor_path) {
            return Err(SpecError::new(
                at("http.pagination"),
                "`next_link` and `cursor_path` must name a field of the response",
            ));
        }
        if p.cursor_param.is_some() && p.cursor_path.is_none() {
            return Err(SpecError::new(
                at("http.pagination.cursor_path"),
                "cursor pagination needs the cursor's path in the response",
            ));
        }
        if p.limit.is_some() != p.limit_param.is_some() {
            return Err(SpecError::new(
                at("http.pagination"),
                "give `limit` and `limit_param` together",
            ));
        }
    }
    Ok(())
}

/// Exactly one warehouse, each with the settings it needs to connect.
fn check_warehouse(warehouse: &crate::WarehouseSpec) -> Result<(), SpecError> {
    match (&warehouse.postgres, &warehouse.redshift) {
        (None, None) => Err(SpecError::new("warehouse", "give `postgres` or `redshift`")),
        (Some(_), Some(_)) => Err(SpecError::new(
            "warehouse",
            "give only one of `postgres` or `redshift`",
        )),
        (Some(pg), None) if pg.url.is_none() == pg.url_env.is_none() => Err(SpecError::new(
            "warehouse.postgres",
            "give exactly one of `url` or `url_env`",
        )),
        (Some(_), None) => Ok(()),
        (None, Some(rs)) => {
            let blank = |v: &Option<String>| v.as_deref().is_none_or(|v| v.trim().is_empty());
            if blank(&rs.cluster_id) == blank(&rs.workgroup) {
                return Err(SpecError::new(
                    "warehouse.redshift",
                    "give exactly one of `cluster_id` (provisioned) or `workgroup` (Serverless)",
                ));
            }
            if !blank(&rs.cluster_id) && blank(&rs.db_user) && blank(&rs.secret_arn) {
                return Err(SpecError::new(
                    "warehouse.redshift",
                    "a provisioned cluster needs `db_user` or `secret_arn`",
                ));
            }
            if !blank(&rs.workgroup) && !blank(&rs.db_user) {
                return Err(SpecError::new(
                    "warehouse.redshift.db_user",
                    "Serverless (`workgroup`) takes `secret_arn` or the caller's IAM identity, not `db_user`",
                ));
            }
            if !blank(&rs.db_user) && !blank(&rs.secret_arn) {
                return Err(SpecError::new(
                    "warehouse.redshift",
                    "give only one of `db_user` or `secret_arn`",
                ));
            }
            if rs.database.trim().is_empty() {
                return Err(SpecError::new("warehouse.redshift.database", "empty"));
            }
            if rs.iam_role.trim().is_empty() {
                return Err(SpecError::new("warehouse.redshift.iam_role", "empty"));
            }
            if !rs.staging.starts_with("s3://") || rs.staging.len() <= "s3://".len() {
                return Err(SpecError::new(
                    "warehouse.redshift.staging",
                    "must be an s3://bucket/prefix/ URL",
                ));
            }
            Ok(())
        }
    }
}

/// Bounds that keep retries and timeouts meaningful.
fn check_policy(path: &str, p: &crate::TaskPolicy) -> Result<(), SpecError> {
    if p.timeout_secs == 0 {
        return Err(SpecError::new(
            format!("{path}.timeout_secs"),
            "must be at least 1",
        ));
    }
    if p.retries > 100 {
        return Err(SpecError::new(
            format!("{path}.retries"),
            "at most 100 retries",
        ));
    }
    if p.max_backoff_ms < p.backoff_ms {
        return Err(SpecError::new(
            format!("{path}.max_backoff_ms"),
            "must not be below backoff_ms",
        ));
    }
    Ok(())
}

fn silver_dependencies(
    checker: &Checker<'_>,
    i: usize,
    silver: &crate::SilverSpec,
) -> Result<Vec<TableRef>, SpecError> {
    let base = format!("silver[{i}]");
    let mut deps = Vec::new();
    if let Some(sql) = &silver.sql {
        let declarative = silver.from.is_some()
            || silver.columns.is_some()
            || silver.join.is_some()
            || silver.filter.is_some()
            || silver.dedupe.is_some()
            || !silver.expectations.is_empty();
        if declarative {
            return Err(SpecError::new(
                format!("{base}.sql"),
                "`sql` replaces `from`, `columns`, `filter`, `expectations`, `dedupe` and `join`; use one form",
            ));
        }
        let names =
            sql_table_references(sql).map_err(|m| SpecError::new(format!("{base}.sql"), m))?;
        for name in names {
            // In silver SQL a name means the bronze table of that name, else the silver one.
            let table = if checker.spec.sources.iter().any(|s| s.name == name) {
                TableRef::new(Layer::Bronze, name)
            } else if checker.spec.silver.iter().any(|s| s.name == name) && name != silver.name {
                TableRef::new(Layer::Silver, name)
            } else {
                return Err(SpecError::new(
                    format!("{base}.sql"),
                    format!("unknown table `{name}`"),
                ));
            };
            deps.push(table);
        }
    } else {
        let from = silver.from.as_ref().ok_or_else(|| {
            SpecError::new(
                format!("{base}.from"),
                "a silver table needs `from` or `sql`",
            )
        })?;
        checker.expect_table(
            &format!("{base}.from"),
            from,
            &[Layer::Bronze, Layer::Silver],
        )?;
        deps.push(from.clone());
    }
    if let Some(join) = &silver.join {
        checker.expect_table(
            &format!("{base}.join.with"),
            &join.with,
            &[Layer::Bronze, Layer::Silver],
        )?;
        if join.on.is_empty() {
            return Err(SpecError::new(
                format!("{base}.join.on"),
                "a join needs at least one key pair",
            ));
        }
        deps.push(join.with.clone());
    }
    if deps
        .iter()
        .any(|d| d.layer == Layer::Silver && d.name == silver.name)
    {
        return Err(SpecError::new(
            base,
            format!("dependency cycle: silver.{} reads itself", silver.name),
        ));
    }
    deps.dedup();
    Ok(deps)
}

/// Checks a silver table's column references and returns its output columns.
fn silver_columns(checker: &Checker<'_>, i: usize) -> Result<Columns, SpecError> {
    let silver = &checker.spec.silver[i];
    let base = format!("silver[{i}]");
    if silver.sql.is_some() {
        return Ok(None);
    }
    if let Some(apply) = &silver.apply_changes {
        return apply_changes_columns(checker, &base, silver, apply);
    }
    let input = silver
        .from
        .as_ref()
        .and_then(|f| checker.columns.get(f).cloned())
        .flatten();
    let input = input.map(Some).unwrap_or(None);
    let mut output: Columns = match &silver.columns {
        None => input.clone(),
        Some(cols) => {
            let mut out = BTreeSet::new();
            for (j, col) in cols.iter().enumerate() {
                let path = format!("{base}.columns[{j}]");
                if !is_identifier(&col.name) {
                    return Err(SpecError::new(
                        format!("{path}.name"),
                        format!("`{}` is not a valid column name", col.name),
                    ));
                }
                if let Some(format) = &col.format {
                    check_time_format(&path, col.data_type, format)?;
                }
                match (&col.from, &col.expr) {
                    (Some(_), Some(_)) => {
                        return Err(SpecError::new(path, "give `from` or `expr`, not both"));
                    }
                    (Some(from), None) => {
                        checker.expect_column(&format!("{path}.from"), from, &input)?
                    }
                    (None, Some(expr)) => {
                        checker.expect_columns(&format!("{path}.expr"), expr, &input)?
                    }
                    (None, None) => {
                        checker.expect_column(&format!("{path}.name"), &col.name, &input)?
                    }
                }
                if !out.insert(col.name.clone()) {
                    return Err(SpecError::new(
                        format!("{path}.name"),
                        format!("duplicate column `{}`", col.name),
                    ));
                }
            }
            Some(out)
        }
    };
    if let Some(filter) = &silver.filter {
        checker.expect_columns(&format!("{base}.filter"), filter, &output)?;
    }
    for (j, e) in silver.expectations.iter().enumerate() {
        if e.name.trim().is_empty() {
            return Err(SpecError::new(
                format!("{base}.expectations[{j}].name"),
                "an expectation needs a name",
            ));
        }
        checker.expect_columns(&format!("{base}.expectations[{j}].expr"), &e.expr, &output)?;
    }
    if let Some(dedupe) = &silver.dedupe {
        if dedupe.keys.is_empty() {
            return Err(SpecError::new(
                format!("{base}.dedupe.keys"),
                "dedupe needs at least one key",
            ));
        }
        for (j, k) in dedupe.keys.iter().enumerate() {
            checker.expect_column(&format!("{base}.dedupe.keys[{j}]"), k, &output)?;
        }
        if let Some(order) = &dedupe.order_by {
            checker.expect_column(&format!("{base}.dedupe.order_by"), order, &output)?;
        }
    }
    if let Some(join) = &silver.join {
        let other = checker.columns.get(&join.with).cloned().flatten();
        for (j, key) in join.on.iter().enumerate() {
            checker.expect_column(&format!("{base}.join.on[{j}].left"), &key.left, &output)?;
            checker.expect_column(&format!("{base}.join.on[{j}].right"), &key.right, &other)?;
        }
        let right_keys: BTreeSet<&str> = join.on.iter().map(|k| k.right.as_str()).collect();
        let taken: Columns = match &join.columns {
            Some(cols) => {
                for (j, c) in cols.iter().enumerate() {
                    checker.expect_column(&format!("{base}.join.columns[{j}]"), c, &other)?;
                }
                Some(cols.iter().cloned().collect())
            }
            None => other.map(|o| {
                o.into_iter()
                    .filter(|c| !right_keys.contains(c.as_str()))
                    .collect()
            }),
        };
        output = match (output, taken) {
            (Some(mut out), Some(taken)) => {
                for c in taken {
                    if !out.insert(c.clone()) {
                        return Err(SpecError::new(
                            format!("{base}.join.columns"),
                            format!("column `{c}` exists on both sides of the join"),
                        ));
                    }
                }
                Some(out)
            }
            _ => None,
        };
    }
    Ok(output)
}

/// Checks an `apply_changes` table and returns its output columns: the declared ones, the key
/// and the sequence columns of its SCD type.
fn apply_changes_columns(
    checker: &Checker<'_>,
    base: &str,
    silver: &crate::SilverSpec,
    apply: &crate::ApplyChangesSpec,
) -> Result<Columns, SpecError> {
    let is_change_source = silver.from.as_ref().is_some_and(|from| {
        from.layer == Layer::Bronze
            && checker
                .spec
                .sources
                .iter()
                .any(|s| s.name == from.name && s.format == crate::SourceFormat::KafkaDebezium)
    });
    if !is_change_source {
        return Err(SpecError::new(
            format!("{base}.from"),
            "`apply_changes` reads the bronze table of a `kafka-debezium` source",
        ));
    }
    let refining = [
        ("filter", silver.filter.is_some()),
        ("dedupe", silver.dedupe.is_some()),
        ("join", silver.join.is_some()),
        ("expectations", !silver.expectations.is_empty()),
    ];
    if let Some((field, _)) = refining.iter().find(|(_, set)| *set) {
        return Err(SpecError::new(
            format!("{base}.{field}"),
            "not available with `apply_changes` (refine the applied table in a further silver table)",
        ));
    }
    if apply.buckets == 0 || apply.buckets > 4096 {
        return Err(SpecError::new(
            format!("{base}.apply_changes.buckets"),
            "must be between 1 and 4096",
        ));
    }
    let columns = silver.columns.as_ref().ok_or_else(|| {
        SpecError::new(
            format!("{base}.columns"),
            "`apply_changes` needs the columns to take from the row images",
        )
    })?;
    let mut out = BTreeSet::new();
    for (j, col) in columns.iter().enumerate() {
        let path = format!("{base}.columns[{j}]");
        if !is_identifier(&col.name) || col.name.starts_with("__") {
            return Err(SpecError::new(
                format!("{path}.name"),
                format!(
                    "`{}` is not a valid column name here (names starting with `__` are the table's own)",
                    col.name
                ),
            ));
        }
        if col.expr.is_some() {
            return Err(SpecError::new(
                format!("{path}.expr"),
                "`apply_changes` takes columns from the row images; compute in a further silver table",
            ));
        }
        if col.format.is_some() {
            return Err(SpecError::new(
                format!("{path}.format"),
                "`apply_changes` reads typed row images; parse text in a further silver table",
            ));
        }
        if !out.insert(col.name.clone()) {
            return Err(SpecError::new(
                format!("{path}.name"),
                format!("duplicate column `{}`", col.name),
            ));
        }
    }
    if columns.is_empty() {
        return Err(SpecError::new(
            format!("{base}.columns"),
            "`apply_changes` needs at least one column",
        ));
    }
    if let Some(tracked) = &apply.track_history_on {
        if tracked.is_empty() {
            return Err(SpecError::new(
                format!("{base}.apply_changes.track_history_on"),
                "name at least one column (leave it out to track every column)",
            ));
        }
        if apply.stored_as != crate::ScdType::Scd2 {
            return Err(SpecError::new(
                format!("{base}.apply_changes.track_history_on"),
                "only with `stored_as: scd2`",
            ));
        }
        for (j, c) in tracked.iter().enumerate() {
            if !out.contains(c) {
                return Err(SpecError::new(
                    format!("{base}.apply_changes.track_history_on[{j}]"),
                    format!("unknown column `{c}`; known: {}", join(&out)),
                ));
            }
        }
    }
    out.insert(crate::CHANGE_KEY.to_string());
    out.insert(crate::CHANGE_SEQUENCE.to_string());
    if apply.stored_as == crate::ScdType::Scd2 {
        out.insert(crate::CHANGE_START.to_string());
        out.insert(crate::CHANGE_END.to_string());
    }
    Ok(Some(out))
}

fn gold_dependencies(
    checker: &Checker<'_>,
    i: usize,
    gold: &crate::GoldSpec,
) -> Result<Vec<TableRef>, SpecError> {
    let base = format!("gold[{i}]");
    if let Some(w) = &gold.warehouse {
        let parts: Vec<_> = w.table.split('.').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(SpecError::new(
                format!("{base}.warehouse.table"),
                format!("`{}` must be written schema.table", w.table),
            ));
        }
        if w.mode == crate::LoadMode::Merge && w.keys.is_empty() {
            return Err(SpecError::new(
                format!("{base}.warehouse.keys"),
                "mode `merge` needs `keys`",
            ));
        }
    }
    match (&gold.sql, &gold.from) {
        (Some(sql), None) => {
            if !gold.group_by.is_empty() || !gold.aggregations.is_empty() || gold.filter.is_some() {
                return Err(SpecError::new(
                    format!("{base}.sql"),
                    "`sql` replaces `group_by`, `aggregations` and `filter`; use one form",
                ));
            }
            let names =
                sql_table_references(sql).map_err(|m| SpecError::new(format!("{base}.sql"), m))?;
            names
                .into_iter()
                .map(|name| {
                    let table = TableRef::new(Layer::Silver, name);
                    checker.expect_table(&format!("{base}.sql"), &table, &[Layer::Silver])?;
                    Ok(table)
                })
                .collect()
        }
        (None, Some(from)) => {
            checker.expect_table(&format!("{base}.from"), from, &[Layer::Silver])?;
            let input = checker.columns.get(from).cloned().flatten();
            if let Some(filter) = &gold.filter {
                checker.expect_columns(&format!("{base}.filter"), filter, &input)?;
            }
            if gold.aggregations.is_empty() {
                return Err(SpecError::new(
                    format!("{base}.aggregations"),
                    "the group-by form needs at least one aggregation",
                ));
            }
            for (j, g) in gold.group_by.iter().enumerate() {
                checker.expect_column(&format!("{base}.group_by[{j}]"), g, &input)?;
            }
            for (j, a) in gold.aggregations.iter().enumerate() {
                if !is_identifier(&a.name) {
                    return Err(SpecError::new(
                        format!("{base}.aggregations[{j}].name"),
                        format!("`{}` is not a valid column name", a.name),
                    ));
                }
                checker.expect_columns(
                    &format!("{base}.aggregations[{j}].expr"),
                    &a.expr,
                    &input,
                )?;
            }
            Ok(vec![from.clone()])
        }
        (Some(_), Some(_)) => Err(SpecError::new(
            format!("{base}.sql"),
            "give `sql` or `from`, not both",
        )),
        (None, None) => Err(SpecError::new(
            base,
            "a gold table needs `sql` or `from` with `aggregations`",
        )),
    }
}

/// A column's `format`: only for dates and timestamps, and made of valid strftime items.
fn check_time_format(
    path: &str,
    data_type: Option<ColumnType>,
    format: &str,
) -> Result<(), SpecError> {
    let path = format!("{path}.format");
    if !matches!(data_type, Some(ColumnType::Date | ColumnType::Timestamp)) {
        return Err(SpecError::new(
            path,
            "`format` applies to columns of type `date` or `timestamp`",
        ));
    }
    use chrono::format::{Fixed, Item, Numeric, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    let has = |wanted: &[Numeric]| {
        items
            .iter()
            .any(|i| matches!(i, Item::Numeric(n, _) if wanted.contains(n)))
    };
    let invalid = |why: &str| Err(SpecError::new(path.clone(), format!("`{format}`: {why}")));
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return invalid("not a strftime format such as `%Y-%m-%d`");
    }
    let year = [
        Numeric::Year,
        Numeric::YearMod100,
        Numeric::IsoYear,
        Numeric::IsoYearMod100,
        Numeric::Timestamp,
    ];
    if !has(&year) {
        return invalid("a date format needs a year (`%Y` or `%y`)");
    }
    if items
        .iter()
        .any(|i| matches!(i, Item::Fixed(Fixed::TimezoneName)))
    {
        return invalid("`%Z` (a zone name) cannot be read; use `%z` (an offset such as +01:00)");
    }
    // The parser's rules for times: an hour needs its minutes, seconds their minutes, and a
    // 12-hour clock its AM/PM.
    let (hour, minute) = (
        has(&[Numeric::Hour, Numeric::Hour12]),
        has(&[Numeric::Minute]),
    );
    if (hour && !minute) || (has(&[Numeric::Second]) && !minute) {
        return invalid("hours and seconds need minutes (`%H:%M`, `%H:%M:%S`)");
    }
    let meridiem = items
        .iter()
        .any(|i| matches!(i, Item::Fixed(Fixed::UpperAmPm | Fixed::LowerAmPm)));
    if has(&[Numeric::Hour12]) && !meridiem {
        return invalid("a 12-hour clock (`%I`) needs `%p`");
    }
    Ok(())
}
