//! One silver task: read the inputs (bronze over Flight, silver from our own lake), refine,
//! commit quarantine then silver. Skips the work when the inputs have not moved.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use futures::{StreamExt, stream::BoxStream};
use medallion_flight::{BatchStream, FlightReader};
use medallion_lake::{Lake, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{Layer, SilverSpec, TableRef};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, TaskRunner};
use polars::prelude::DataFrame;
use tokio::task::JoinHandle;

use crate::buckets::{BucketPlan, Spill, SpilledBuckets};
use crate::transform::{self, Kept, RowOutput, RowStage, Staged};

pub struct Refiner {
    pub lake: Lake,
    pub bronze_flight: FlightReader,
    /// Folder of the bucket files of tables refined bucket by bucket.
    pub spool_dir: PathBuf,
    /// Input rows per bucket: a de-duplicated or joined table with more input rows than this
    /// is refined in buckets, so it is never in memory whole.
    pub bucket_rows: u64,
}

/// Input rows gathered before the row stage runs on them: large enough that polars
/// parallelises each chunk well, small enough that the raw (string) rows stay a small part of
/// the task's memory.
const CHUNK_ROWS: usize = 256 * 1024;

impl Refiner {
    /// Opens one input at the version the upstream task reported, as a stream of batches.
    async fn open_input(&self, task: &TaskRequest, table: &TableRef) -> Result<Input, TaskError> {
        let tickets = task.input_tickets(table)?;
        match table.layer {
            Layer::Bronze => Ok(Input::Flight(self.bronze_flight.stream(&tickets))),
            // Silver is this service's own layer: read it from the lake directly.
            Layer::Silver => {
                let version = tickets.first().map(|t| t.version);
                let snapshot = self
                    .lake
                    .snapshot(Layer::Silver, &table.name, version)
                    .await
                    .map_err(TaskError::internal)?
                    .ok_or_else(|| TaskError::internal(format!("{table} is missing")))?;
                let columns = task.pipeline.columns_read(&task.table, table);
                let schema = match &columns {
                    Some(c) => snapshot.projected_schema(c),
                    None => snapshot.schema.clone(),
                };
                let (lake, files) = (self.lake.clone(), snapshot.files.clone());
                let batches = futures::stream::iter(files)
                    .map(move |file| match &columns {
                        Some(c) => lake.read_file_columns(&snapshot, &file, 64 * 1024, c),
                        None => lake.read_file(&snapshot, &file, 64 * 1024),
                    })
                    .flatten()
                    .boxed();
                Ok(Input::Lake { batches, schema })
            }
            other => Err(TaskError::Invalid(format!(
                "silver cannot read {other} tables"
            ))),
        }
    }

    /// Commits the quarantined rows, before silver: if the silver commit then fails, the retry
    /// finds this one done. Returns the rows quarantined.
    async fn commit_quarantine(
        &self,
        task: &TaskRequest,
        quarantine: Option<&DataFrame>,
        progress: &Progress,
    ) -> Result<u64, TaskError> {
        let Some(q) = quarantine else { return Ok(0) };
        progress.report("writing quarantine", q.height() as u64, 0, true);
        let table = TableRef::new(Layer::Quarantine, &task.table.name);
        let commit = task.commit_spec(&table, WriteMode::Overwrite);
        medallion_frames::commit_frame(&self.lake, &table, q, task.input_tags(), commit)
            .await
            .map_err(TaskError::internal)?;
        Ok(q.height() as u64)
    }

    /// De-duplicates and joins the spilled rows one bucket at a time, streaming each bucket's
    /// result into the table's data files; the next bucket is refined while the current one is
    /// written. Returns the writer with every file finished and nothing committed.
    #[allow(clippy::too_many_arguments)]
    async fn write_buckets(
        &self,
        task: &TaskRequest,
        spec: Arc<SilverSpec>,
        plan: &BucketPlan,
        spilled: SpilledBuckets,
        joined: Option<DataFrame>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<medallion_lake::TableWriter, TaskError> {
        let name = spec.name.clone();
        let failed =
            move |e: crate::buckets::Error| TaskError::Internal(format!("silver.{name}: {e}"));
        let joined: Arc<Vec<DataFrame>> = Arc::new(match joined {
            Some(df) => {
                let (keys, buckets, spread) =
                    (plan.join_keys.clone(), plan.buckets, plan.spread_nulls);
                tokio::task::spawn_blocking(move || {
                    crate::buckets::split_frame(&df, &keys, buckets, spread)
                })
                .await
                .map_err(TaskError::internal)?
                .map_err(&failed)?
            }
            None => Vec::new(),
        });
        let spilled = Arc::new(spilled);
        let refine_bucket = |bucket: u32| {
            let (spec, spilled, joined, failed) = (
                spec.clone(),
                spilled.clone(),
                joined.clone(),
                failed.clone(),
            );
            tokio::task::spawn_blocking(move || -> Result<DataFrame, TaskError> {
                let rows = spilled.read(bucket).map_err(failed)?;
                transform::dedupe_and_join(&spec, rows, joined.get(bucket as usize))
            })
        };
        let total = plan.buckets;
        let mut writer: Option<medallion_lake::TableWriter> = None;
        let mut written = 0u64;
        let mut next = refine_bucket(0);
        for bucket in 0..total {
            let df = tokio::select! {
                r = &mut next => r.map_err(TaskError::internal)??,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            if bucket + 1 < total {
                next = refine_bucket(bucket + 1);
            }
            let (schema, batches) =
                medallion_frames::lake_batches(&df).map_err(TaskError::internal)?;
            // Made on the first bucket, empty or not, so an empty table still gets its columns.
            let writer = match &mut writer {
                Some(w) => w,
                None => writer.insert(
                    self.lake
                        .writer(Layer::Silver, &task.table.name, schema)
                        .await
                        .map_err(TaskError::internal)?,
                ),
            };
            for batch in batches {
                writer.write(batch).await.map_err(TaskError::internal)?;
            }
            written += df.height() as u64;
            progress.report(
                &format!("writing bucket {} of {total}", bucket + 1),
                written,
                0,
                bucket == 0,
            );
        }
        let mut writer =
            writer.ok_or_else(|| TaskError::internal("a bucketed table has no buckets"))?;
        writer
            .finish_part(task.input_tags())
            .await
            .map_err(TaskError::internal)?;
        Ok(writer)
    }

    /// Reads one input whole.
    async fn read_input(
        &self,
        task: &TaskRequest,
        table: &TableRef,
    ) -> Result<DataFrame, TaskError> {
        let mut input = self.open_input(task, table).await?;
        let mut batches = Vec::new();
        while let Some(batch) = input.next_batch().await? {
            batches.push(batch);
        }
        medallion_frames::frame_from_batches(&input.schema()?, &batches)
            .map_err(|e| TaskError::internal(format!("{table}: {e}")))
    }

    /// Runs the row stage of `spec` on its `from` input chunk by chunk as the input streams
    /// in, so the raw rows are never all in memory at once (a few chunks are: see
    /// [`ChunkRunner`]).
    async fn stage_input(
        &self,
        task: &TaskRequest,
        spec: &SilverSpec,
        from: &TableRef,
        out: RowOutput,
        progress: &Progress,
    ) -> Result<RowOutput, TaskError> {
        let mut stage: Option<Arc<RowStage>> = None;
        let mut chunks = ChunkRunner::new(out);
        let mut pending: Vec<RecordBatch> = Vec::new();
        let (mut pending_rows, mut rows_read, mut bytes_read) = (0usize, 0u64, 0u64);
        let phase = format!("reading and refining {from}");
        let mut input = self.open_input(task, from).await?;
        while let Some(batch) = input.next_batch().await? {
            rows_read += batch.num_rows() as u64;
            bytes_read += medallion_flight::batch_bytes(&batch);
            pending_rows += batch.num_rows();
            pending.push(batch);
            if pending_rows >= CHUNK_ROWS {
                let batches = std::mem::take(&mut pending);
                pending_rows = 0;
                let schema = batches[0].schema();
                chunks.start(spec, &mut stage, schema, batches).await?;
                progress.report(&phase, rows_read, bytes_read, false);
            }
        }
        // The rest, or an empty frame so the output has its columns even without rows.
        if !pending.is_empty() || !chunks.has_chunks() {
            let schema = match pending.first() {
                Some(batch) => batch.schema(),
                None => input.schema()?,
            };
            chunks.start(spec, &mut stage, schema, pending).await?;
        }
        let out = chunks.finish(spec, &mut stage).await?;
        progress.report(&phase, rows_read, bytes_read, true);
        Ok(out)
    }
}

/// The row stage over a stream of chunks, off the async threads, as a pipeline: while the
/// caller reads chunk n+2, chunk n+1 is converted into a polars frame (building string views
/// is CPU work) and the row stage runs on chunk n. Chunks reach the row stage in input order.
struct ChunkRunner {
    /// The output, while no chunk runs.
    idle: Option<RowOutput>,
    running: Option<JoinHandle<Result<RowOutput, TaskError>>>,
    /// The next chunk for the row stage, being converted.
    converting: Option<JoinHandle<Result<DataFrame, TaskError>>>,
    started: bool,
}

impl ChunkRunner {
    fn new(out: RowOutput) -> ChunkRunner {
        ChunkRunner {
            idle: Some(out),
            running: None,
            converting: None,
            started: false,
        }
    }

    /// Whether any chunk was started.
    fn has_chunks(&self) -> bool {
        self.started
    }

    /// The output once every started chunk has been through the row stage.
    async fn finish(
        &mut self,
        spec: &SilverSpec,
        stage: &mut Option<Arc<RowStage>>,
    ) -> Result<RowOutput, TaskError> {
        if let Some(chunk) = self.converting.take() {
            self.run_stage(spec, stage, chunk).await?;
        }
        self.output().await
    }

    /// The output once the running chunk (if any) is done.
    async fn output(&mut self) -> Result<RowOutput, TaskError> {
        match self.running.take() {
            Some(chunk) => chunk.await.map_err(TaskError::internal)?,
            None => self
                .idle
                .take()
                .ok_or_else(|| TaskError::internal("the row stage's output was lost")),
        }
    }

    /// Starts converting `batches`, then hands the chunk converted before it to the row stage.
    async fn start(
        &mut self,
        spec: &SilverSpec,
        stage: &mut Option<Arc<RowStage>>,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<(), TaskError> {
        self.started = true;
        let name = spec.name.clone();
        let converting = tokio::task::spawn_blocking(move || {
            medallion_frames::frame_from_batches(&schema, &batches)
                .map_err(|e| TaskError::internal(format!("silver.{name}: input: {e}")))
        });
        match self.converting.replace(converting) {
            Some(previous) => self.run_stage(spec, stage, previous).await,
            None => Ok(()),
        }
    }

    /// Waits for `chunk` to be converted and the running chunk to be done, then starts the row
    /// stage (made on first use) on it.
    async fn run_stage(
        &mut self,
        spec: &SilverSpec,
        stage: &mut Option<Arc<RowStage>>,
        chunk: JoinHandle<Result<DataFrame, TaskError>>,
    ) -> Result<(), TaskError> {
        let chunk = chunk.await.map_err(TaskError::internal)??;
        let stage = match stage {
            Some(s) => s.clone(),
            None => stage
                .insert(Arc::new(RowStage::new(spec, &chunk.schema())?))
                .clone(),
        };
        let mut out = self.output().await?;
        self.running = Some(tokio::task::spawn_blocking(move || {
            stage.apply(chunk, &mut out).map(|()| out)
        }));
        Ok(())
    }
}

/// One input table streaming in.
enum Input {
    /// Bronze, over the ingestor's Flight.
    Flight(BatchStream),
    /// Silver, from this service's own lake.
    Lake {
        batches: BoxStream<'static, medallion_lake::Result<RecordBatch>>,
        schema: SchemaRef,
    },
}

impl Input {
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, TaskError> {
        match self {
            Input::Flight(stream) => Ok(stream.next_batch().await?),
            Input::Lake { batches, .. } => batches
                .next()
                .await
                .transpose()
                .map_err(TaskError::internal),
        }
    }

    /// The input's schema (for Flight, once the stream has ended).
    fn schema(&self) -> Result<SchemaRef, TaskError> {
        match self {
            Input::Flight(stream) => Ok(stream.schema()?),
            Input::Lake { schema, .. } => Ok(schema.clone()),
        }
    }
}

#[tonic::async_trait]
impl TaskRunner for Refiner {
    fn layer(&self) -> Layer {
        Layer::Silver
    }

    async fn run(
        &self,
        task: TaskRequest,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Manifest, TaskError> {
        let spec = task
            .pipeline
            .silver(&task.table.name)
            .cloned()
            .ok_or_else(|| {
                TaskError::Invalid(format!("no silver table named {}", task.table.name))
            })?;
        if let Some(apply) = &spec.apply_changes {
            return crate::apply::run(self, &task, &spec, apply, &progress, &cancel).await;
        }
        let name = spec.name.clone();
        let current = self
            .lake
            .snapshot(Layer::Silver, &name, None)
            .await
            .map_err(TaskError::internal)?;
        if let Some(snapshot) = &current
            && task.is_done(snapshot, true).await?
        {
            return Ok(Manifest::of_snapshot(snapshot, false));
        }

        let started = std::time::Instant::now();
        let streamed = RowStage::chunkable(&spec)
            .then(|| transform::from_table(&spec).ok().cloned())
            .flatten()
            // A table joined with itself needs its input whole anyway.
            .filter(|from| spec.join.as_ref().is_none_or(|j| &j.with != from));
        let mut inputs = BTreeMap::new();
        for dep in task.dependencies() {
            if Some(&dep) == streamed.as_ref() {
                continue;
            }
            progress.report(&format!("reading {dep}"), 0, 0, true);
            let df = tokio::select! {
                df = self.read_input(&task, &dep) => df?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            inputs.insert(dep, df);
        }
        let plan = streamed.as_ref().and_then(|from| {
            let rows = task.inputs.get(from).map_or(0, |m| m.table_rows);
            BucketPlan::for_table(&spec, rows, self.bucket_rows)
        });
        let staged = match &streamed {
            Some(from) => {
                let out = match &plan {
                    Some(plan) => RowOutput::spilling(
                        Spill::create(&self.spool_dir, &name, plan)
                            .map_err(|e| TaskError::Internal(format!("silver.{name}: {e}")))?,
                    ),
                    None => RowOutput::default(),
                };
                Some(tokio::select! {
                    out = self.stage_input(&task, &spec, from, out, &progress) => out?,
                    _ = cancel.cancelled() => return Err(TaskError::Cancelled),
                })
            }
            None => None,
        };
        let rows_in = inputs.values().map(|df| df.height() as u64).sum::<u64>()
            + staged.as_ref().map_or(0, RowOutput::rows);
        progress.report("refining", rows_in, 0, true);
        let read_secs = started.elapsed().as_secs_f64();

        let (rows, plan) = match (staged, plan) {
            (Some(rows), Some(plan)) => (rows, plan),
            (staged, _) => {
                return self
                    .finish_whole(&task, spec, staged, inputs, &progress, &cancel, started)
                    .await;
            }
        };
        // Nothing is written unless every chunk passed its `fail` expectations.
        let Staged {
            kept,
            quarantine,
            expectations,
        } = rows.checked(&spec)?;
        let Kept::Spilled(spill) = kept else {
            return Err(TaskError::internal("bucketed rows were not spilled"));
        };
        let spilled = tokio::task::spawn_blocking(move || spill.finish())
            .await
            .map_err(TaskError::internal)?
            .map_err(|e| TaskError::Internal(format!("silver.{name}: {e}")))?;
        let joined = spec.join.as_ref().and_then(|j| inputs.remove(&j.with));
        let writer = self
            .write_buckets(
                &task,
                Arc::new(spec),
                &plan,
                spilled,
                joined,
                &progress,
                &cancel,
            )
            .await?;
        if cancel.is_cancelled() {
            return Err(TaskError::Cancelled);
        }
        // Every bucket is refined and its files written before anything is committed; then
        // quarantine first, as in `finish_whole`.
        let quarantined_rows = self
            .commit_quarantine(&task, quarantine.as_ref(), &progress)
            .await?;
        let outcome = writer
            .commit(task.commit_spec(&task.table, WriteMode::Overwrite))
            .await
            .map_err(TaskError::internal)?;
        let mut manifest = Manifest::after_commit(&self.lake, &task.table, &outcome).await?;
        let write_secs = started.elapsed().as_secs_f64() - read_secs;
        tracing::info!(table = %task.table, read_secs, buckets = plan.buckets, refine_and_write_secs = write_secs, "refined");
        manifest.expectations = expectations;
        manifest.quarantined_rows = quarantined_rows;
        Ok(manifest)
    }
}

impl Refiner {
    /// Refines the table whole in memory (SQL, small tables, and those that cannot be
    /// bucketed), then commits quarantine and silver.
    #[allow(clippy::too_many_arguments)]
    async fn finish_whole(
        &self,
        task: &TaskRequest,
        spec: SilverSpec,
        staged: Option<RowOutput>,
        inputs: BTreeMap<TableRef, DataFrame>,
        progress: &Progress,
        cancel: &CancellationToken,
        started: std::time::Instant,
    ) -> Result<Manifest, TaskError> {
        let read_secs = started.elapsed().as_secs_f64();
        let refined = tokio::task::spawn_blocking(move || match staged {
            Some(rows) => transform::finish(&spec, rows, &inputs),
            None => transform::refine(&spec, inputs),
        })
        .await
        .map_err(TaskError::internal)??;
        if cancel.is_cancelled() {
            return Err(TaskError::Cancelled);
        }
        let refine_secs = started.elapsed().as_secs_f64() - read_secs;

        let quarantined_rows = self
            .commit_quarantine(&task, refined.quarantine.as_ref(), &progress)
            .await?;
        progress.report("writing", refined.silver.height() as u64, 0, true);
        let commit = task.commit_spec(&task.table, WriteMode::Overwrite);
        let outcome = medallion_frames::commit_frame(
            &self.lake,
            &task.table,
            &refined.silver,
            task.input_tags(),
            commit,
        )
        .await
        .map_err(TaskError::internal)?;
        let mut manifest = Manifest::after_commit(&self.lake, &task.table, &outcome).await?;
        let write_secs = started.elapsed().as_secs_f64() - read_secs - refine_secs;
        tracing::info!(table = %task.table, read_secs, refine_secs, write_secs, "refined");
        manifest.expectations = refined.expectations;
        manifest.quarantined_rows = quarantined_rows;
        Ok(manifest)
    }
}
