//! Lake storage for Medallion: every layer table is a Delta table at
//! `<lake root>/<layer>/<table>`.
//!
//! All table data goes through deltalake's log store / object store, so the same code
//! serves a local folder and S3 (or an S3-compatible store). On S3, commits are conditional
//! writes of the next log entry (`If-None-Match: *`): of two writers racing for one version,
//! exactly one wins and the other sees the conflict.
//! Writes stream into parquet files and land in exactly one Delta commit that also records
//! an application transaction, which makes retried tasks idempotent.

mod error;
mod read;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::stream::BoxStream;
use url::Url;

pub use error::{Error, Result};
pub use write::{CommitOutcome, CommitSpec, TableWriter, WriteMode};

/// Target size of one parquet data file; the writer rolls to a new file beyond it.
pub const TARGET_FILE_SIZE: u64 = 128 * 1024 * 1024;

/// The layers of the lake; each is one folder of Delta tables under the lake root.
pub use medallion_spec::Layer;

/// Handle on a lake root plus the storage options used to reach it; cheap to clone.
#[derive(Clone)]
pub struct Lake {
    root: Arc<Url>,
    storage_options: Arc<HashMap<String, String>>,
}

impl fmt::Debug for Lake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Storage options may hold secrets: show only their keys.
        f.debug_struct("Lake")
            .field("root", &self.root.as_str())
            .field(
                "storage_options",
                &self.storage_options.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Lake {
    /// Opens a lake at `root`: a local path, a `file://` URL or `s3://bucket/prefix`. A local
    /// root folder is created if missing. `storage_options` go to the object store as-is (for
    /// S3, `medallion_objects::ObjectStore::delta_storage_options` gives them).
    pub fn open(root: &str, storage_options: HashMap<String, String>) -> Result<Lake> {
        static S3_HANDLERS: std::sync::Once = std::sync::Once::new();
        S3_HANDLERS.call_once(|| deltalake::aws::register_handlers(None));
        Ok(Lake {
            root: Arc::new(parse_root(root)?),
            storage_options: Arc::new(storage_options),
        })
    }

    /// Opens a lake at `root` with storage options from the shared S3 settings when the root
    /// is on S3 (`s3://bucket/prefix`), so the lake and the services' own S3 calls agree. An S3
    /// lake's bucket must exist and be reachable with the credentials at hand.
    pub async fn connect(root: &str, s3: &medallion_objects::S3Options) -> Result<Lake> {
        if medallion_objects::S3Url::is_s3(root) {
            let url = medallion_objects::S3Url::parse(root).map_err(|e| Error::InvalidRoot {
                root: root.to_string(),
                reason: e.to_string(),
            })?;
            let store = medallion_objects::ObjectStore::connect(s3.clone()).await;
            store
                .check_bucket(&url.bucket)
                .await
                .map_err(|e| Error::InvalidRoot {
                    root: root.to_string(),
                    reason: e.to_string(),
                })?;
            return Lake::open(root, store.delta_storage_options());
        }
        Lake::open(root, HashMap::new())
    }

    /// Whether the lake is on object storage rather than a local folder.
    pub fn is_remote(&self) -> bool {
        self.root.scheme() != "file"
    }

    /// The lake root URL (always ends with `/`).
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// The URL of a table's folder: `<root>/<layer>/<table>/`.
    pub fn table_url(&self, layer: Layer, table: &str) -> Url {
        let mut url = (*self.root).clone();
        // The root is checked to be a base URL in `open`, so this cannot fail.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .push(layer.as_str())
                .push(table)
                .push("");
        }
        url
    }

    /// The table at its latest version, or at `version` if given (an error if that version
    /// does not exist); `None` if the table has never been committed.
    pub async fn snapshot(
        &self,
        layer: Layer,
        table: &str,
        version: Option<i64>,
    ) -> Result<Option<TableSnapshot>> {
        let ctx = Ctx::new(layer, table)?;
        let mut delta = self.delta_table(&ctx)?;
        if !delta
            .verify_deltatable_existence()
            .await
            .map_err(ctx.delta("check table exists"))?
        {
            return Ok(None);
        }
        match version {
            Some(v) => {
                let v = u64::try_from(v).map_err(|_| {
                    ctx.delta("load version")(DeltaTableError::Generic(format!(
                        "negative version {v}"
                    )))
                })?;
                delta
                    .load_version(v)
                    .await
                    .map_err(ctx.delta("load version"))?
            }
            None => delta.load().await.map_err(ctx.delta("load"))?,
        }
        TableSnapshot::from_table(ctx, delta).map(Some)
    }

    /// Names of the tables in `layer` that exist (have a Delta log), sorted.
    pub async fn list_tables(&self, layer: Layer) -> Result<Vec<String>> {
        let mut layer_url = (*self.root).clone();
        if let Ok(mut segments) = layer_url.path_segments_mut() {
            segments.pop_if_empty().push(layer.as_str()).push("");
        }
        let store_error = |source| Error::Store {
            location: layer_url.to_string(),
            source,
        };
        let store = DeltaTableBuilder::from_url(layer_url.clone())
            .and_then(|b| {
                b.with_storage_options((*self.storage_options).clone())
                    .build()
            })
            .map_err(|source| Error::Delta {
                layer,
                table: String::new(),
                op: "open layer",
                source: Box::new(source),
            })?
            .object_store();
        let listing = match store.list_with_delimiter(None).await {
            Ok(listing) => listing,
            Err(deltalake::ObjectStoreError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(store_error(e)),
        };
        let mut tables = Vec::new();
        for prefix in listing.common_prefixes {
            let Some(name) = prefix.filename() else {
                continue;
            };
            let Ok(ctx) = Ctx::new(layer, name) else {
                continue;
            };
            let delta = self.delta_table(&ctx)?;
            if delta
                .verify_deltatable_existence()
                .await
                .map_err(ctx.delta("check table exists"))?
            {
                tables.push(ctx.table);
            }
        }
        tables.sort();
        Ok(tables)
    }

    /// Starts writing `table` with batches of `schema`; nothing is visible until
    /// [`TableWriter::commit`].
    pub async fn writer(
        &self,
        layer: Layer,
        table: &str,
        schema: SchemaRef,
    ) -> Result<TableWriter> {
        let ctx = Ctx::new(layer, table)?;
        TableWriter::new(self.clone(), ctx, schema)
    }

    /// Streams one data file of `snapshot` in batches of at most `batch_size` rows, typed
    /// as `snapshot.schema`; decoding runs on a blocking thread and memory stays bounded.
    pub fn read_file(
        &self,
        snapshot: &TableSnapshot,
        file: &DataFile,
        batch_size: usize,
    ) -> BoxStream<'static, Result<RecordBatch>> {
        read::read_file(snapshot, file, batch_size, None)
    }

    /// Like [`Lake::read_file`], decoding only `columns` (in table order; unknown names are
    /// ignored), so readers that need a few columns do not pay for the rest.
    pub fn read_file_columns(
        &self,
        snapshot: &TableSnapshot,
        file: &DataFile,
        batch_size: usize,
        columns: &[String],
    ) -> BoxStream<'static, Result<RecordBatch>> {
        read::read_file(
            snapshot,
            file,
            batch_size,
            Some(snapshot.column_indices(columns)),
        )
    }

    /// An unloaded handle on a table's log store.
    fn delta_table(&self, ctx: &Ctx) -> Result<DeltaTable> {
        DeltaTableBuilder::from_url(self.table_url(ctx.layer, &ctx.table))
            .and_then(|b| {
                b.with_storage_options((*self.storage_options).clone())
                    .build()
            })
            .map_err(ctx.delta("open"))
    }
}

/// One committed version of a table: its schema and live data files.
#[derive(Clone)]
pub struct TableSnapshot {
    /// Layer of the table.
    pub layer: Layer,
    /// Table name.
    pub table: String,
    /// Delta version of this snapshot.
    pub version: i64,
    /// Arrow schema of the table (strings come back as `Utf8`, whatever was written).
    pub schema: SchemaRef,
    /// Live data files of this version that readers see.
    pub files: Vec<DataFile>,
    /// Live data files tagged [`TAG_HIDDEN`]: kept for the table's writer (e.g. delete
    /// tombstones of a change table), never served to readers.
    pub hidden: Vec<DataFile>,
    delta: DeltaTable,
}

impl fmt::Debug for TableSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableSnapshot")
            .field("layer", &self.layer)
            .field("table", &self.table)
            .field("version", &self.version)
            .field("schema", &self.schema)
            .field("files", &self.files)
            .finish()
    }
}

impl TableSnapshot {
    fn from_table(ctx: Ctx, delta: DeltaTable) -> Result<TableSnapshot> {
        let state = delta.snapshot().map_err(ctx.delta("read snapshot"))?;
        let eager = state.snapshot();
        let (hidden, files): (Vec<DataFile>, Vec<DataFile>) = eager
            .try_log_data()
            .map_err(ctx.delta("list files"))?
            .iter()
            .map(|view| {
                // Tags are only exposed through the (deprecated) Add conversion.
                #[allow(deprecated)]
                let tags = view.add_action().tags.unwrap_or_default();
                DataFile {
                    path: view.path().into_owned(),
                    size: view.size(),
                    rows: view.num_records().and_then(|n| i64::try_from(n).ok()),
                    tags: tags
                        .into_iter()
                        .filter_map(|(k, v)| v.map(|v| (k, v)))
                        .collect(),
                }
            })
            .partition(DataFile::is_hidden);
        let version = version_i64(state.version());
        let schema = eager.arrow_schema();
        Ok(TableSnapshot {
            layer: ctx.layer,
            table: ctx.table,
            version,
            schema,
            files,
            hidden,
            delta,
        })
    }

    /// Rows in the snapshot, or `None` if some file has no row count in its stats.
    pub fn total_rows(&self) -> Option<i64> {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// Positions of `columns` in the table schema, in table order; unknown names are skipped.
    pub fn column_indices(&self, columns: &[String]) -> Vec<usize> {
        (0..self.schema.fields().len())
            .filter(|&i| columns.iter().any(|c| c == self.schema.field(i).name()))
            .collect()
    }

    /// The schema of the table restricted to `columns` (in table order).
    pub fn projected_schema(&self, columns: &[String]) -> SchemaRef {
        let indices = self.column_indices(columns);
        // Indices come from this schema, so the projection cannot fail.
        Arc::new(
            self.schema
                .project(&indices)
                .unwrap_or_else(|_| (*self.schema).clone()),
        )
    }

    /// The visible files of this snapshot that `older` (an earlier version) did not have:
    /// what an append-only table gained since then.
    pub fn files_added_since(&self, older: &TableSnapshot) -> Vec<DataFile> {
        let before: std::collections::HashSet<&str> =
            older.files.iter().map(|f| f.path.as_str()).collect();
        self.files
            .iter()
            .filter(|f| !before.contains(f.path.as_str()))
            .cloned()
            .collect()
    }

    /// Bytes of parquet data in the snapshot.
    pub fn total_bytes(&self) -> i64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The last transaction version committed by `app_id` as of this snapshot, if any.
    pub async fn app_version(&self, app_id: &str) -> Result<Option<i64>> {
        let ctx = Ctx {
            layer: self.layer,
            table: self.table.clone(),
        };
        self.delta
            .snapshot()
            .map_err(ctx.delta("read snapshot"))?
            .transaction_version(self.delta.log_store().as_ref(), app_id)
            .await
            .map_err(ctx.delta("read app transaction"))
    }
}

/// One parquet data file of a snapshot, as recorded by its Add action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// Path relative to the table root.
    pub path: String,
    /// Size in bytes.
    pub size: i64,
    /// Row count from the Add action's `numRecords` statistic.
    pub rows: Option<i64>,
    /// Tags given to [`TableWriter::finish_part`] (e.g. the source file it came from).
    pub tags: BTreeMap<String, String>,
}

impl DataFile {
    /// Whether the file is tagged [`TAG_HIDDEN`].
    pub fn is_hidden(&self) -> bool {
        self.tags.get(TAG_HIDDEN).is_some_and(|v| v == "true")
    }
}

/// Data-file tag (value `true`) of files readers never see.
pub const TAG_HIDDEN: &str = "medallion.hidden";

/// Layer and validated table name, carried for error context.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) layer: Layer,
    pub(crate) table: String,
}

impl Ctx {
    /// The refusal of a commit that continues from `expected` where the table holds `found`.
    pub(crate) fn moved(&self, app_id: &str, expected: Option<i64>, found: Option<i64>) -> Error {
        Error::TransactionMoved {
            layer: self.layer,
            table: self.table.clone(),
            app_id: app_id.to_string(),
            expected,
            found,
        }
    }

    fn new(layer: Layer, table: &str) -> Result<Ctx> {
        let invalid = |reason| Error::InvalidTableName {
            layer,
            name: table.to_string(),
            reason,
        };
        let mut chars = table.chars();
        match chars.next() {
            None => return Err(invalid("empty")),
            Some(c) if !c.is_ascii_alphanumeric() => {
                return Err(invalid("must start with a letter or digit"));
            }
            Some(_) => {}
        }
        if table.len() > 200 {
            return Err(invalid("longer than 200 characters"));
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return Err(invalid(
                "only ASCII letters, digits, '_', '-' and '.' are allowed",
            ));
        }
        Ok(Ctx {
            layer,
            table: table.to_string(),
        })
    }

    /// Wraps a deltalake error with this table and the operation.
    pub(crate) fn delta(&self, op: &'static str) -> impl FnOnce(DeltaTableError) -> Error + '_ {
        move |source| Error::Delta {
            layer: self.layer,
            table: self.table.clone(),
            op,
            source: Box::new(source),
        }
    }

    /// Converts an Arrow schema to a Delta schema.
    pub(crate) fn kernel_schema(&self, schema: &SchemaRef) -> Result<StructType> {
        schema
            .as_ref()
            .try_into_kernel()
            .map_err(|source| Error::Schema {
                layer: self.layer,
                table: self.table.clone(),
                source,
            })
    }
}

/// Delta versions are u64 in deltalake; ours are i64 (as in the Delta protocol).
pub(crate) fn version_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn parse_root(root: &str) -> Result<Url> {
    let invalid = |reason: String| Error::InvalidRoot {
        root: root.to_string(),
        reason,
    };
    if root.trim().is_empty() {
        return Err(invalid("empty".into()));
    }
    // One-letter schemes are Windows drive letters, i.e. local paths.
    let url = match Url::parse(root) {
        Ok(url) if url.scheme().len() > 1 => url,
        _ => Url::from_file_path(std::path::absolute(root).map_err(|e| invalid(e.to_string()))?)
            .map_err(|()| invalid("not an absolute local path".into()))?,
    };
    if url.scheme() == "file" {
        let path = url
            .to_file_path()
            .map_err(|()| invalid("not a local path".into()))?;
        std::fs::create_dir_all(&path).map_err(|source| Error::CreateRoot {
            path: path.display().to_string(),
            source,
        })?;
        let path = path.canonicalize().map_err(|source| Error::CreateRoot {
            path: path.display().to_string(),
            source,
        })?;
        return Url::from_directory_path(&path)
            .map_err(|()| invalid("not an absolute local path".into()));
    }
    if url.cannot_be_a_base() {
        return Err(invalid("not a hierarchical URL".into()));
    }
    let mut url = url;
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
mod tests;
