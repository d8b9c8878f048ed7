//! One silver task: read the inputs (bronze over Flight, silver from our own lake), refine,
//! commit quarantine then silver. Skips the work when the inputs have not moved.

use std::collections::BTreeMap;

use std::sync::Arc;

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use futures::{StreamExt, stream::BoxStream};
use medallion_flight::{BatchStream, FlightReader};
use medallion_lake::{Lake, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{Layer, SilverSpec, TableRef};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, TaskRunner};
use polars::prelude::DataFrame;

use crate::transform::{self, RowOutput, RowStage};

pub struct Refiner {
    pub lake: Lake,
    pub bronze_flight: FlightReader,
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
    /// in, so the raw rows are never all in memory at once.
    async fn stage_input(
        &self,
        task: &TaskRequest,
        spec: &SilverSpec,
        from: &TableRef,
        progress: &Progress,
    ) -> Result<RowOutput, TaskError> {
        let mut stage: Option<Arc<RowStage>> = None;
        let mut out = RowOutput::default();
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
                out = run_stage(spec, &mut stage, batches[0].schema(), batches, out).await?;
                progress.report(&phase, rows_read, bytes_read, false);
            }
        }
        // The rest, or an empty frame so the output has its columns even without rows.
        if !pending.is_empty() || stage.is_none() {
            let schema = match pending.first() {
                Some(batch) => batch.schema(),
                None => input.schema()?,
            };
            out = run_stage(spec, &mut stage, schema, pending, out).await?;
        }
        progress.report(&phase, rows_read, bytes_read, true);
        Ok(out)
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

/// Runs the row stage (made on first use) on one chunk of input batches, off the async threads.
async fn run_stage(
    spec: &SilverSpec,
    stage: &mut Option<Arc<RowStage>>,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    mut out: RowOutput,
) -> Result<RowOutput, TaskError> {
    let chunk = medallion_frames::frame_from_batches(&schema, &batches)
        .map_err(|e| TaskError::internal(format!("silver.{}: input: {e}", spec.name)))?;
    drop(batches);
    let stage = match stage {
        Some(s) => s.clone(),
        None => stage
            .insert(Arc::new(RowStage::new(spec, &chunk.schema())?))
            .clone(),
    };
    tokio::task::spawn_blocking(move || stage.apply(chunk, &mut out).map(|()| out))
        .await
        .map_err(TaskError::internal)?
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
        let staged = match &streamed {
            Some(from) => Some(tokio::select! {
                out = self.stage_input(&task, &spec, from, &progress) => out?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            }),
            None => None,
        };
        let rows_in = inputs.values().map(DataFrame::height).sum::<usize>()
            + staged.as_ref().map_or(0, RowOutput::rows);
        progress.report("refining", rows_in as u64, 0, true);
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

        // Quarantine first: if the silver commit then fails, the retry finds it done.
        let mut quarantined_rows = 0;
        if let Some(q) = &refined.quarantine {
            progress.report("writing quarantine", q.height() as u64, 0, true);
            quarantined_rows = q.height() as u64;
            let table = TableRef::new(Layer::Quarantine, &name);
            let commit = task.commit_spec(&table, WriteMode::Overwrite);
            medallion_frames::commit_frame(&self.lake, &table, q, task.input_tags(), commit)
                .await
                .map_err(TaskError::internal)?;
        }
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
