//! One gold task: read the silver inputs over Flight, run the table's SQL, commit, load the
//! warehouse. The load runs on every task (replace and merge are idempotent), so a load that
//! failed after its gold commit is completed by the retry.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use futures::StreamExt;
use medallion_flight::{FlightReader, KeySet};
use medallion_lake::{DataFile, Lake, Layer, TableSnapshot, WriteMode};
use medallion_objects::{ObjectStore, S3Options, S3Url};
use medallion_server::CancellationToken;
use medallion_spec::{GoldSpec, LoadMode, Pipeline, TableRef};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, TaskRunner};
use medallion_warehouse::{LoadReport, PostgresSink, QualifiedName, RedshiftSink, RedshiftTarget};
use polars::prelude::*;
use tracing::Instrument as _;

use crate::shared_reads::SharedReads;
use crate::touched;

pub struct Aggregator {
    pub lake: Lake,
    pub silver_flight: FlightReader,
    pub s3: S3Options,
    /// Built on the first Redshift load, so a PostgreSQL-only aggregator never loads AWS settings.
    pub objects: tokio::sync::OnceCell<ObjectStore>,
    /// Overrides the Redshift Data API endpoint (a local development endpoint, say).
    pub redshift_data_endpoint: Option<String>,
    /// Where staged Parquet files are written before upload.
    pub spool_dir: std::path::PathBuf,
    /// Silver reads shared by the tasks queued here.
    pub shared_reads: std::sync::Arc<SharedReads>,
}

/// Runs a gold table's query over its input frames, registered under their silver names.
///
/// On polars' streaming engine: it evaluates the query morsel by morsel, so filters,
/// expressions and partial aggregates never materialise whole-table intermediates (at TPC-H
/// scale factor 1 this halves the aggregator's peak memory and time). It falls back to the
/// in-memory engine for operations it does not stream.
pub fn compute(
    spec: &GoldSpec,
    inputs: &BTreeMap<TableRef, DataFrame>,
) -> Result<DataFrame, TaskError> {
    let mut ctx = polars::sql::SQLContext::new();
    for (table, df) in inputs {
        ctx.register(&table.name, df.clone().lazy());
    }
    let invalid = |e: PolarsError| TaskError::Invalid(format!("gold.{}: {e}", spec.name));
    ctx.execute(&spec.query())
        .and_then(|lf| lf.collect_with_engine(Engine::Streaming))
        // One lazy frame collects to one frame (several come only from collecting several).
        .map(|result| result.unwrap_single())
        .map_err(invalid)
}

/// Where a pipeline's gold tables are loaded.
enum Warehouse {
    Postgres(String),
    Redshift(medallion_spec::RedshiftSpec),
}

/// The warehouse of a pipeline, `None` when loading is optional and not configured here.
fn warehouse(pipeline: &Pipeline) -> Result<Option<Warehouse>, TaskError> {
    let spec = pipeline.spec.warehouse.as_ref();
    if let Some(redshift) = spec.and_then(|w| w.redshift.as_ref()) {
        return Ok(Some(Warehouse::Redshift(redshift.clone())));
    }
    let Some(pg) = spec.and_then(|w| w.postgres.as_ref()) else {
        return Err(TaskError::Invalid(
            "the spec has no warehouse section".into(),
        ));
    };
    if let Some(url) = &pg.url {
        return Ok(Some(Warehouse::Postgres(url.clone())));
    }
    let var = pg.url_env.as_deref().unwrap_or_default();
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Ok(Some(Warehouse::Postgres(url))),
        _ if pg.optional => Ok(None),
        _ => Err(TaskError::Invalid(format!(
            "warehouse.postgres.url_env: ${var} is not set on the aggregator"
        ))),
    }
}

impl Aggregator {
    /// Reads the silver inputs over Flight, computes the table and commits it: only the
    /// groups the inputs' changes touched where that is the cheaper way, else all of it.
    async fn aggregate(
        &self,
        task: &TaskRequest,
        spec: &GoldSpec,
        current: Option<&TableSnapshot>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Manifest, TaskError> {
        if let (Some(plan), Some(current)) = (touched::plan(task, spec, current), current)
            && let Some(manifest) = self
                .aggregate_touched(task, spec, current, plan, progress, cancel)
                .await?
        {
            return Ok(manifest);
        }
        let reader = &self.silver_flight;
        let mut read = Vec::new();
        for dep in task.dependencies() {
            progress.report(&format!("reading {dep}"), 0, 0, true);
            let (schema, batches) = tokio::select! {
                r = self.shared_reads.read(reader, task, &dep) => r?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            read.push((dep, schema, batches));
        }
        progress.report("aggregating", 0, 0, true);
        let gold_spec = spec.clone();
        let started = std::time::Instant::now();
        // Building polars frames (string views) is CPU work: off the async workers, which
        // also serve gold over Flight.
        let gold = tokio::task::spawn_blocking(move || {
            let mut inputs = BTreeMap::new();
            for (dep, schema, batches) in read {
                let df = medallion_frames::frame_from_batches(&schema, &batches)
                    .map_err(|e| TaskError::internal(format!("{dep}: {e}")))?;
                inputs.insert(dep, df);
            }
            compute(&gold_spec, &inputs)
        })
        .await
        .map_err(TaskError::internal)??;
        tracing::info!(table = %task.table, rows = gold.height(), secs = started.elapsed().as_secs_f64(), "computed");
        progress.report("writing", gold.height() as u64, 0, true);
        let commit = task.commit_spec(&task.table, WriteMode::Overwrite);
        let outcome = medallion_frames::commit_frame(
            &self.lake,
            &task.table,
            &gold,
            task.input_tags(),
            commit,
        )
        .await
        .map_err(TaskError::internal)?;
        Manifest::after_commit(&self.lake, &task.table, &outcome).await
    }

    async fn load_warehouse(
        &self,
        task: &TaskRequest,
        spec: &GoldSpec,
        progress: &Progress,
    ) -> Result<(), TaskError> {
        let Some(target) = &spec.warehouse else {
            return Ok(());
        };
        let Some(warehouse) = warehouse(&task.pipeline)? else {
            tracing::info!(table = %task.table, "warehouse loading skipped: optional and not configured");
            return Ok(());
        };
        let name: QualifiedName = target
            .table
            .parse()
            .map_err(|e| TaskError::Invalid(format!("{e}")))?;
        let snapshot = self
            .lake
            .snapshot(Layer::Gold, &spec.name, None)
            .await
            .map_err(TaskError::internal)?
            .ok_or_else(|| TaskError::internal(format!("gold.{} does not exist", spec.name)))?;
        progress.report(&format!("loading warehouse {name}"), 0, 0, true);
        let mode = match target.mode {
            LoadMode::Replace => medallion_warehouse::LoadMode::Replace,
            LoadMode::Merge => medallion_warehouse::LoadMode::Merge {
                keys: target.keys.clone(),
            },
        };
        let lake = self.lake.clone();
        let files = snapshot.files.clone();
        let reader_snapshot = snapshot.clone();
        let batches = futures::stream::iter(files)
            .map(move |f| lake.read_file(&reader_snapshot, &f, 64 * 1024))
            .flatten();
        let span = tracing::info_span!(
            "warehouse.load",
            table = %task.table,
            target = %name,
            version = snapshot.version,
            rows = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let failed = |e: medallion_warehouse::Error| {
            TaskError::internal(format!("loading gold.{} into {name}: {e}", spec.name))
        };
        let report = async {
            match warehouse {
                Warehouse::Postgres(url) => {
                    let mut sink = PostgresSink::connect(&url)
                        .await
                        .map_err(TaskError::internal)?;
                    match mode {
                        medallion_warehouse::LoadMode::Merge { keys } => {
                            self.merge_gold(&mut sink, &name, spec, &snapshot, &keys)
                                .await
                        }
                        replace => sink
                            .load(&name, &snapshot.schema, batches, replace)
                            .await
                            .map_err(failed),
                    }
                }
                Warehouse::Redshift(redshift) => {
                    let objects = self
                        .objects
                        .get_or_init(|| ObjectStore::connect(self.s3.clone()))
                        .await
                        .clone();
                    let staging = S3Url::parse(&redshift.staging).map_err(|e| {
                        TaskError::Invalid(format!("warehouse.redshift.staging: {e}"))
                    })?;
                    // Blank settings count as absent (validation reads them the same way).
                    let given = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
                    let target = RedshiftTarget {
                        cluster_id: given(redshift.cluster_id),
                        workgroup: given(redshift.workgroup),
                        database: redshift.database,
                        db_user: given(redshift.db_user),
                        secret_arn: given(redshift.secret_arn),
                        iam_role: redshift.iam_role,
                        staging,
                    };
                    let sink = RedshiftSink::connect(
                        target,
                        objects,
                        self.redshift_data_endpoint.as_deref(),
                        &self.spool_dir,
                    )
                    .await;
                    sink.load(&name, &snapshot.schema, batches, mode)
                        .await
                        .map_err(failed)
                }
            }
        }
        .instrument(span.clone())
        .await?;
        span.record("rows", report.rows);
        let labels = medallion_telemetry::metrics::WarehouseLabels {
            table: task.table.to_string(),
            target: name.to_string(),
        };
        let metrics = medallion_telemetry::metrics::metrics();
        metrics
            .warehouse_load_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        metrics
            .warehouse_rows
            .get_or_create(&labels)
            .inc_by(report.rows);
        tracing::info!(table = %task.table, target = %name, rows = report.rows, "warehouse loaded");
        Ok(())
    }
}

impl Aggregator {
    /// Merges a gold version into a PostgreSQL target on `keys`, sending what changed since
    /// the version the target holds (recorded by the previous load):
    /// - the version already there: nothing;
    /// - a recompute of touched groups over the version there: those groups' rows, and the
    ///   groups that vanished deleted;
    /// - otherwise every row, and the keys the version there had and this one has not
    ///   deleted (rows gold never had are kept).
    async fn merge_gold(
        &self,
        sink: &mut PostgresSink,
        name: &QualifiedName,
        spec: &GoldSpec,
        snapshot: &TableSnapshot,
        keys: &[String],
    ) -> Result<LoadReport, TaskError> {
        let failed = |e: medallion_warehouse::Error| {
            TaskError::internal(format!("loading gold.{} into {name}: {e}", spec.name))
        };
        let loaded = sink.loaded_version(name).await.map_err(failed)?;
        if loaded == Some(snapshot.version) {
            tracing::info!(table = %spec.name, target = %name, version = snapshot.version, "the warehouse holds this version");
            return Ok(LoadReport::default());
        }
        let (rows, deletes) = match touched_changes(spec, snapshot, keys) {
            Some((base, upserts, deletes)) if loaded == Some(base) => {
                (upserts, self.gold_keys(snapshot, &deletes, keys).await?)
            }
            _ => {
                let vanished = match loaded {
                    Some(version) => self.vanished_keys(spec, version, snapshot, keys).await?,
                    None => self.gold_keys(snapshot, &[], keys).await?,
                };
                (snapshot.files.clone(), vanished)
            }
        };
        let lake = self.lake.clone();
        let reader_snapshot = snapshot.clone();
        let batches = futures::stream::iter(rows)
            .map(move |f| lake.read_file(&reader_snapshot, &f, 64 * 1024))
            .flatten();
        sink.load_changes(
            name,
            &snapshot.schema,
            batches,
            deletes,
            keys,
            loaded,
            snapshot.version,
        )
        .await
        .map_err(failed)?
        .ok_or_else(|| {
            TaskError::internal(format!(
                "{name} was loaded by someone else during this load of gold.{}",
                spec.name
            ))
        })
    }

    /// The keys gold version `version` had and `snapshot` has not (none if that version
    /// cannot be read any more).
    async fn vanished_keys(
        &self,
        spec: &GoldSpec,
        version: i64,
        snapshot: &TableSnapshot,
        keys: &[String],
    ) -> Result<RecordBatch, TaskError> {
        let old = match self
            .lake
            .snapshot(Layer::Gold, &spec.name, Some(version))
            .await
        {
            Ok(Some(old)) => old,
            other => {
                tracing::warn!(table = %spec.name, version, error = ?other.err(), "the loaded version is gone; no rows are deleted");
                return self.gold_keys(snapshot, &[], keys).await;
            }
        };
        let current = self.gold_keys(snapshot, &snapshot.files, keys).await?;
        let before = self.gold_keys(&old, &old.files, keys).await?;
        let now = KeySet::of_keys(&current, keys, &before.schema()).map_err(TaskError::internal)?;
        now.filter_out(&before).map_err(TaskError::internal)
    }

    /// The `keys` columns (in that order) of some files of a gold version, as one batch.
    async fn gold_keys(
        &self,
        snapshot: &TableSnapshot,
        files: &[DataFile],
        keys: &[String],
    ) -> Result<RecordBatch, TaskError> {
        let mut batches = Vec::new();
        for file in files {
            let mut stream = self.lake.read_file_columns(snapshot, file, 64 * 1024, keys);
            while let Some(batch) = stream.next().await {
                batches.push(touched::project(
                    &batch.map_err(TaskError::internal)?,
                    keys,
                )?);
            }
        }
        let empty = touched::project(&RecordBatch::new_empty(snapshot.schema.clone()), keys)?;
        arrow::compute::concat_batches(&empty.schema(), &batches).map_err(TaskError::internal)
    }
}

/// The hidden change files of a touched-groups commit and the version they apply to, when
/// the merge keys are the group keys (the delete rows carry only those).
fn touched_changes(
    spec: &GoldSpec,
    snapshot: &TableSnapshot,
    keys: &[String],
) -> Option<(i64, Vec<DataFile>, Vec<DataFile>)> {
    let mut sorted_keys = keys.to_vec();
    sorted_keys.sort();
    let mut groups = spec.group_by.clone();
    groups.sort();
    if sorted_keys != groups {
        return None;
    }
    let files = |kind: &str| -> Vec<DataFile> {
        snapshot
            .hidden
            .iter()
            .filter(|f| f.tags.get(touched::TAG_CHANGE).is_some_and(|k| k == kind))
            .cloned()
            .collect()
    };
    let (upserts, deletes) = (
        files(touched::CHANGE_UPSERTS),
        files(touched::CHANGE_DELETES),
    );
    // Every file of such a commit carries the base (when no group changed there are no
    // change files, only the carried-over rows).
    let base = snapshot
        .files
        .iter()
        .chain(&snapshot.hidden)
        .find_map(|f| f.tags.get(touched::TAG_CHANGE_BASE))?
        .parse::<i64>()
        .ok()?;
    Some((base, upserts, deletes))
}

#[tonic::async_trait]
impl TaskRunner for Aggregator {
    fn layer(&self) -> Layer {
        Layer::Gold
    }

    fn arrived(&self, task: &TaskRequest) -> Option<Box<dyn Send>> {
        Some(Box::new(self.shared_reads.wait(task)))
    }

    async fn run(
        &self,
        task: TaskRequest,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Manifest, TaskError> {
        let spec = task
            .pipeline
            .gold(&task.table.name)
            .cloned()
            .ok_or_else(|| {
                TaskError::Invalid(format!("no gold table named {}", task.table.name))
            })?;
        let current = self
            .lake
            .snapshot(Layer::Gold, &spec.name, None)
            .await
            .map_err(TaskError::internal)?;
        let manifest = match &current {
            Some(snapshot) if task.is_done(snapshot, true).await? => {
                Manifest::of_snapshot(snapshot, false)
            }
            _ => {
                self.aggregate(&task, &spec, current.as_ref(), &progress, &cancel)
                    .await?
            }
        };
        self.load_warehouse(&task, &spec, &progress).await?;
        Ok(manifest)
    }
}
