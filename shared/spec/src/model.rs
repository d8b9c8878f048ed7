//! The pipeline spec as written in YAML. Field names here are the spec's public format:
//! the README's spec reference documents exactly these.

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize};

/// A whole pipeline: sources land in bronze, `silver` tables refine them, `gold` tables aggregate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    /// Cron expression with seconds (`sec min hour day month weekday`), e.g. `0 */15 * * * *`.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// `batch` runs when triggered or scheduled; `streaming` runs back to back for as long as
    /// the pipeline is applied and not paused (change sources are read continuously).
    #[serde(default)]
    pub mode: PipelineMode,
    /// Timeout, retries and backoff for every task unless a table overrides them.
    #[serde(default)]
    pub defaults: TaskPolicy,
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub silver: Vec<SilverSpec>,
    #[serde(default)]
    pub gold: Vec<GoldSpec>,
    #[serde(default)]
    pub warehouse: Option<WarehouseSpec>,
}

/// How a pipeline is driven.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineMode {
    #[default]
    Batch,
    Streaming,
}

/// When a pipeline runs on its own.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ScheduleSpec {
    Cron(String),
    Detailed {
        cron: String,
        /// Run once for ticks missed while the coordinator was down (default: skip them).
        #[serde(default)]
        catch_up: bool,
    },
}

impl ScheduleSpec {
    pub fn cron(&self) -> &str {
        match self {
            ScheduleSpec::Cron(c) | ScheduleSpec::Detailed { cron: c, .. } => c,
        }
    }
    pub fn catch_up(&self) -> bool {
        matches!(self, ScheduleSpec::Detailed { catch_up: true, .. })
    }
}

/// How long a task may take and how it is retried.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TaskPolicy {
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
}

fn default_timeout() -> u64 {
    3600
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    30_000
}

impl Default for TaskPolicy {
    fn default() -> Self {
        TaskPolicy {
            timeout_secs: default_timeout(),
            retries: default_retries(),
            backoff_ms: default_backoff(),
            max_backoff_ms: default_max_backoff(),
        }
    }
}

/// Partial override of [`TaskPolicy`] on one table.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverride {
    pub timeout_secs: Option<u64>,
    pub retries: Option<u32>,
    pub backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
}

impl PolicyOverride {
    pub fn apply(&self, base: TaskPolicy) -> TaskPolicy {
        TaskPolicy {
            timeout_secs: self.timeout_secs.unwrap_or(base.timeout_secs),
            retries: self.retries.unwrap_or(base.retries),
            backoff_ms: self.backoff_ms.unwrap_or(base.backoff_ms),
            max_backoff_ms: self.max_backoff_ms.unwrap_or(base.max_backoff_ms),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Csv,
    Ndjson,
    /// A JSON array of objects (or one object) per file.
    Json,
    Parquet,
    /// Records from an HTTP JSON API, page by page (settings in the source's `http` block).
    #[serde(rename = "http-json")]
    HttpJson,
    /// Debezium change events from Kafka topics (settings in the source's `kafka` block).
    #[serde(rename = "kafka-debezium")]
    KafkaDebezium,
}

/// A Kafka source of Debezium change events. Each bronze task reads what the topics hold
/// beyond the offsets bronze has committed, and commits the rows with those offsets (one Delta
/// application transaction per topic-partition), so every message lands exactly once.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceSpec {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    pub topics: Vec<String>,
    /// Consumer group id reported to Kafka; offsets themselves live in bronze.
    #[serde(default)]
    pub group: Option<String>,
    /// librdkafka settings passed through (TLS, SASL, …); `${VAR}` in a value is read from the
    /// ingestor's environment.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Row key columns from the after (or before) image; default: the message key.
    #[serde(default)]
    pub key_columns: Vec<String>,
    /// A field of the `source` block (dotted path) that orders changes; default: the
    /// connector's position (Postgres lsn, MySQL binlog file/pos/row, SQL Server change_lsn).
    #[serde(default)]
    pub sequence_field: Option<String>,
    /// Rows per bronze commit.
    #[serde(default = "default_kafka_batch_rows")]
    pub max_batch_rows: usize,
    /// A micro-batch is committed, and a task counts its reader as caught up, once no message
    /// arrived for this long.
    #[serde(default = "default_kafka_idle_ms")]
    pub idle_ms: u64,
    /// The longest a micro-batch stays uncommitted (0: 10 s) and a task waits (0: until caught
    /// up) while messages keep coming, so the layers downstream get their turn. Bounds the
    /// latency of a `mode: streaming` pipeline.
    #[serde(default)]
    pub max_task_ms: u64,
    /// The most ingestor replicas that read this source at once (default: every healthy
    /// replica). Each is a member of the consumer group, which splits the partitions among
    /// them. A full refresh uses one.
    #[serde(default)]
    pub readers: Option<u32>,
}

fn default_kafka_batch_rows() -> usize {
    100_000
}
fn default_kafka_idle_ms() -> u64 {
    1_000
}

/// An HTTP JSON API source: where to ask, how to page, how to be polite, and what to remember.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceSpec {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Request headers. `${VAR}` in a value is replaced by the ingestor's environment variable
    /// VAR, so secrets stay out of the spec (`Authorization: "Bearer ${API_TOKEN}"`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Dotted path of the records array in each response (`data.items`); empty: the response
    /// itself is the array.
    #[serde(default)]
    pub records: String,
    #[serde(default)]
    pub pagination: Option<PaginationSpec>,
    /// At most this many requests per second.
    #[serde(default)]
    pub rate_limit_per_sec: Option<f64>,
    /// Retries of a request answered 429 or 5xx (or not answered), with exponential backoff
    /// and jitter, honouring Retry-After.
    #[serde(default = "default_http_retries")]
    pub retries: u32,
    #[serde(default = "default_http_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub incremental: Option<IncrementalSpec>,
}

/// How to get the next page; give one style.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PaginationSpec {
    /// Dotted path of the next page's URL in the response; stops when absent or null.
    #[serde(default)]
    pub next_link: Option<String>,
    /// Query parameter of the page number, counted from `start`; stops on an empty page (or
    /// one shorter than `limit`).
    #[serde(default)]
    pub page_param: Option<String>,
    #[serde(default = "default_page_start")]
    pub start: u64,
    /// Query parameter of the record offset; stops on an empty page or one shorter than `limit`.
    #[serde(default)]
    pub offset_param: Option<String>,
    /// Page size sent as `limit_param` with page and offset styles.
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub limit_param: Option<String>,
    /// Query parameter carrying the cursor read from `cursor_path`; stops when absent or null.
    #[serde(default)]
    pub cursor_param: Option<String>,
    #[serde(default)]
    pub cursor_path: Option<String>,
}

/// Remember the highest `field` value seen; the next run sends it as query parameter `param`,
/// so the API returns only records changed after it. It is stored in the bronze commit
/// itself, so a failed run leaves it where the last committed run put it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncrementalSpec {
    pub field: String,
    pub param: String,
}

fn default_method() -> String {
    "GET".into()
}
fn default_http_retries() -> u32 {
    5
}
fn default_http_timeout() -> u64 {
    30
}
fn default_page_start() -> u64 {
    1
}

/// Raw input landing in `bronze.<name>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub name: String,
    pub format: SourceFormat,
    /// A file, a folder (every file in it) or a glob; relative to the spec's base directory, or
    /// `s3://bucket/prefix/` (a glob is allowed in the key). Not used by `http-json`.
    #[serde(default)]
    pub path: String,
    /// The API of an `http-json` source.
    #[serde(default)]
    pub http: Option<HttpSourceSpec>,
    /// The topics of a `kafka-debezium` source.
    #[serde(default)]
    pub kafka: Option<KafkaSourceSpec>,
    #[serde(default)]
    pub options: CsvOptions,
    /// Infer column types from the data instead of keeping CSV columns as strings.
    #[serde(default)]
    pub infer_types: bool,
    /// Column names. CSV without a header: they name the columns; CSV with a header: it must
    /// equal them. Every format: they let apply-time validation check downstream column references.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    #[serde(default)]
    pub policy: PolicyOverride,
}

/// CSV reading options.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    #[serde(default = "default_true")]
    pub header: bool,
    #[serde(default = "default_quote")]
    pub quote: char,
    /// Values read as null.
    #[serde(default)]
    pub null_values: Vec<String>,
}

fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}
fn default_true() -> bool {
    true
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: default_delimiter(),
            header: true,
            quote: default_quote(),
            null_values: Vec::new(),
        }
    }
}

/// A cleaned table: typed columns, filter, expectations, de-duplication and a join; or SQL.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SilverSpec {
    pub name: String,
    /// The table read: `bronze.<source>` or `silver.<table>`. Not used with `sql`.
    #[serde(default)]
    pub from: Option<TableRef>,
    /// Output columns, in order. Without it every input column passes through.
    #[serde(default)]
    pub columns: Option<Vec<ColumnSpec>>,
    /// Rows for which this SQL boolean expression is not true are dropped.
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub expectations: Vec<ExpectationSpec>,
    #[serde(default)]
    pub dedupe: Option<DedupeSpec>,
    #[serde(default)]
    pub join: Option<JoinSpec>,
    /// polars SQL over the input tables, instead of the declarative form.
    #[serde(default)]
    pub sql: Option<String>,
    /// Applies the change events of a `kafka-debezium` source (`from`) by key, in sequence
    /// order, instead of refining rows; `columns` are taken from the row images, typed as
    /// declared, else as the table or the Debezium schema of the events has them.
    #[serde(default)]
    pub apply_changes: Option<ApplyChangesSpec>,
    #[serde(default)]
    pub policy: PolicyOverride,
}

/// How change events become a silver table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyChangesSpec {
    /// `scd1`: the current state, one row per key; `scd2`: every version of every key, with
    /// `__start_at` / `__end_at`.
    #[serde(default)]
    pub stored_as: ScdType,
    /// SCD2 only: a new version starts only when one of these columns changes (other changes
    /// update the current version in place). Default: every column.
    #[serde(default)]
    pub track_history_on: Option<Vec<String>>,
    /// Keys are spread over this many hash buckets, each in its own files: a change rewrites
    /// only the buckets of the keys it touches.
    #[serde(default = "default_change_buckets")]
    pub buckets: u32,
}

fn default_change_buckets() -> u32 {
    16
}

/// Slowly changing dimension type of an `apply_changes` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScdType {
    #[default]
    Scd1,
    Scd2,
}

/// Columns of a `kafka-debezium` source's bronze change table that describe the change.
pub const CHANGE_COLUMNS: [&str; 11] = [
    "op",
    "key",
    "sequence",
    "before",
    "after",
    ROW_SCHEMA,
    "_topic",
    "_partition",
    "_offset",
    "_error",
    "_value",
];

/// Column of a bronze change table holding the Debezium schema of the row images (the
/// `fields` of the envelope's `after` struct, as JSON) when the JsonConverter sent schemas: set
/// on a micro-batch's first such message and wherever it changes, null elsewhere.
pub const ROW_SCHEMA: &str = "row_schema";

/// Row key of an `apply_changes` table: the change's key as JSON text.
pub const CHANGE_KEY: &str = "__key";
/// The sequence of the last change whose values the row holds.
pub const CHANGE_SEQUENCE: &str = "__sequence";
/// SCD2: the sequence from which a version holds.
pub const CHANGE_START: &str = "__start_at";
/// SCD2: the sequence from which a version no longer holds (null: current).
pub const CHANGE_END: &str = "__end_at";

/// One output column: taken from an input column (optionally renamed), or computed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    pub name: String,
    /// Cast to this type (`string`, `int32`, `int64`, `float64`, `bool`, `date`, `timestamp`, `decimal(p,s)`).
    #[serde(default, rename = "type")]
    pub data_type: Option<ColumnType>,
    /// The input column to take, when it is named differently.
    #[serde(default)]
    pub from: Option<String>,
    /// A SQL expression over the input columns.
    #[serde(default)]
    pub expr: Option<String>,
    /// How a text `date` or `timestamp` column is written, in strftime items (`%d/%m/%Y`).
    /// Without it the format is inferred from the first value, which is slower and cannot
    /// tell `01/02/2024` day-first from month-first.
    // Left out of the serialised spec when absent: the definition fingerprint of a table
    // is its serialised spec, and tables that do not use it must keep theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// Types a column can be declared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ColumnType {
    String,
    Int32,
    Int64,
    Float64,
    Bool,
    Date,
    /// Microseconds, UTC.
    Timestamp,
    /// Exact decimal with precision and scale (money).
    Decimal {
        precision: u8,
        scale: u8,
    },
}

impl FromStr for ColumnType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "string" | "text" | "utf8" => ColumnType::String,
            "int" | "int32" | "integer" => ColumnType::Int32,
            "int64" | "bigint" | "long" => ColumnType::Int64,
            "float64" | "double" | "float" => ColumnType::Float64,
            "bool" | "boolean" => ColumnType::Bool,
            "date" => ColumnType::Date,
            "timestamp" => ColumnType::Timestamp,
            _ => {
                let inner = t
                    .strip_prefix("decimal(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("unknown type `{s}`"))?;
                let (p, sc) = inner
                    .split_once(',')
                    .ok_or_else(|| format!("decimal needs (precision,scale), got `{s}`"))?;
                let precision: u8 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad precision in `{s}`"))?;
                let scale: u8 = sc
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad scale in `{s}`"))?;
                if precision == 0 || precision > 38 || scale > precision {
                    return Err(format!(
                        "decimal precision must be 1..=38 and scale <= precision, got `{s}`"
                    ));
                }
                ColumnType::Decimal { precision, scale }
            }
        })
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::String => f.write_str("string"),
            ColumnType::Int32 => f.write_str("int32"),
            ColumnType::Int64 => f.write_str("int64"),
            ColumnType::Float64 => f.write_str("float64"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Date => f.write_str("date"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
        }
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A data-quality rule: rows where `expr` is not true fail it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectationSpec {
    pub name: String,
    pub expr: String,
    #[serde(default)]
    pub action: ExpectationAction,
}

/// What happens to rows failing an expectation.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExpectationAction {
    /// Keep the row, count it.
    #[default]
    Warn,
    /// Remove the row.
    Drop,
    /// Remove the row and keep it in `quarantine/<table>` with the failed expectations' names.
    Quarantine,
    /// Fail the task; nothing is committed.
    Fail,
}

/// Keep one row per key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeSpec {
    pub keys: Vec<String>,
    /// The row that wins is the first or last by this column (default: arrival order).
    #[serde(default)]
    pub order_by: Option<String>,
    #[serde(default)]
    pub keep: Keep,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    First,
    #[default]
    Last,
}

/// Enrich each row with columns of another table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSpec {
    pub with: TableRef,
    pub on: Vec<JoinKey>,
    #[serde(default)]
    pub how: JoinHow,
    /// Columns taken from the other table (default: all but its keys).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinKey {
    pub left: String,
    pub right: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JoinHow {
    #[default]
    Inner,
    Left,
}

/// A business aggregate: SQL over silver tables, or a group-by form.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoldSpec {
    pub name: String,
    /// polars SQL; tables are named by their silver names.
    #[serde(default)]
    pub sql: Option<String>,
    /// The silver table of the group-by form.
    #[serde(default)]
    pub from: Option<TableRef>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default)]
    pub aggregations: Vec<AggregationSpec>,
    #[serde(default)]
    pub warehouse: Option<GoldWarehouseSpec>,
    #[serde(default)]
    pub policy: PolicyOverride,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationSpec {
    pub name: String,
    /// A SQL aggregate expression, e.g. `sum(l_quantity)` or `count(distinct l_orderkey)`.
    pub expr: String,
}

/// Where a gold table is loaded in the warehouse.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoldWarehouseSpec {
    /// `schema.table`.
    pub table: String,
    #[serde(default)]
    pub mode: LoadMode,
    #[serde(default)]
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    #[default]
    Replace,
    Merge,
}

/// The warehouse gold tables are loaded into: PostgreSQL or Amazon Redshift (one of them).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseSpec {
    #[serde(default)]
    pub postgres: Option<PostgresSpec>,
    #[serde(default)]
    pub redshift: Option<RedshiftSpec>,
}

/// Amazon Redshift through the Redshift Data API: a provisioned cluster (`cluster_id` with
/// `db_user` or `secret_arn`) or Serverless (`workgroup`). Gold is staged as Parquet under
/// `staging` and loaded with `COPY … IAM_ROLE`. Credentials come from the aggregator's AWS
/// credential chain, never from the spec.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedshiftSpec {
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub workgroup: Option<String>,
    pub database: String,
    #[serde(default)]
    pub db_user: Option<String>,
    #[serde(default)]
    pub secret_arn: Option<String>,
    /// ARN of the IAM role Redshift assumes to read the staged files.
    pub iam_role: String,
    /// `s3://bucket/prefix/` for the staged Parquet files (removed after each load).
    pub staging: String,
}

/// A PostgreSQL connection; keep passwords out of the spec with `url_env`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    #[serde(default)]
    pub url: Option<String>,
    /// Name of an environment variable (on the aggregator) holding the URL.
    #[serde(default)]
    pub url_env: Option<String>,
    /// With `url_env`: when the variable is unset, skip loading instead of failing.
    #[serde(default)]
    pub optional: bool,
}

/// The layers of the lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Bronze,
    Silver,
    Gold,
    Quarantine,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
            Layer::Quarantine => "quarantine",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Layer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bronze" => Ok(Layer::Bronze),
            "silver" => Ok(Layer::Silver),
            "gold" => Ok(Layer::Gold),
            "quarantine" => Ok(Layer::Quarantine),
            other => Err(format!(
                "unknown layer `{other}` (expected bronze, silver, gold or quarantine)"
            )),
        }
    }
}

/// A table of the lake, written `layer.name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableRef {
    pub layer: Layer,
    pub name: String,
}

impl TableRef {
    pub fn new(layer: Layer, name: impl Into<String>) -> Self {
        TableRef {
            layer,
            name: name.into(),
        }
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.layer, self.name)
    }
}

impl FromStr for TableRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (layer, name) = s.split_once('.').ok_or_else(|| {
            format!("table reference `{s}` must be written layer.name, e.g. bronze.orders")
        })?;
        Ok(TableRef {
            layer: layer.parse()?,
            name: name.to_string(),
        })
    }
}

impl<'de> Deserialize<'de> for TableRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TableRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Columns every bronze table carries besides the source's own.
pub const LINEAGE_COLUMNS: [&str; 4] = [
    "_source_file",
    "_source_modified",
    "_ingested_at",
    "_run_id",
];
