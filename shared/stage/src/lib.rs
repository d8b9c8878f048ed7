//! The stage API every layer service serves to the coordinator: run one task, stream its
//! progress, return its manifest; cancel it. A layer service implements [`TaskRunner`];
//! this crate owns the gRPC plumbing, the task registry and the proto <-> domain conversion.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::Stream;
use medallion_flight::TableTicket;
use medallion_proto::v1 as pb;
use medallion_spec::{ExpectationAction, Layer, Pipeline, TableRef};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub use medallion_proto::v1::stage_service_server::StageServiceServer;

/// One task as a layer service sees it.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub task_id: String,
    pub run_id: String,
    pub run_sequence: u64,
    pub pipeline: Pipeline,
    pub base_dir: String,
    pub table: TableRef,
    pub full_refresh: bool,
    /// Upstream manifests of this run, by table.
    pub inputs: BTreeMap<TableRef, Manifest>,
}

impl TaskRequest {
    /// The Delta application id of this task's commits: a retry of the same run sequence commits at most once.
    pub fn app_id(&self) -> String {
        format!("medallion/{}/{}", self.pipeline.spec.name, self.table)
    }

    /// The tables this task's table reads.
    pub fn dependencies(&self) -> Vec<TableRef> {
        self.pipeline
            .dag
            .node(&self.table)
            .map(|n| n.depends_on.clone())
            .unwrap_or_default()
    }

    /// The versions of this task's inputs in this run, by `layer.table` (-1 if not given),
    /// plus a fingerprint of the table's own definition under `spec`: a changed definition
    /// recomputes the table like a changed input does.
    pub fn input_versions(&self) -> BTreeMap<String, i64> {
        let mut versions: BTreeMap<String, i64> = self
            .dependencies()
            .iter()
            .map(|d| (d.to_string(), self.inputs.get(d).map_or(-1, |m| m.version)))
            .collect();
        versions.insert("spec".into(), self.definition_fingerprint());
        versions
    }

    /// A stable hash (FNV-1a) of this table's entry in the spec.
    fn definition_fingerprint(&self) -> i64 {
        let name = &self.table.name;
        let text = match self.table.layer {
            Layer::Silver => self
                .pipeline
                .silver(name)
                .and_then(|s| serde_json::to_string(s).ok()),
            Layer::Gold => self
                .pipeline
                .gold(name)
                .and_then(|g| serde_json::to_string(g).ok()),
            _ => None,
        }
        .unwrap_or_default();
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        hash as i64
    }

    /// Flight tickets for what this task needs of `input`: the version this run produced,
    /// and only the columns the task's table uses.
    pub fn input_tickets(&self, input: &TableRef) -> Result<Vec<TableTicket>, TaskError> {
        let manifest = self.inputs.get(input).ok_or_else(|| {
            TaskError::Internal(format!("no manifest for input {input} in this run"))
        })?;
        let columns = self.pipeline.columns_read(&self.table, input);
        Ok(manifest
            .tickets
            .iter()
            .map(|t| t.with_columns(columns.clone()))
            .collect())
    }

    /// Data-file tags recording the input versions a derived table was computed from.
    pub fn input_tags(&self) -> BTreeMap<String, String> {
        let versions = serde_json::to_string(&self.input_versions()).unwrap_or_default();
        BTreeMap::from([(TAG_INPUTS.to_string(), versions)])
    }

    /// The commit of this task to `table` (its own table, or e.g. its quarantine).
    pub fn commit_spec(
        &self,
        table: &TableRef,
        mode: medallion_lake::WriteMode,
    ) -> medallion_lake::CommitSpec {
        let app_id = if *table == self.table {
            self.app_id()
        } else {
            format!("{}/{}", self.app_id(), table.layer)
        };
        let mut metadata = serde_json::Map::new();
        metadata.insert("run_id".into(), self.run_id.clone().into());
        metadata.insert("pipeline".into(), self.pipeline.spec.name.clone().into());
        metadata.insert("table".into(), table.to_string().into());
        medallion_lake::CommitSpec {
            mode,
            app_id,
            txn_version: self.run_sequence as i64,
            metadata,
            more_transactions: Vec::new(),
            expect_transactions: Vec::new(),
        }
    }

    /// Whether `snapshot` already holds this task's result: this run committed it (a retry),
    /// or, unless refreshing, it was computed from the same input versions.
    pub async fn is_done(
        &self,
        snapshot: &medallion_lake::TableSnapshot,
        derived: bool,
    ) -> Result<bool, TaskError> {
        let committed = snapshot
            .app_version(&self.app_id())
            .await
            .map_err(TaskError::internal)?;
        if committed >= Some(self.run_sequence as i64) {
            return Ok(true);
        }
        Ok(derived
            && !self.full_refresh
            && recorded_inputs(snapshot) == Some(self.input_versions()))
    }
}

/// What a task left behind.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    pub table: Option<TableRef>,
    pub committed: bool,
    pub version: i64,
    pub tickets: Vec<TableTicket>,
    pub rows_written: u64,
    pub bytes_written: u64,
    pub table_rows: u64,
    pub expectations: Vec<ExpectationCount>,
    pub quarantined_rows: u64,
    pub source_files: Vec<String>,
    pub input_versions: BTreeMap<String, i64>,
    /// Kafka sources: messages the topics held beyond what the task read, when it ended.
    pub source_lag: Option<u64>,
}

/// Data-file tag holding the input versions a derived table version was computed from.
pub const TAG_INPUTS: &str = "medallion.inputs";

impl Manifest {
    /// The manifest of a table version as it stands (nothing written by this task yet).
    pub fn of_snapshot(snapshot: &medallion_lake::TableSnapshot, committed: bool) -> Manifest {
        Manifest {
            table: Some(TableRef::new(snapshot.layer, snapshot.table.clone())),
            committed,
            version: snapshot.version,
            tickets: TableTicket::for_snapshot(snapshot),
            table_rows: snapshot.total_rows().unwrap_or(0).max(0) as u64,
            input_versions: recorded_inputs(snapshot).unwrap_or_default(),
            ..Manifest::default()
        }
    }
}

impl Manifest {
    /// The manifest after a commit: the table's new version plus what the commit wrote.
    pub async fn after_commit(
        lake: &medallion_lake::Lake,
        table: &TableRef,
        outcome: &medallion_lake::CommitOutcome,
    ) -> Result<Manifest, TaskError> {
        let snapshot = lake
            .snapshot(table.layer, &table.name, None)
            .await
            .map_err(TaskError::internal)?
            .ok_or_else(|| TaskError::internal(format!("{table} vanished after its commit")))?;
        let mut manifest = Manifest::of_snapshot(&snapshot, false);
        if let medallion_lake::CommitOutcome::Committed { rows, bytes, .. } = outcome {
            manifest.committed = true;
            manifest.rows_written = (*rows).max(0) as u64;
            manifest.bytes_written = (*bytes).max(0) as u64;
        }
        Ok(manifest)
    }
}

/// The input versions recorded (under [`TAG_INPUTS`]) on a derived table's data files.
pub fn recorded_inputs(snapshot: &medallion_lake::TableSnapshot) -> Option<BTreeMap<String, i64>> {
    let tag = snapshot.files.first()?.tags.get(TAG_INPUTS)?;
    serde_json::from_str(tag).ok()
}

/// Rows that failed one expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectationCount {
    pub name: String,
    pub action: ExpectationAction,
    pub failed_rows: u64,
    pub checked_rows: u64,
}

/// Why a task failed; the message names the file/row/field where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The input or spec is wrong: retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// An expectation with action `fail` failed.
    #[error("{0}")]
    ExpectationFailed(String),
    #[error("task cancelled")]
    Cancelled,
    /// Anything else (I/O, lake, upstream service): worth a retry.
    #[error("{0}")]
    Internal(String),
}

impl TaskError {
    /// An unexpected failure, with every cause of the error chain in the message.
    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TaskError {
        TaskError::Internal(error_chain(e.into().as_ref()))
    }
}

impl From<medallion_flight::Error> for TaskError {
    fn from(e: medallion_flight::Error) -> TaskError {
        TaskError::internal(e)
    }
}

/// An error and its causes as one line, each cause once ("a: b: c").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Status {
        match e {
            TaskError::Invalid(m) => Status::invalid_argument(m),
            TaskError::ExpectationFailed(m) => Status::failed_precondition(m),
            TaskError::Cancelled => Status::cancelled("task cancelled"),
            TaskError::Internal(m) => Status::internal(m),
        }
    }
}

/// Sends progress of a running task to the coordinator, at most a few times a second.
#[derive(Clone)]
pub struct Progress {
    table: TableRef,
    tx: mpsc::Sender<Result<pb::TaskUpdate, Status>>,
    last: Arc<Mutex<Instant>>,
}

impl Progress {
    /// Reports what the task is doing and how far it got; throttled unless `force`.
    pub fn report(&self, phase: &str, rows: u64, bytes: u64, force: bool) {
        if let Ok(mut last) = self.last.lock() {
            if !force && last.elapsed() < Duration::from_millis(250) {
                return;
            }
            *last = Instant::now();
        }
        let update = pb::TaskUpdate {
            update: Some(pb::task_update::Update::Progress(pb::TaskProgress {
                table: Some(table_to_pb(&self.table)),
                phase: phase.to_string(),
                rows,
                bytes,
            })),
        };
        // A full channel means the coordinator is slow to read: dropping a progress tick is fine.
        let _ = self.tx.try_send(Ok(update));
    }
}

/// What a layer service does with a task.
#[tonic::async_trait]
pub trait TaskRunner: Send + Sync + 'static {
    /// The layer whose tables this service writes.
    fn layer(&self) -> Layer;
    /// Told of a task as it arrives, before it waits for a slot, so the runner can plan for
    /// the tasks queued behind the running ones. What it returns is dropped when the task
    /// ends, whether it ran, failed or was cancelled.
    fn arrived(&self, _task: &TaskRequest) -> Option<Box<dyn Send>> {
        None
    }
    async fn run(
        &self,
        task: TaskRequest,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Manifest, TaskError>;
}

/// The gRPC `StageService` over a [`TaskRunner`].
pub struct StageServer<R> {
    runner: Arc<R>,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// Tasks allowed to run at once; the rest wait (and say so in their progress).
    slots: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
}

impl<R: TaskRunner> StageServer<R> {
    /// Runs at most `max_tasks` tasks at once. Tasks are cancelled when `shutdown` is (their
    /// commits are atomic, so this is safe).
    pub fn new(runner: R, max_tasks: usize, shutdown: CancellationToken) -> Self {
        StageServer {
            runner: Arc::new(runner),
            running: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(max_tasks.max(1))),
            shutdown,
        }
    }

    pub fn into_server(self) -> StageServiceServer<Self> {
        StageServiceServer::new(self).max_decoding_message_size(64 * 1024 * 1024)
    }
}

/// Removes a task from the registry when its stream ends, and cancels it if the caller went away.
struct TaskGuard {
    id: String,
    token: CancellationToken,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.token.cancel();
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.id);
        }
    }
}

/// Counts a finished task attempt in this process's metrics.
fn record_metrics(
    layer: Layer,
    table: &TableRef,
    took: Duration,
    result: &Result<Manifest, TaskError>,
) {
    use medallion_telemetry::metrics::{self, ExpectationLabels, TaskLabels};
    let m = metrics::metrics();
    let outcome = match result {
        Ok(manifest) if manifest.committed => "succeeded",
        Ok(_) => "skipped",
        Err(TaskError::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    m.task_seconds
        .get_or_create(&TaskLabels {
            layer: layer.to_string(),
            outcome: outcome.to_string(),
        })
        .observe(took.as_secs_f64());
    let Ok(manifest) = result else { return };
    if manifest.committed {
        let labels = metrics::table(table.layer, &table.name);
        m.rows_written
            .get_or_create(&labels)
            .inc_by(manifest.rows_written);
        m.bytes_written
            .get_or_create(&labels)
            .inc_by(manifest.bytes_written);
    }
    for e in &manifest.expectations {
        m.expectation_failed_rows
            .get_or_create(&ExpectationLabels {
                table: table.to_string(),
                expectation: e.name.clone(),
                action: format!("{:?}", e.action).to_lowercase(),
            })
            .inc_by(e.failed_rows);
    }
    let span = tracing::Span::current();
    span.record("rows", manifest.rows_written);
    span.record("bytes", manifest.bytes_written);
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::TaskUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl<R: TaskRunner> pb::stage_service_server::StageService for StageServer<R> {
    type RunTaskStream = UpdateStream;

    async fn run_task(
        &self,
        request: Request<pb::RunTaskRequest>,
    ) -> Result<Response<Self::RunTaskStream>, Status> {
        let task = TaskRequest::try_from(request.into_inner())?;
        if task.table.layer != self.runner.layer() {
            return Err(Status::invalid_argument(format!(
                "this service writes {} tables, not {}",
                self.runner.layer(),
                task.table
            )));
        }
        let token = self.shutdown.child_token();
        {
            let mut running = self
                .running
                .lock()
                .map_err(|_| Status::internal("task registry poisoned"))?;
            running.insert(task.task_id.clone(), token.clone());
        }
        let guard = TaskGuard {
            id: task.task_id.clone(),
            token: token.clone(),
            running: self.running.clone(),
        };
        let (tx, rx) = mpsc::channel(64);
        let progress = Progress {
            table: task.table.clone(),
            tx: tx.clone(),
            last: Arc::new(Mutex::new(Instant::now())),
        };
        let runner = self.runner.clone();
        let arrival = runner.arrived(&task);
        let slots = self.slots.clone();
        let span = tracing::info_span!(
            "task",
            table = %task.table,
            medallion.pipeline = %task.pipeline.spec.name,
            medallion.run_id = %task.run_id,
            task = %task.task_id,
            rows = tracing::field::Empty,
            bytes = tracing::field::Empty,
        );
        tokio::spawn(async move {
            let _guard = guard;
            let _arrival = arrival;
            let started = Instant::now();
            let table = task.table.clone();
            // A caller that stops listening (timeout, cancel, crash) cancels the task.
            let work = async {
                // Each task holds whole tables in memory: waiting beats running out of it.
                let _slot = match slots.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        progress.report("queued: the service is busy with other tasks", 0, 0, true);
                        slots.acquire_owned().await.map_err(|_| TaskError::Cancelled)?
                    }
                };
                tracing::info!(table = %task.table, task = %task.task_id, "task running");
                runner.run(task, progress, token.clone()).await
            };
            let result = tokio::select! {
                r = work => r,
                _ = token.cancelled() => Err(TaskError::Cancelled),
                _ = tx.closed() => Err(TaskError::Cancelled),
            };
            record_metrics(runner.layer(), &table, started.elapsed(), &result);
            let message = match result {
                Ok(manifest) => {
                    tracing::info!(%table, version = manifest.version, committed = manifest.committed,
                        rows = manifest.rows_written, secs = started.elapsed().as_secs_f64(), "task finished");
                    for e in &manifest.expectations {
                        let update = pb::TaskUpdate {
                            update: Some(pb::task_update::Update::Expectation(expectation_to_pb(&table, e))),
                        };
                        let _ = tx.send(Ok(update)).await;
                    }
                    Ok(pb::TaskUpdate { update: Some(pb::task_update::Update::Manifest(manifest_to_pb(&manifest))) })
                }
                Err(e) => {
                    tracing::warn!(%table, error = %e, "task failed");
                    Err(Status::from(e))
                }
            };
            let _ = tx.send(message).await;
            // Dropping the guard here unregisters the task.
        }.instrument(span));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let id = request.into_inner().task_id;
        let token = self
            .running
            .lock()
            .map_err(|_| Status::internal("task registry poisoned"))?
            .get(&id)
            .cloned();
        if let Some(token) = &token {
            token.cancel();
        }
        Ok(Response::new(pb::CancelTaskResponse {
            found: token.is_some(),
        }))
    }
}

// ---- proto <-> domain, at the edge ----

pub fn layer_to_pb(layer: Layer) -> pb::Layer {
    match layer {
        Layer::Bronze => pb::Layer::Bronze,
        Layer::Silver => pb::Layer::Silver,
        Layer::Gold => pb::Layer::Gold,
        Layer::Quarantine => pb::Layer::Quarantine,
    }
}

pub fn layer_from_pb(layer: i32) -> Result<Layer, Status> {
    match pb::Layer::try_from(layer) {
        Ok(pb::Layer::Bronze) => Ok(Layer::Bronze),
        Ok(pb::Layer::Silver) => Ok(Layer::Silver),
        Ok(pb::Layer::Gold) => Ok(Layer::Gold),
        Ok(pb::Layer::Quarantine) => Ok(Layer::Quarantine),
        _ => Err(Status::invalid_argument(format!("unknown layer {layer}"))),
    }
}

pub fn table_to_pb(table: &TableRef) -> pb::TableId {
    pb::TableId {
        layer: layer_to_pb(table.layer) as i32,
        name: table.name.clone(),
    }
}

pub fn table_from_pb(table: Option<&pb::TableId>) -> Result<TableRef, Status> {
    let t = table.ok_or_else(|| Status::invalid_argument("missing table"))?;
    Ok(TableRef::new(layer_from_pb(t.layer)?, t.name.clone()))
}

pub fn action_to_pb(action: ExpectationAction) -> pb::ExpectationAction {
    match action {
        ExpectationAction::Warn => pb::ExpectationAction::Warn,
        ExpectationAction::Drop => pb::ExpectationAction::Drop,
        ExpectationAction::Quarantine => pb::ExpectationAction::Quarantine,
        ExpectationAction::Fail => pb::ExpectationAction::Fail,
    }
}

fn action_from_pb(action: i32) -> ExpectationAction {
    match pb::ExpectationAction::try_from(action) {
        Ok(pb::ExpectationAction::Drop) => ExpectationAction::Drop,
        Ok(pb::ExpectationAction::Quarantine) => ExpectationAction::Quarantine,
        Ok(pb::ExpectationAction::Fail) => ExpectationAction::Fail,
        _ => ExpectationAction::Warn,
    }
}

pub fn expectation_to_pb(table: &TableRef, e: &ExpectationCount) -> pb::ExpectationResult {
    pb::ExpectationResult {
        table: Some(table_to_pb(table)),
        name: e.name.clone(),
        action: action_to_pb(e.action) as i32,
        failed_rows: e.failed_rows,
        checked_rows: e.checked_rows,
    }
}

pub fn manifest_to_pb(m: &Manifest) -> pb::TaskManifest {
    let table = m.table.as_ref();
    pb::TaskManifest {
        table: table.map(table_to_pb),
        committed: m.committed,
        version: m.version,
        tickets: m.tickets.iter().map(|t| t.encode().to_vec()).collect(),
        rows_written: m.rows_written,
        bytes_written: m.bytes_written,
        table_rows: m.table_rows,
        expectations: match table {
            Some(t) => m
                .expectations
                .iter()
                .map(|e| expectation_to_pb(t, e))
                .collect(),
            None => Vec::new(),
        },
        quarantined_rows: m.quarantined_rows,
        source_files: m.source_files.clone(),
        input_versions: m.input_versions.clone().into_iter().collect(),
        source_lag: m
            .source_lag
            .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)),
    }
}

pub fn manifest_from_pb(m: &pb::TaskManifest) -> Result<Manifest, Status> {
    let tickets = m
        .tickets
        .iter()
        .map(|t| TableTicket::decode(t).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(Manifest {
        table: Some(table_from_pb(m.table.as_ref())?),
        committed: m.committed,
        version: m.version,
        tickets,
        rows_written: m.rows_written,
        bytes_written: m.bytes_written,
        table_rows: m.table_rows,
        expectations: m
            .expectations
            .iter()
            .map(|e| ExpectationCount {
                name: e.name.clone(),
                action: action_from_pb(e.action),
                failed_rows: e.failed_rows,
                checked_rows: e.checked_rows,
            })
            .collect(),
        quarantined_rows: m.quarantined_rows,
        source_files: m.source_files.clone(),
        input_versions: m.input_versions.clone().into_iter().collect(),
        source_lag: u64::try_from(m.source_lag).ok(),
    })
}

impl TryFrom<pb::RunTaskRequest> for TaskRequest {
    type Error = Status;
    fn try_from(r: pb::RunTaskRequest) -> Result<Self, Status> {
        let pipeline = Pipeline::parse(&r.spec_yaml)
            .map_err(|e| Status::invalid_argument(format!("spec: {e}")))?;
        let table = table_from_pb(r.table.as_ref())?;
        if pipeline.dag.node(&table).is_none() {
            return Err(Status::invalid_argument(format!(
                "pipeline {} has no table {table}",
                pipeline.spec.name
            )));
        }
        let mut inputs = BTreeMap::new();
        for m in &r.inputs {
            let m = manifest_from_pb(m)?;
            if let Some(t) = m.table.clone() {
                inputs.insert(t, m);
            }
        }
        Ok(TaskRequest {
            task_id: r.task_id,
            run_id: r.run_id,
            run_sequence: r.run_sequence,
            pipeline,
            base_dir: r.base_dir,
            table,
            full_refresh: r.full_refresh,
            inputs,
        })
    }
}

/// Serves a layer service: the stage API over `runner` plus Arrow Flight for `flight_layers`
/// of the lake, with health and reflection, until `shutdown` is cancelled.
pub async fn serve_layer<R: TaskRunner>(
    runner: R,
    max_tasks: usize,
    lake: medallion_lake::Lake,
    flight_layers: Vec<Layer>,
    listener: tokio::net::TcpListener,
    options: &medallion_server::ServiceOptions,
    shutdown: CancellationToken,
) -> Result<(), medallion_server::Error> {
    let stage = StageServer::new(runner, max_tasks, shutdown.clone());
    let flight = medallion_flight::LayerFlightService::new(lake, flight_layers);
    let routes = tonic::service::Routes::new(stage.into_server()).add_service(flight.into_server());
    medallion_server::serve(
        listener,
        routes,
        &[
            "medallion.v1.StageService",
            "arrow.flight.protocol.FlightService",
        ],
        options,
        shutdown,
    )
    .await
}
