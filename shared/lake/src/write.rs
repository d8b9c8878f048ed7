//! Streaming writes that land in one idempotent Delta commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{
    CommitBuilder, CommitProperties, TableReference, TransactionError,
};
use deltalake::kernel::{Action, Add, MetadataExt as _, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTableError, Path};
use futures::StreamExt as _;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use tracing::{Instrument as _, info, warn};

use crate::{Ctx, Error, Lake, Result, TARGET_FILE_SIZE, version_i64};

/// How a commit relates to the table's current content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteMode {
    /// Add the new files; the schema must match the table's.
    Append,
    /// Append, and remove these data files (paths as in [`crate::DataFile::path`]) in the same
    /// commit: replaces the rows of re-delivered source files atomically.
    Replace(BTreeSet<String>),
    /// Replace every file of the current version (and the schema, if it changed).
    Overwrite,
}

/// What one commit records besides its data.
#[derive(Debug, Clone)]
pub struct CommitSpec {
    /// Append or overwrite.
    pub mode: WriteMode,
    /// Application id for the Delta transaction action (e.g. the task's stable id).
    pub app_id: String,
    /// Monotonic version for `app_id`; a commit is skipped if the table already has >= this.
    pub txn_version: i64,
    /// Extra fields for the commitInfo action (e.g. `run_id`, `pipeline`).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Further application transactions recorded in the same commit (e.g. the last offset of
    /// each Kafka partition the rows came from). Two commits carrying the same app id conflict,
    /// so at most one of them lands.
    pub more_transactions: Vec<(String, i64)>,
    /// Application transactions the commit continues from, each as it must still stand
    /// (`None`: never committed). If another writer moved one since, the commit fails with
    /// [`Error::TransactionMoved`]; a writer racing this very commit loses the conflict on the
    /// same app ids. Fences a Kafka reader whose partitions were handed to another reader.
    pub expect_transactions: Vec<(String, Option<i64>)>,
}

/// The result of [`TableWriter::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new table version was committed.
    Committed {
        /// The new version.
        version: i64,
        /// Rows written.
        rows: i64,
        /// Parquet bytes written.
        bytes: i64,
        /// Data files written.
        files: usize,
    },
    /// The table already had this app transaction; nothing was committed.
    AlreadyCommitted {
        /// The table's current version.
        version: i64,
    },
}

/// Streams batches into parquet files of one table and commits them once.
///
/// Dropping it without [`commit`](Self::commit) leaves the table unchanged; files already
/// finished are unreferenced orphans.
pub struct TableWriter {
    lake: Lake,
    ctx: Ctx,
    schema: SchemaRef,
    /// Data file writers, each encoding on its own task; batches go to one of them at a time.
    encoders: Vec<Encoder>,
    /// Most encoders this writer may run (see [`TableWriter::encode_in_parallel`]).
    max_encoders: usize,
    /// The encoder taking batches now, and the rows it has taken since it started taking them.
    current: usize,
    current_rows: usize,
    adds: Vec<Add>,
    rows: i64,
}

/// Rows one encoder takes before the next one takes over: whole row groups per data file,
/// and a table smaller than this stays in one file.
pub(crate) const ENCODER_RUN_ROWS: usize = 1 << 20;

/// Largest dictionary of a column chunk in silver, gold and quarantine files; past it the
/// column's remaining values in the row group are written plain. Low-cardinality columns
/// (flags, modes, dates, small amounts) stay well under it; a near-unique column (keys, prices,
/// comments) gives up after a few thousand values, not after the 1 MiB of Parquet's default,
/// which both interned each of those values and wrote a dictionary page that few rows used.
/// Measured on TPC-H SF1's `silver.lineitem`: 133 MB instead of 138, written about 0.45 s
/// faster.
pub(crate) const DICTIONARY_PAGE_LIMIT: usize = 128 * 1024;

/// One data file writer driven by its own task, so that several encode at once.
struct Encoder {
    jobs: tokio::sync::mpsc::Sender<EncoderJob>,
    /// Taken when the task is found stopped; why it stopped is then kept in `stopped`.
    task: Option<tokio::task::JoinHandle<std::result::Result<(), DeltaTableError>>>,
    stopped: Option<String>,
}

enum EncoderJob {
    Write(RecordBatch),
    /// Close the open files and reply with their Add actions.
    Flush(tokio::sync::oneshot::Sender<std::result::Result<Vec<Add>, DeltaTableError>>),
}

impl Encoder {
    fn spawn(mut writer: RecordBatchWriter) -> Encoder {
        // One batch waiting: the producer stays at most a batch ahead of each encoder.
        let (jobs, mut queue) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            while let Some(job) = queue.recv().await {
                match job {
                    EncoderJob::Write(batch) => writer.write(batch).await?,
                    EncoderJob::Flush(reply) => {
                        let _ = reply.send(writer.flush().await);
                    }
                }
            }
            Ok(())
        });
        Encoder {
            jobs,
            task: Some(task),
            stopped: None,
        }
    }

    /// The error that stopped the encoder's task (its queue is closed); the first call
    /// returns the task's own error, later ones its message.
    async fn failure(&mut self) -> DeltaTableError {
        if let Some(task) = self.task.take() {
            let error = match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => DeltaTableError::Generic("the data file writer stopped".into()),
                Err(e) => DeltaTableError::Generic(format!("the data file writer failed: {e}")),
            };
            self.stopped = Some(error.to_string());
            return error;
        }
        DeltaTableError::Generic(
            self.stopped
                .clone()
                .unwrap_or_else(|| "the data file writer stopped".into()),
        )
    }

    async fn write(&mut self, batch: RecordBatch) -> std::result::Result<(), DeltaTableError> {
        if self.jobs.send(EncoderJob::Write(batch)).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::result::Result<Vec<Add>, DeltaTableError> {
        let (reply, adds) = tokio::sync::oneshot::channel();
        if self.jobs.send(EncoderJob::Flush(reply)).await.is_err() {
            return Err(self.failure().await);
        }
        match adds.await {
            Ok(adds) => adds,
            Err(_) => Err(self.failure().await),
        }
    }
}

impl std::fmt::Debug for TableWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableWriter")
            .field("layer", &self.ctx.layer)
            .field("table", &self.ctx.table)
            .field("files", &self.adds.len())
            .field("rows", &self.rows)
            .finish()
    }
}

impl TableWriter {
    pub(crate) fn new(lake: Lake, ctx: Ctx, schema: SchemaRef) -> Result<TableWriter> {
        // Fail early on types Delta cannot store.
        ctx.kernel_schema(&schema)?;
        let first = Self::open_file_writer(&lake, &ctx, schema)?;
        // The writer normalises some types (e.g. ms timestamps to us); commit its schema.
        let schema = first.arrow_schema();
        Ok(TableWriter {
            lake,
            ctx,
            schema,
            encoders: vec![Encoder::spawn(first)],
            max_encoders: 1,
            current: 0,
            current_rows: 0,
            adds: Vec::new(),
            rows: 0,
        })
    }

    fn open_file_writer(lake: &Lake, ctx: &Ctx, schema: SchemaRef) -> Result<RecordBatchWriter> {
        let url = lake.table_url(ctx.layer, &ctx.table);
        let writer = RecordBatchWriter::try_new(
            url.as_str(),
            schema,
            None,
            Some((*lake.storage_options).clone()),
        )
        .map_err(ctx.delta("open writer"))?
        .with_target_file_size(TARGET_FILE_SIZE);
        let properties = WriterProperties::builder();
        // Bronze is raw text that nobody filters by range and that the refiner reads whole, so
        // its files carry no column statistics (every string's min and max) and no dictionaries
        // (a hash lookup per value): both cost the ingestor more than the rest of the encoding.
        // LZ4_RAW still compresses the repeated values of plain pages, and it compresses and
        // decompresses faster than Snappy, on the ingestor's path both ways: it writes bronze,
        // then decodes it again to serve the refiner (TPC-H SF1: 454 MB against Snappy's
        // 436 MB, and the refiner's read of `bronze.lineitem` about 0.3 s shorter).
        let properties = if ctx.layer == crate::Layer::Bronze {
            properties
                .set_compression(Compression::LZ4_RAW)
                .set_statistics_enabled(EnabledStatistics::None)
                .set_dictionary_enabled(false)
        } else {
            properties
                .set_compression(Compression::SNAPPY)
                .set_dictionary_page_size_limit(DICTIONARY_PAGE_LIMIT)
        };
        Ok(writer.with_writer_properties(properties.build()))
    }

    /// Lets up to `encoders` data files be encoded at once, on as many tasks: a table of
    /// more than a million rows then has every million rows encoded while the next million is
    /// produced. Data files are then not in the order the rows were written.
    pub fn encode_in_parallel(&mut self, encoders: usize) {
        self.max_encoders = encoders.max(1);
    }

    /// The schema the data files are written with (the input schema, Delta-normalised).
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Streams one batch into the current parquet file (rolling at [`TARGET_FILE_SIZE`]); it is
    /// encoded while the caller goes on (a failure is returned by a later call).
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        if self.current_rows >= ENCODER_RUN_ROWS && self.max_encoders > 1 {
            if self.encoders.len() < self.max_encoders {
                let writer = Self::open_file_writer(&self.lake, &self.ctx, self.schema.clone())?;
                self.encoders.push(Encoder::spawn(writer));
                self.current = self.encoders.len() - 1;
            } else {
                self.current = (self.current + 1) % self.encoders.len();
            }
            self.current_rows = 0;
        }
        self.encoders[self.current]
            .write(batch)
            .await
            .map_err(self.ctx.delta("write batch"))?;
        self.current_rows += rows;
        self.rows += i64::try_from(rows).unwrap_or(i64::MAX);
        Ok(())
    }

    /// Closes the files written since the last part and tags their Add actions with `tags`
    /// (e.g. which source file they came from).
    pub async fn finish_part(&mut self, tags: BTreeMap<String, String>) -> Result<()> {
        // The next part starts a fresh run, so a source file of fewer rows than a run is
        // written by one encoder, in order.
        self.current_rows = 0;
        let mut adds = Vec::new();
        for encoder in &mut self.encoders {
            adds.extend(
                encoder
                    .flush()
                    .await
                    .map_err(self.ctx.delta("finish data files"))?,
            );
        }
        if !tags.is_empty() {
            let tags: HashMap<String, Option<String>> =
                tags.into_iter().map(|(k, v)| (k, Some(v))).collect();
            for add in &mut adds {
                add.tags = Some(tags.clone());
            }
        }
        self.adds.extend(adds);
        Ok(())
    }

    /// Finishes the open part (untagged) and makes everything visible in one Delta commit,
    /// unless the table already holds `app_id` at `txn_version` or later.
    pub async fn commit(self, spec: CommitSpec) -> Result<CommitOutcome> {
        let span = tracing::info_span!(
            "delta.commit",
            layer = %self.ctx.layer,
            table = %self.ctx.table,
            rows = self.rows,
            app_id = %spec.app_id,
            txn_version = spec.txn_version,
            version = tracing::field::Empty,
            bytes = tracing::field::Empty,
            committed = tracing::field::Empty,
        );
        let outcome = self.commit_in_span(spec).instrument(span.clone()).await?;
        match &outcome {
            CommitOutcome::Committed { version, bytes, .. } => {
                span.record("version", version);
                span.record("bytes", bytes);
                span.record("committed", true);
            }
            CommitOutcome::AlreadyCommitted { version } => {
                span.record("version", version);
                span.record("committed", false);
            }
        }
        Ok(outcome)
    }

    async fn commit_in_span(mut self, spec: CommitSpec) -> Result<CommitOutcome> {
        self.finish_part(BTreeMap::new()).await?;
        let ctx = self.ctx.clone();
        let write_schema = ctx.kernel_schema(&self.schema)?;
        let mut delta = self.lake.delta_table(&ctx)?;
        let exists = delta
            .verify_deltatable_existence()
            .await
            .map_err(ctx.delta("check table exists"))?;

        let now = Some(chrono::Utc::now().timestamp_millis());
        let mut properties = CommitProperties::default()
            .with_metadata(spec.metadata.clone())
            .with_application_transaction(Transaction::new_with_last_update(
                &spec.app_id,
                spec.txn_version,
                now,
            ));
        for (app_id, version) in &spec.more_transactions {
            properties = properties.with_application_transaction(
                Transaction::new_with_last_update(app_id, *version, now),
            );
        }
        let data: Vec<Action> = self.adds.iter().cloned().map(Action::Add).collect();

        let mut created = None;
        if !exists {
            // A table gone since the writer read it holds none of the expected transactions.
            if let Some((app_id, expected)) =
                spec.expect_transactions.iter().find(|(_, v)| v.is_some())
            {
                self.discard_files().await;
                return Err(ctx.moved(app_id, *expected, None));
            }
            // Protocol, metadata, data and the app transaction all land in version 0.
            let result = CreateBuilder::new()
                .with_log_store(delta.log_store())
                .with_table_name(ctx.table.clone())
                .with_columns(write_schema.fields().cloned())
                .with_save_mode(SaveMode::ErrorIfExists)
                .with_actions(data.clone())
                // No retries: on losing a race for version 0, deltalake 1.1.3 would re-read the
                // winner's version as its base and commit on top of it without any conflict
                // check (duplicating data). Failing lets us re-check the app transaction below.
                .with_commit_properties(properties.clone().with_max_retries(0))
                .await;
            match result {
                Ok(table) => created = Some(table.version().unwrap_or(0)),
                // Someone (perhaps this very task, retried) created the table meanwhile:
                // fall through to the existing-table path, which checks the app transaction.
                Err(e)
                    if delta
                        .verify_deltatable_existence()
                        .await
                        .map_err(ctx.delta("check table exists"))? =>
                {
                    warn!(layer = %ctx.layer, table = %ctx.table, error = %e,
                        "table created concurrently; committing against it");
                }
                Err(e) => return Err(ctx.delta("create table")(e)),
            }
        }
        let version = if let Some(version) = created {
            version
        } else {
            delta.load().await.map_err(ctx.delta("load"))?;
            let log_store = delta.log_store();
            let state = delta.snapshot().map_err(ctx.delta("read snapshot"))?;
            let current = version_i64(state.version());
            for (app_id, expected) in &spec.expect_transactions {
                let found = state
                    .transaction_version(log_store.as_ref(), app_id)
                    .await
                    .map_err(ctx.delta("read app transaction"))?;
                if found != *expected {
                    self.discard_files().await;
                    return Err(ctx.moved(app_id, *expected, found));
                }
            }
            let committed = state
                .transaction_version(log_store.as_ref(), &spec.app_id)
                .await
                .map_err(ctx.delta("read app transaction"))?;
            if committed.is_some_and(|v| v >= spec.txn_version) {
                info!(
                    layer = %ctx.layer, table = %ctx.table, app_id = %spec.app_id,
                    txn_version = spec.txn_version, version = current,
                    "already committed; discarding written files"
                );
                self.discard_files().await;
                return Ok(CommitOutcome::AlreadyCommitted { version: current });
            }

            let table_schema = state.schema();
            let mut actions = data;
            let save_mode = match &spec.mode {
                WriteMode::Append | WriteMode::Replace(_) => {
                    if !append_compatible(&table_schema, &write_schema) {
                        return Err(Error::SchemaMismatch {
                            layer: ctx.layer,
                            table: ctx.table.clone(),
                            table_schema: render(&table_schema),
                            write_schema: render(&write_schema),
                        });
                    }
                    if let WriteMode::Replace(paths) = &spec.mode {
                        let live = state
                            .snapshot()
                            .try_log_data()
                            .map_err(ctx.delta("list files"))?;
                        actions.extend(
                            live.iter()
                                .filter(|f| paths.contains(f.path().as_ref()))
                                .map(|f| Action::Remove(f.remove_action(true))),
                        );
                    }
                    SaveMode::Append
                }
                WriteMode::Overwrite => {
                    if *table_schema != write_schema {
                        let metadata = state
                            .metadata()
                            .clone()
                            .with_schema(&write_schema)
                            .map_err(|e| ctx.delta("replace schema")(e.into()))?;
                        actions.push(Action::Metadata(metadata));
                    }
                    let live = state
                        .snapshot()
                        .try_log_data()
                        .map_err(ctx.delta("list files"))?;
                    actions.extend(live.iter().map(|f| Action::Remove(f.remove_action(true))));
                    SaveMode::Overwrite
                }
            };
            let operation = DeltaOperation::Write {
                mode: save_mode,
                partition_by: None,
                predicate: None,
            };
            let result = CommitBuilder::from(properties)
                .with_actions(actions)
                .build(Some(state as &dyn TableReference), log_store, operation)
                .await;
            match result {
                Ok(finalized) => finalized.version(),
                Err(e) => {
                    // A conflict means our commit did not land (so our files are unused); if
                    // the winner was this same task, that is an idempotent success.
                    if matches!(
                        e,
                        DeltaTableError::Transaction {
                            source: TransactionError::CommitConflict(_)
                        }
                    ) && let Some(current) = self.committed_version(&spec).await?
                    {
                        self.discard_files().await;
                        return Ok(CommitOutcome::AlreadyCommitted { version: current });
                    }
                    return Err(ctx.delta("commit")(e));
                }
            }
        };

        let version = version_i64(version);
        let bytes = self.adds.iter().map(|a| a.size).sum();
        info!(
            layer = %ctx.layer, table = %ctx.table, version, rows = self.rows, bytes,
            files = self.adds.len(), mode = ?spec.mode, app_id = %spec.app_id,
            txn_version = spec.txn_version, "committed"
        );
        Ok(CommitOutcome::Committed {
            version,
            rows: self.rows,
            bytes,
            files: self.adds.len(),
        })
    }

    /// The table's current version if it already holds `spec`'s app transaction.
    // `&mut self`: the writer is Send but not Sync, and this future must stay Send.
    async fn committed_version(&mut self, spec: &CommitSpec) -> Result<Option<i64>> {
        let ctx = &self.ctx;
        let mut delta = self.lake.delta_table(ctx)?;
        delta.load().await.map_err(ctx.delta("load"))?;
        let state = delta.snapshot().map_err(ctx.delta("read snapshot"))?;
        let committed = state
            .transaction_version(delta.log_store().as_ref(), &spec.app_id)
            .await
            .map_err(ctx.delta("read app transaction"))?;
        Ok(committed
            .is_some_and(|v| v >= spec.txn_version)
            .then(|| version_i64(state.version())))
    }

    /// Best-effort removal of this writer's files after a skipped commit.
    async fn discard_files(&mut self) {
        let store = match self.lake.delta_table(&self.ctx) {
            Ok(delta) => delta.object_store(),
            Err(e) => {
                warn!(error = %e, "cannot reach table to delete unused data files");
                return;
            }
        };
        let paths: Vec<deltalake::logstore::object_store::Result<Path>> = self
            .adds
            .drain(..)
            .map(|a| Ok(Path::parse(&a.path).unwrap_or_else(|_| Path::from(a.path.as_str()))))
            .collect();
        let mut deleted = store.delete_stream(futures::stream::iter(paths).boxed());
        while let Some(result) = deleted.next().await {
            if let Err(e) = result {
                warn!(
                    layer = %self.ctx.layer, table = %self.ctx.table, error = %e,
                    "could not delete unused data file (it stays an orphan)"
                );
            }
        }
    }
}

/// Append is allowed when every written column exists in the table with the same type,
/// and a non-nullable table column is not fed from a nullable one.
fn append_compatible(table: &StructType, write: &StructType) -> bool {
    table.fields().len() == write.fields().len()
        && write.fields().all(|w| {
            table.field(w.name()).is_some_and(|t| {
                t.data_type() == w.data_type() && (t.is_nullable() || !w.is_nullable())
            })
        })
}

fn render(schema: &StructType) -> String {
    schema
        .fields()
        .map(|f| {
            format!(
                "{}: {}{}",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "" } else { " not null" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
