//! One silver task: read the inputs (bronze over Flight, silver from our own lake), refine,
//! commit quarantine then silver. Skips the work when the inputs have not moved.

use std::collections::BTreeMap;

use medallion_flight::FlightReader;
use medallion_lake::{CommitOutcome, CommitSpec, Lake, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{Layer, TableRef};
use medallion_stage::{
    Manifest, Progress, TAG_INPUTS, TaskError, TaskRequest, TaskRunner, recorded_inputs,
};
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
        let manifest = task.inputs.get(table).ok_or_else(|| {
            TaskError::Internal(format!("no manifest for input {table} in this run"))
        })?;
        let (schema, batches) = match table.layer {
            Layer::Bronze => {
                let reader = FlightReader::connect(&self.bronze_flight)
                    .await
                    .map_err(TaskError::internal)?;
                reader
                    .read_all(&manifest.tickets)
                    .await
                    .map_err(TaskError::internal)?
            }
            Layer::Silver => {
                let snapshot = self
                    .lake
                    .snapshot(Layer::Silver, &table.name, Some(manifest.version))
                    .await
                    .map_err(TaskError::internal)?
                    .ok_or_else(|| {
                        TaskError::internal(format!(
                            "{table} version {} is missing",
                            manifest.version
                        ))
                    })?;
                let mut batches = Vec::new();
                for file in &snapshot.files {
                    let mut stream = self.lake.read_file(&snapshot, file, 64 * 1024);
                    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
                        batches.push(batch.map_err(TaskError::internal)?);
                    }
                }
                (snapshot.schema.clone(), batches)
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
        let deps = task
            .pipeline
            .dag
            .node(&task.table)
            .map(|n| n.depends_on.clone())
            .unwrap_or_default();
        let input_versions: BTreeMap<String, i64> = deps
            .iter()
            .map(|d| (d.to_string(), task.inputs.get(d).map_or(-1, |m| m.version)))
            .collect();

        let current = self
            .lake
            .snapshot(Layer::Silver, &name, None)
            .await
            .map_err(TaskError::internal)?;
        if let Some(snapshot) = &current {
            let retried = snapshot
                .app_version(&task.app_id())
                .await
                .map_err(TaskError::internal)?
                >= Some(task.run_sequence as i64);
            let unchanged =
                !task.full_refresh && recorded_inputs(snapshot).as_ref() == Some(&input_versions);
            if retried || unchanged {
                return Ok(Manifest::of_snapshot(snapshot, false));
            }
        }

        let mut inputs = BTreeMap::new();
        for dep in &deps {
            progress.report(&format!("reading {dep}"), 0, 0, true);
            let df = tokio::select! {
                df = self.read_input(&task, dep) => df?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            inputs.insert(dep.clone(), df);
        }
        let rows_in: usize = inputs.values().map(DataFrame::height).sum();
        progress.report("refining", rows_in as u64, 0, true);
        let refined = tokio::task::spawn_blocking(move || transform::refine(&spec, &inputs))
            .await
            .map_err(TaskError::internal)??;
        if cancel.is_cancelled() {
            return Err(TaskError::Cancelled);
        }

        let tags = BTreeMap::from([(
            TAG_INPUTS.to_string(),
            serde_json::to_string(&input_versions).map_err(TaskError::internal)?,
        )]);
        let metadata = |table: &str| {
            let mut m = serde_json::Map::new();
            m.insert("run_id".into(), task.run_id.clone().into());
            m.insert("pipeline".into(), task.pipeline.spec.name.clone().into());
            m.insert("table".into(), table.into());
            m
        };
        let mut quarantined_rows = 0;
        if let Some(q) = &refined.quarantine {
            progress.report("writing quarantine", q.height() as u64, 0, true);
            quarantined_rows = q.height() as u64;
            let spec = CommitSpec {
                mode: WriteMode::Overwrite,
                app_id: format!("{}/quarantine", task.app_id()),
                txn_version: task.run_sequence as i64,
                metadata: metadata(&format!("quarantine.{name}")),
            };
            medallion_frames::commit_frame(
                &self.lake,
                Layer::Quarantine,
                &name,
                q,
                tags.clone(),
                spec,
            )
            .await
            .map_err(TaskError::internal)?;
        }
        progress.report("writing", refined.silver.height() as u64, 0, true);
        let spec = CommitSpec {
            mode: WriteMode::Overwrite,
            app_id: task.app_id(),
            txn_version: task.run_sequence as i64,
            metadata: metadata(&format!("silver.{name}")),
        };
        let outcome = medallion_frames::commit_frame(
            &self.lake,
            Layer::Silver,
            &name,
            &refined.silver,
            tags,
            spec,
        )
        .await
        .map_err(TaskError::internal)?;
        let snapshot = self
            .lake
            .snapshot(Layer::Silver, &name, None)
            .await
            .map_err(TaskError::internal)?
            .ok_or_else(|| TaskError::internal(format!("silver.{name} vanished after commit")))?;
        let mut manifest = Manifest::of_snapshot(
            &snapshot,
            matches!(outcome, CommitOutcome::Committed { .. }),
        );
        if let CommitOutcome::Committed { rows, bytes, .. } = outcome {
            manifest.rows_written = rows.max(0) as u64;
            manifest.bytes_written = bytes.max(0) as u64;
        }
        manifest.expectations = refined.expectations;
        manifest.quarantined_rows = quarantined_rows;
        Ok(manifest)
    }
}
