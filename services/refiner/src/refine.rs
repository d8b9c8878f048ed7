//! One silver task: read the inputs (bronze over Flight, silver from our own lake), refine,
//! commit quarantine then silver. Skips the work when the inputs have not moved.

use std::collections::BTreeMap;

use medallion_flight::FlightReader;
use medallion_lake::{Lake, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{Layer, TableRef};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, TaskRunner};
use polars::prelude::DataFrame;

use crate::transform;

pub struct Refiner {
    pub lake: Lake,
    pub bronze_flight: String,
}

impl Refiner {
    /// Reads one input at the version the upstream task reported.
    async fn read_input(
        &self,
        task: &TaskRequest,
        table: &TableRef,
    ) -> Result<DataFrame, TaskError> {
        let tickets = task.input_tickets(table)?;
        let (schema, batches) = match table.layer {
            Layer::Bronze => {
                let reader = FlightReader::connect(&self.bronze_flight)
                    .await
                    .map_err(TaskError::internal)?;
                reader
                    .read_all(&tickets)
                    .await
                    .map_err(TaskError::internal)?
            }
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
                let mut batches = Vec::new();
                for file in &snapshot.files {
                    let mut stream = match &columns {
                        Some(c) => self.lake.read_file_columns(&snapshot, file, 64 * 1024, c),
                        None => self.lake.read_file(&snapshot, file, 64 * 1024),
                    };
                    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
                        batches.push(batch.map_err(TaskError::internal)?);
                    }
                }
                let schema = match &columns {
                    Some(c) => snapshot.projected_schema(c),
                    None => snapshot.schema.clone(),
                };
                (schema, batches)
            }
            other => {
                return Err(TaskError::Invalid(format!(
                    "silver cannot read {other} tables"
                )));
            }
        };
        medallion_frames::frame_from_batches(&schema, &batches)
            .map_err(|e| TaskError::internal(format!("{table}: {e}")))
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
        let mut inputs = BTreeMap::new();
        for dep in task.dependencies() {
            progress.report(&format!("reading {dep}"), 0, 0, true);
            let df = tokio::select! {
                df = self.read_input(&task, &dep) => df?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            inputs.insert(dep, df);
        }
        let rows_in: usize = inputs.values().map(DataFrame::height).sum();
        progress.report("refining", rows_in as u64, 0, true);
        let read_secs = started.elapsed().as_secs_f64();
        let refined = tokio::task::spawn_blocking(move || transform::refine(&spec, inputs))
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
