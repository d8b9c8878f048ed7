//! Pipelines, runs and their execution: plans a run's DAG, runs independent tasks
//! concurrently on the layer services, retries with exponential backoff, enforces per-task
//! timeouts, cancels, and records every step in the store before announcing it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use medallion_proto::v1 as pb;
use medallion_proto::v1::stage_service_client::StageServiceClient;
use medallion_spec::{Layer, Pipeline, TableRef};
use medallion_stage::{manifest_to_pb, table_to_pb};
use tokio::{sync::broadcast, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

use crate::store::{
    EventKind, EventRecord, ExpectationRecord, ManifestRecord, PipelineRecord, RunRecord, RunState,
    Store, TaskRecord, TaskState,
};

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidSpec(#[from] medallion_spec::SpecError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> tonic::Status {
        match &e {
            EngineError::InvalidSpec(_) | EngineError::InvalidArgument(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            EngineError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            EngineError::Conflict(_) => tonic::Status::failed_precondition(e.to_string()),
            EngineError::Store(_) => {
                tracing::error!("{e}");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// gRPC channels to the three layer services (a DNS name or address each).
#[derive(Clone)]
pub struct LayerEndpoints {
    pub ingestor: Channel,
    /// Each ingestor replica on its own: a Kafka source's bronze task goes to every one, as
    /// each is a member of the source's consumer group.
    pub ingestor_replicas: medallion_server::Replicas,
    pub refiner: Channel,
    pub aggregator: Channel,
}

impl LayerEndpoints {
    fn for_layer(&self, layer: Layer) -> Channel {
        match layer {
            Layer::Bronze => self.ingestor.clone(),
            Layer::Silver | Layer::Quarantine => self.refiner.clone(),
            Layer::Gold => self.aggregator.clone(),
        }
    }
}

struct State {
    pipelines: BTreeMap<String, PipelineRecord>,
    runs: BTreeMap<String, RunRecord>,
    /// Highest run sequence handed out; sequences only grow, even across deletes and restarts.
    last_sequence: u64,
}

struct LiveRun {
    events: broadcast::Sender<EventRecord>,
    cancel: CancellationToken,
}

/// The coordinator's state and its run executor.
pub struct Engine {
    store: Store,
    state: Mutex<State>,
    live: Mutex<HashMap<String, LiveRun>>,
    endpoints: LayerEndpoints,
    shutdown: CancellationToken,
}

/// A task outcome inside the executor.
enum TaskOutcome {
    Succeeded(pb::TaskManifest),
    Failed,
    Cancelled,
}

impl Engine {
    /// Loads the store; runs a previous coordinator left unfinished are resumed by [`Engine::resume`].
    pub fn open(
        store: Store,
        endpoints: LayerEndpoints,
        shutdown: CancellationToken,
    ) -> Result<Arc<Engine>> {
        let pipelines = store
            .load_pipelines()?
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let runs: BTreeMap<String, RunRecord> = store
            .load_runs()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let last_sequence = runs.values().map(|r| r.sequence).max().unwrap_or(0);
        Ok(Arc::new(Engine {
            store,
            state: Mutex::new(State {
                pipelines,
                runs,
                last_sequence,
            }),
            live: Mutex::new(HashMap::new()),
            endpoints,
            shutdown,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave records half-updated on disk (writes are atomic).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restarts every run that was queued or running when the coordinator stopped.
    pub fn resume(self: &Arc<Self>) {
        let ids: Vec<String> = self
            .state()
            .runs
            .values()
            .filter(|r| !r.state.is_finished())
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            tracing::info!(run = %id, "resuming run interrupted by a restart");
            self.start(id, "resume");
        }
    }

    // ---- pipelines ----

    pub fn apply(&self, spec_yaml: &str, base_dir: &str) -> Result<PipelineRecord> {
        let pipeline = Pipeline::parse(spec_yaml)?;
        let name = pipeline.spec.name.clone();
        let mut state = self.state();
        // Tables live at <lake>/<layer>/<name>: two pipelines must not write the same one.
        for other in state.pipelines.values().filter(|p| p.name != name) {
            let Ok(theirs) = Pipeline::parse(&other.spec_yaml) else {
                continue;
            };
            if let Some(node) = pipeline
                .dag
                .nodes
                .iter()
                .find(|n| theirs.dag.node(&n.table).is_some())
            {
                return Err(EngineError::InvalidArgument(format!(
                    "table {} is already written by pipeline `{}`; tables share one lake namespace, so rename it",
                    node.table, other.name
                )));
            }
        }
        let revision = state.pipelines.get(&name).map_or(1, |p| p.revision + 1);
        let last_tick_ms = state.pipelines.get(&name).and_then(|p| p.last_tick_ms);
        let paused = state.pipelines.get(&name).is_some_and(|p| p.paused);
        let record = PipelineRecord {
            name: name.clone(),
            revision,
            spec_yaml: spec_yaml.to_string(),
            base_dir: base_dir.to_string(),
            applied_at_ms: now_ms(),
            last_tick_ms,
            paused,
        };
        self.store.save_pipeline(&record)?;
        state.pipelines.insert(name, record.clone());
        Ok(record)
    }

    pub fn pipeline(&self, name: &str) -> Result<PipelineRecord> {
        self.state()
            .pipelines
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no pipeline named `{name}`")))
    }

    pub fn pipelines(&self) -> Vec<PipelineRecord> {
        self.state().pipelines.values().cloned().collect()
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let mut state = self.state();
        if active_run(&state, name).is_some() {
            return Err(EngineError::Conflict(format!(
                "pipeline `{name}` has a run in progress; cancel it first"
            )));
        }
        if state.pipelines.remove(name).is_none() {
            return Err(EngineError::NotFound(format!("no pipeline named `{name}`")));
        }
        self.store.delete_pipeline(name)?;
        Ok(())
    }

    pub fn active_run(&self, pipeline: &str) -> Option<String> {
        active_run(&self.state(), pipeline)
    }

    /// Pauses or resumes the pipeline's schedule or streaming (kept across restarts).
    pub fn set_paused(&self, pipeline: &str, paused: bool) -> Result<PipelineRecord> {
        let mut state = self.state();
        let p = state
            .pipelines
            .get_mut(pipeline)
            .ok_or_else(|| EngineError::NotFound(format!("no pipeline named `{pipeline}`")))?;
        p.paused = paused;
        self.store.save_pipeline(p)?;
        Ok(p.clone())
    }

    /// Every table's latest version as the pipeline's runs on record left it. A version counts
    /// as committed when the earliest task on record that reported it finished: usually the
    /// task that committed it, but a Kafka source's bronze is committed by its consumers between
    /// tasks, so the first task to see a version may not be the one that wrote it.
    pub fn freshness(&self, pipeline: &str) -> Vec<TableFreshness> {
        let mut tables: BTreeMap<String, TableFreshness> = BTreeMap::new();
        // Newest run first: the first manifest of a table names its latest version, and older
        // runs that reported the same version move its commit time back.
        for run in self.runs(pipeline, usize::MAX) {
            for task in &run.tasks {
                let Some(m) = &task.manifest else { continue };
                let entry = tables
                    .entry(task.table.clone())
                    .or_insert_with(|| TableFreshness {
                        table: task.table.clone(),
                        version: m.version,
                        committed_at_ms: 0,
                        source_lag: m.source_lag,
                    });
                if m.version == entry.version && task.finished_at_ms > 0 {
                    entry.committed_at_ms = task.finished_at_ms;
                }
            }
        }
        tables.into_values().collect()
    }

    /// Forgets all but the newest `keep` finished runs of `pipeline` started by `trigger`
    /// (continuous streaming would otherwise pile up a run record per micro-batch).
    pub fn prune_runs(&self, pipeline: &str, trigger: &str, keep: usize) {
        let mut state = self.state();
        let mut finished: Vec<(i64, u64, String)> = state
            .runs
            .values()
            .filter(|r| r.pipeline == pipeline && r.trigger == trigger && r.state.is_finished())
            .map(|r| (r.created_at_ms, r.sequence, r.id.clone()))
            .collect();
        if finished.len() <= keep {
            return;
        }
        finished.sort();
        let excess = finished.len() - keep;
        for (_, _, id) in finished.into_iter().take(excess) {
            if let Err(e) = self.store.delete_run(&id) {
                tracing::warn!(run = %id, "cannot forget an old run: {e}");
                continue;
            }
            state.runs.remove(&id);
        }
    }

    pub fn set_last_tick(&self, pipeline: &str, at_ms: i64) -> Result<()> {
        let mut state = self.state();
        if let Some(p) = state.pipelines.get_mut(pipeline) {
            p.last_tick_ms = Some(at_ms);
            self.store.save_pipeline(p)?;
        }
        Ok(())
    }

    // ---- runs ----

    pub fn trigger(
        self: &Arc<Self>,
        pipeline: &str,
        full_refresh: bool,
        tables: Vec<String>,
        trigger: &str,
    ) -> Result<RunRecord> {
        let record = {
            let mut state = self.state();
            let p =
                state.pipelines.get(pipeline).cloned().ok_or_else(|| {
                    EngineError::NotFound(format!("no pipeline named `{pipeline}`"))
                })?;
            if let Some(active) = active_run(&state, pipeline) {
                return Err(EngineError::Conflict(format!(
                    "pipeline `{pipeline}` already has run {active} in progress"
                )));
            }
            let parsed = Pipeline::parse(&p.spec_yaml)?;
            let mut selected = Vec::new();
            for t in &tables {
                let table: TableRef = t
                    .parse()
                    .map_err(|e: String| EngineError::InvalidArgument(format!("tables: {e}")))?;
                if parsed.dag.node(&table).is_none() {
                    return Err(EngineError::InvalidArgument(format!(
                        "tables: pipeline `{pipeline}` has no table {table}"
                    )));
                }
                selected.push(table);
            }
            let plan = if selected.is_empty() {
                parsed.dag.nodes.iter().map(|n| n.table.clone()).collect()
            } else {
                parsed.dag.with_upstream(&selected)
            };
            // Sequences order the Delta transactions of a pipeline's tables: they must only grow.
            let sequence = (now_ms().max(0) as u64).max(state.last_sequence + 1);
            state.last_sequence = sequence;
            let record = RunRecord {
                id: uuid::Uuid::new_v4().to_string(),
                pipeline: pipeline.to_string(),
                pipeline_revision: p.revision,
                sequence,
                state: RunState::Queued,
                full_refresh,
                tables,
                created_at_ms: now_ms(),
                finished_at_ms: 0,
                error: None,
                tasks: plan
                    .iter()
                    .map(|t| TaskRecord {
                        table: t.to_string(),
                        state: TaskState::Pending,
                        attempts: 0,
                        manifest: None,
                        error: None,
                        started_at_ms: 0,
                        finished_at_ms: 0,
                    })
                    .collect(),
                trigger: trigger.to_string(),
                spec_yaml: p.spec_yaml.clone(),
                base_dir: p.base_dir.clone(),
                events: Vec::new(),
            };
            self.store.save_run(&record)?;
            state.runs.insert(record.id.clone(), record.clone());
            record
        };
        self.start(record.id.clone(), trigger);
        Ok(record)
    }

    fn start(self: &Arc<Self>, run_id: String, trigger: &str) {
        let (events, _) = broadcast::channel(1024);
        let cancel = self.shutdown.child_token();
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            run_id.clone(),
            LiveRun {
                events,
                cancel: cancel.clone(),
            },
        );
        let engine = self.clone();
        let pipeline = self
            .state()
            .runs
            .get(&run_id)
            .map(|r| r.pipeline.clone())
            .unwrap_or_default();
        // The root of the run's own trace (whether a call, the schedule or a restart started
        // it): every task, stage call, Flight read and commit of the run, in every service, is
        // below it.
        let span = tracing::info_span!(
            parent: None,
            "run",
            otel.name = %format!("run {pipeline}"),
            medallion.pipeline = %pipeline,
            medallion.run_id = %run_id,
            trigger,
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move { engine.execute(run_id, cancel).await },
            span,
        ));
    }

    pub fn run(&self, id: &str) -> Result<RunRecord> {
        self.state()
            .runs
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no run with id `{id}`")))
    }

    /// Runs newest first, optionally of one pipeline.
    pub fn runs(&self, pipeline: &str, limit: usize) -> Vec<RunRecord> {
        let state = self.state();
        let mut runs: Vec<RunRecord> = state
            .runs
            .values()
            .filter(|r| pipeline.is_empty() || r.pipeline == pipeline)
            .cloned()
            .collect();
        runs.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then(b.sequence.cmp(&a.sequence))
        });
        runs.truncate(if limit == 0 { 100 } else { limit });
        runs
    }

    pub fn cancel(&self, id: &str) -> Result<RunRecord> {
        let run = self.run(id)?;
        if run.state.is_finished() {
            return Ok(run);
        }
        let live = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.cancel.clone());
        match live {
            // The executor marks the tasks and finishes the run.
            Some(token) => token.cancel(),
            // Not executing (e.g. waiting for a resume): nothing runs, so finish it here.
            None => {
                self.record(id, None, |r| {
                    for t in r
                        .tasks
                        .iter_mut()
                        .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running))
                    {
                        t.state = TaskState::Cancelled;
                    }
                });
                self.finish(id, RunState::Cancelled, Some("cancelled".into()));
            }
        }
        self.run(id)
    }

    /// Stored events of a run and, if it is still going, a receiver of the live ones.
    pub fn watch(
        &self,
        id: &str,
    ) -> Result<(Vec<EventRecord>, Option<broadcast::Receiver<EventRecord>>)> {
        // Subscribe before reading the record so no event falls between the two.
        let rx = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.events.subscribe());
        let run = self.run(id)?;
        let rx = if run.state.is_finished() { None } else { rx };
        Ok((run.events, rx))
    }

    /// Applies `change` to a run, persists it, and announces `event` (progress is live only).
    fn record(&self, run_id: &str, event: Option<EventKind>, change: impl FnOnce(&mut RunRecord)) {
        let announced = {
            let mut state = self.state();
            let Some(run) = state.runs.get_mut(run_id) else {
                return;
            };
            change(run);
            let announced = event.map(|kind| {
                let seq = run.events.last().map_or(0, |e| e.seq) + 1;
                let e = EventRecord {
                    seq,
                    at_ms: now_ms(),
                    kind,
                };
                if !matches!(e.kind, EventKind::TaskProgress { .. }) {
                    run.events.push(e.clone());
                }
                e
            });
            // Progress ticks are live only: nothing to persist.
            let progress_only = announced
                .as_ref()
                .is_some_and(|e| matches!(e.kind, EventKind::TaskProgress { .. }));
            if !progress_only && let Err(e) = self.store.save_run(run) {
                tracing::error!("cannot persist run {run_id}: {e}");
            }
            announced
        };
        if let Some(e) = announced
            && let Some(live) = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(run_id)
        {
            let _ = live.events.send(e);
        }
    }

    fn set_task(
        &self,
        run_id: &str,
        table: &str,
        event: Option<EventKind>,
        change: impl FnOnce(&mut TaskRecord),
    ) {
        self.record(run_id, event, |run| {
            if let Some(t) = run.tasks.iter_mut().find(|t| t.table == table) {
                change(t);
            }
        });
    }

    async fn execute(self: Arc<Self>, run_id: String, cancel: CancellationToken) {
        let Ok(run) = self.run(&run_id) else { return };
        let parsed = match Pipeline::parse(&run.spec_yaml) {
            Ok(p) => p,
            Err(e) => {
                self.finish(
                    &run_id,
                    RunState::Failed,
                    Some(format!("invalid spec: {e}")),
                );
                return;
            }
        };
        self.record(&run_id, None, |r| {
            r.state = RunState::Running;
            // On resume, unfinished tasks start over; their commits are idempotent per run sequence.
            for t in &mut r.tasks {
                if t.state != TaskState::Succeeded {
                    t.state = TaskState::Pending;
                }
            }
        });
        for t in &run.tasks {
            if t.state != TaskState::Succeeded {
                self.record(
                    &run_id,
                    Some(EventKind::TaskQueued {
                        table: t.table.clone(),
                    }),
                    |_| {},
                );
            }
        }
        let mut states: BTreeMap<String, TaskState> = self
            .run(&run_id)
            .map(|r| r.tasks.iter().map(|t| (t.table.clone(), t.state)).collect())
            .unwrap_or_default();
        let mut manifests: BTreeMap<String, pb::TaskManifest> = BTreeMap::new();
        if let Ok(r) = self.run(&run_id) {
            for t in &r.tasks {
                if let (TaskState::Succeeded, Some(m)) = (t.state, &t.manifest)
                    && let Ok(table) = t.table.parse::<TableRef>()
                {
                    manifests.insert(
                        t.table.clone(),
                        manifest_to_pb(&to_domain_manifest(&table, m)),
                    );
                }
            }
        }
        let mut running: JoinSet<(String, TaskOutcome)> = JoinSet::new();
        // Which table each spawned task runs, to account for one that panics.
        let mut spawned: HashMap<tokio::task::Id, String> = HashMap::new();
        loop {
            // Start every task whose inputs are done; skip those whose inputs failed.
            let mut progressed = true;
            while progressed {
                progressed = false;
                let pending: Vec<String> = states
                    .iter()
                    .filter(|(_, s)| **s == TaskState::Pending)
                    .map(|(t, _)| t.clone())
                    .collect();
                for table in pending {
                    let Ok(table_ref) = table.parse::<TableRef>() else {
                        continue;
                    };
                    let deps = parsed
                        .dag
                        .node(&table_ref)
                        .map(|n| n.depends_on.clone())
                        .unwrap_or_default();
                    let dep_states: Vec<TaskState> = deps
                        .iter()
                        .map(|d| {
                            states
                                .get(&d.to_string())
                                .copied()
                                .unwrap_or(TaskState::Succeeded)
                        })
                        .collect();
                    // Downstream of a cancelled task is cancelled; of a failed one, skipped.
                    let blocked = if dep_states.contains(&TaskState::Cancelled) {
                        Some((TaskState::Cancelled, "run cancelled"))
                    } else if dep_states
                        .iter()
                        .any(|s| matches!(s, TaskState::Failed | TaskState::Skipped))
                    {
                        Some((TaskState::Skipped, "an upstream table failed"))
                    } else {
                        None
                    };
                    if let Some((state, reason)) = blocked {
                        states.insert(table.clone(), state);
                        self.set_task(&run_id, &table, None, |t| {
                            t.state = state;
                            t.error = Some(reason.into());
                        });
                        progressed = true;
                        continue;
                    }
                    if cancel.is_cancelled()
                        || !dep_states.iter().all(|s| *s == TaskState::Succeeded)
                    {
                        continue;
                    }
                    let inputs: Vec<pb::TaskManifest> = deps
                        .iter()
                        .filter_map(|d| manifests.get(&d.to_string()).cloned())
                        .collect();
                    states.insert(table.clone(), TaskState::Running);
                    let request = pb::RunTaskRequest {
                        task_id: format!("{run_id}/{table}"),
                        run_id: run_id.clone(),
                        pipeline: run.pipeline.clone(),
                        run_sequence: run.sequence,
                        spec_yaml: run.spec_yaml.clone(),
                        base_dir: run.base_dir.clone(),
                        table: Some(table_to_pb(&table_ref)),
                        full_refresh: run.full_refresh,
                        inputs,
                    };
                    let policy = parsed.policy(&table_ref);
                    let engine = self.clone();
                    let (run_id, cancel) = (run_id.clone(), cancel.clone());
                    let span = tracing::info_span!(
                        "task",
                        otel.name = %format!("task {table_ref}"),
                        table = %table_ref,
                        medallion.run_id = %run_id,
                    );
                    let handle = running.spawn(tracing::Instrument::instrument(
                        async move {
                            let outcome = engine
                                .run_task(&run_id, table_ref.clone(), request, policy, cancel)
                                .await;
                            (table_ref.to_string(), outcome)
                        },
                        span,
                    ));
                    spawned.insert(handle.id(), table.clone());
                    progressed = true;
                }
            }
            let Some(joined) = running.join_next_with_id().await else {
                break;
            };
            let (table, outcome) = match joined {
                Ok((_, done)) => done,
                Err(e) => {
                    let Some(table) = spawned.get(&e.id()).cloned() else {
                        continue;
                    };
                    let error = format!("coordinator task failed: {e}");
                    self.set_task(&run_id, &table, None, |t| {
                        t.state = TaskState::Failed;
                        t.error = Some(error);
                        t.finished_at_ms = now_ms();
                    });
                    (table, TaskOutcome::Failed)
                }
            };
            let state = match outcome {
                TaskOutcome::Succeeded(m) => {
                    manifests.insert(table.clone(), m);
                    TaskState::Succeeded
                }
                TaskOutcome::Failed => TaskState::Failed,
                TaskOutcome::Cancelled => TaskState::Cancelled,
            };
            states.insert(table, state);
        }
        let final_run = self.run(&run_id).ok();
        let first_error = final_run
            .as_ref()
            .and_then(|r| r.tasks.iter().find(|t| t.state == TaskState::Failed))
            .map(|t| format!("{}: {}", t.table, t.error.clone().unwrap_or_default()));
        let (state, error) = if cancel.is_cancelled() && !self.shutdown.is_cancelled() {
            for (table, s) in &states {
                if *s == TaskState::Pending {
                    self.set_task(&run_id, table, None, |t| t.state = TaskState::Cancelled);
                }
            }
            (RunState::Cancelled, Some("cancelled".to_string()))
        } else if self.shutdown.is_cancelled()
            && states.values().any(|s| *s != TaskState::Succeeded)
        {
            // The coordinator is stopping: leave the run unfinished so the next start resumes it.
            tracing::info!(run = %run_id, "coordinator stopping; run will resume on restart");
            return;
        } else if let Some(e) = first_error {
            (RunState::Failed, Some(e))
        } else {
            (RunState::Succeeded, None)
        };
        self.finish(&run_id, state, error);
    }

    fn finish(&self, run_id: &str, state: RunState, error: Option<String>) {
        if let Some(run) = self.state().runs.get(run_id) {
            medallion_telemetry::metrics::metrics()
                .runs
                .get_or_create(&medallion_telemetry::metrics::RunLabels {
                    pipeline: run.pipeline.clone(),
                    outcome: format!("{state:?}").to_lowercase(),
                })
                .inc();
        }
        self.record(
            run_id,
            Some(EventKind::RunFinished {
                state,
                error: error.clone(),
            }),
            |r| {
                r.state = state;
                r.error = error;
                r.finished_at_ms = now_ms();
            },
        );
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id);
    }

    /// One task with its retries, backoff and timeout.
    async fn run_task(
        &self,
        run_id: &str,
        table: TableRef,
        request: pb::RunTaskRequest,
        policy: medallion_spec::TaskPolicy,
        cancel: CancellationToken,
    ) -> TaskOutcome {
        let name = table.to_string();
        let group_readers = group_readers(&table, &request);
        let mut backoff = Duration::from_millis(policy.backoff_ms);
        for attempt in 1..=policy.retries.saturating_add(1) {
            self.set_task(
                run_id,
                &name,
                Some(EventKind::TaskStarted {
                    table: name.clone(),
                    attempt,
                }),
                |t| {
                    t.state = TaskState::Running;
                    t.attempts = attempt;
                    t.started_at_ms = now_ms();
                },
            );
            // Each attempt has its own task id, so cancelling reaches the attempt that runs now.
            let mut attempt_request = request.clone();
            attempt_request.task_id = format!("{}#{attempt}", request.task_id);
            let task_id = attempt_request.task_id.clone();
            let targets = self.targets(&table, group_readers);
            let call = self.call_readers(run_id, &table, attempt_request, &targets, &cancel);
            let result = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(policy.timeout_secs), call) => match r {
                    Ok(r) => r,
                    Err(_) => Err(tonic::Status::deadline_exceeded(format!("task timed out after {}s", policy.timeout_secs))),
                },
                _ = cancel.cancelled() => Err(tonic::Status::cancelled("run cancelled")),
            };
            match result {
                Ok(manifest) => {
                    let record = manifest_record(&manifest);
                    let event = EventKind::TaskCommitted {
                        table: name.clone(),
                        committed: manifest.committed,
                        version: manifest.version,
                        rows_written: manifest.rows_written,
                        bytes_written: manifest.bytes_written,
                        table_rows: manifest.table_rows,
                    };
                    self.set_task(run_id, &name, Some(event), |t| {
                        t.state = TaskState::Succeeded;
                        t.manifest = Some(record);
                        t.error = None;
                        t.finished_at_ms = now_ms();
                    });
                    return TaskOutcome::Succeeded(manifest);
                }
                Err(status) if cancel.is_cancelled() => {
                    let ids = reader_task_ids(&task_id, targets.len() as u32);
                    for (task_id, channel) in ids.into_iter().zip(targets) {
                        let mut client = StageServiceClient::new(channel);
                        let _ = client.cancel_task(pb::CancelTaskRequest { task_id }).await;
                    }
                    self.set_task(run_id, &name, None, |t| {
                        t.state = TaskState::Cancelled;
                        t.error = Some(status.message().to_string());
                        t.finished_at_ms = now_ms();
                    });
                    return TaskOutcome::Cancelled;
                }
                Err(status) => {
                    let retryable = !matches!(
                        status.code(),
                        Code::InvalidArgument
                            | Code::FailedPrecondition
                            | Code::NotFound
                            | Code::Unimplemented
                    );
                    let will_retry = retryable && attempt <= policy.retries;
                    let error = status.message().to_string();
                    let event = EventKind::TaskFailed {
                        table: name.clone(),
                        attempt,
                        error: error.clone(),
                        will_retry,
                    };
                    self.set_task(run_id, &name, Some(event), |t| {
                        t.error = Some(error.clone());
                        if !will_retry {
                            t.state = TaskState::Failed;
                            t.finished_at_ms = now_ms();
                        }
                    });
                    if !will_retry {
                        return TaskOutcome::Failed;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = cancel.cancelled() => {
                            self.set_task(run_id, &name, None, |t| t.state = TaskState::Cancelled);
                            return TaskOutcome::Cancelled;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(policy.max_backoff_ms));
                }
            }
        }
        TaskOutcome::Failed
    }

    /// Where a task's calls go: one to the layer's balanced channel, or, for a Kafka source
    /// read by its consumer group, one to each healthy ingestor replica (at most `readers`).
    fn targets(&self, table: &TableRef, group_readers: Option<usize>) -> Vec<Channel> {
        let balanced = vec![self.endpoints.for_layer(table.layer)];
        let Some(most) = group_readers else {
            return balanced;
        };
        let replicas: Vec<Channel> = self
            .endpoints
            .ingestor_replicas
            .healthy()
            .into_iter()
            .take(most)
            .map(|(_, channel)| channel)
            .collect();
        // None healthy yet: the balanced channel waits for one.
        if replicas.is_empty() {
            balanced
        } else {
            replicas
        }
    }

    /// Runs a task as one call per target at once and merges their manifests: the table as
    /// the last commit left it, with the rows and lag of all.
    async fn call_readers(
        &self,
        run_id: &str,
        table: &TableRef,
        request: pb::RunTaskRequest,
        targets: &[Channel],
        cancel: &CancellationToken,
    ) -> Result<pb::TaskManifest, tonic::Status> {
        if targets.len() <= 1 {
            let channel = targets
                .first()
                .cloned()
                .unwrap_or_else(|| self.endpoints.for_layer(table.layer));
            return self
                .call_stage(run_id, table, request, channel, cancel)
                .await;
        }
        let calls = reader_task_ids(&request.task_id, targets.len() as u32)
            .into_iter()
            .zip(targets)
            .map(|(task_id, channel)| {
                let mut request = request.clone();
                request.task_id = task_id;
                self.call_stage(run_id, table, request, channel.clone(), cancel)
            });
        let mut merged: Option<pb::TaskManifest> = None;
        // The first failure ends the task (and drops the other calls, which cancels them).
        for m in futures::future::try_join_all(calls).await? {
            merged = Some(match merged {
                None => m,
                Some(mut acc) => {
                    let (rows, bytes, quarantined, committed) = (
                        acc.rows_written + m.rows_written,
                        acc.bytes_written + m.bytes_written,
                        acc.quarantined_rows + m.quarantined_rows,
                        acc.committed || m.committed,
                    );
                    let lag = match (acc.source_lag, m.source_lag) {
                        (a, b) if a < 0 || b < 0 => -1,
                        (a, b) => a + b,
                    };
                    if m.version > acc.version {
                        acc = m;
                    }
                    acc.rows_written = rows;
                    acc.bytes_written = bytes;
                    acc.quarantined_rows = quarantined;
                    acc.committed = committed;
                    acc.source_lag = lag;
                    acc
                }
            });
        }
        merged.ok_or_else(|| tonic::Status::internal("no reader ran"))
    }

    /// Calls the layer service and relays its progress until the manifest arrives.
    async fn call_stage(
        &self,
        run_id: &str,
        table: &TableRef,
        request: pb::RunTaskRequest,
        channel: Channel,
        cancel: &CancellationToken,
    ) -> Result<pb::TaskManifest, tonic::Status> {
        let name = table.to_string();
        let mut client =
            StageServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let span = tracing::info_span!(
            "stage.run_task",
            otel.kind = "client",
            table = %name,
            task = %request.task_id,
        );
        let mut request = tonic::Request::new(request);
        {
            let _entered = span.enter();
            medallion_telemetry::inject_context(request.metadata_mut());
        }
        let started = tracing::Instrument::instrument(client.run_task(request), span.clone());
        let mut stream = tokio::time::timeout(medallion_server::REPLICA_WAIT, started)
            .await
            .map_err(|_| {
                tonic::Status::unavailable(format!(
                    "{name}: no healthy {} replica answered within {}s",
                    table.layer,
                    medallion_server::REPLICA_WAIT.as_secs()
                ))
            })??
            .into_inner();
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                _ = cancel.cancelled() => return Err(tonic::Status::cancelled("run cancelled")),
            };
            let Some(update) = message else {
                return Err(tonic::Status::unavailable(format!(
                    "{name}: the layer service ended the task without a manifest"
                )));
            };
            match update.update {
                Some(pb::task_update::Update::Progress(p)) => {
                    let kind = EventKind::TaskProgress {
                        table: name.clone(),
                        phase: p.phase,
                        rows: p.rows,
                        bytes: p.bytes,
                    };
                    self.record(run_id, Some(kind), |_| {});
                }
                Some(pb::task_update::Update::Expectation(e)) => {
                    let kind = EventKind::Expectation {
                        table: name.clone(),
                        name: e.name,
                        action: action_name(e.action).to_string(),
                        failed_rows: e.failed_rows,
                        checked_rows: e.checked_rows,
                    };
                    self.record(run_id, Some(kind), |_| {});
                }
                Some(pb::task_update::Update::Manifest(m)) => return Ok(m),
                None => {}
            }
        }
    }
}

fn active_run(state: &State, pipeline: &str) -> Option<String> {
    state
        .runs
        .values()
        .find(|r| r.pipeline == pipeline && !r.state.is_finished())
        .map(|r| r.id.clone())
}

/// For a Kafka source's bronze task, which its consumer group reads: the most ingestor
/// replicas to call (`None` for every other task).
fn group_readers(table: &TableRef, request: &pb::RunTaskRequest) -> Option<usize> {
    if table.layer != Layer::Bronze {
        return None;
    }
    let pipeline = Pipeline::parse(&request.spec_yaml).ok()?;
    let kafka = pipeline.source(&table.name)?.kafka.as_ref()?;
    Some(kafka.readers.map_or(usize::MAX, |r| r as usize))
}

/// The task ids of a task's readers (its own id when it has one reader).
fn reader_task_ids(task_id: &str, shards: u32) -> Vec<String> {
    if shards <= 1 {
        return vec![task_id.to_string()];
    }
    (0..shards).map(|i| format!("{task_id}/{i}")).collect()
}

/// One table's latest version, per [`Engine::freshness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFreshness {
    /// `layer.name`.
    pub table: String,
    pub version: i64,
    /// Finish time of the task that committed `version`; 0 if no run on record did.
    pub committed_at_ms: i64,
    pub source_lag: Option<u64>,
}

pub fn action_name(action: i32) -> &'static str {
    match pb::ExpectationAction::try_from(action) {
        Ok(pb::ExpectationAction::Drop) => "drop",
        Ok(pb::ExpectationAction::Quarantine) => "quarantine",
        Ok(pb::ExpectationAction::Fail) => "fail",
        _ => "warn",
    }
}

fn manifest_record(m: &pb::TaskManifest) -> ManifestRecord {
    ManifestRecord {
        committed: m.committed,
        version: m.version,
        tickets: m
            .tickets
            .iter()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect(),
        rows_written: m.rows_written,
        bytes_written: m.bytes_written,
        table_rows: m.table_rows,
        quarantined_rows: m.quarantined_rows,
        source_files: m.source_files.clone(),
        input_versions: m.input_versions.clone().into_iter().collect(),
        source_lag: u64::try_from(m.source_lag).ok(),
        expectations: m
            .expectations
            .iter()
            .map(|e| ExpectationRecord {
                name: e.name.clone(),
                action: action_name(e.action).to_string(),
                failed_rows: e.failed_rows,
                checked_rows: e.checked_rows,
            })
            .collect(),
    }
}

/// The stage-API manifest a stored task record stands for (tickets are JSON text).
pub fn to_domain_manifest(table: &TableRef, m: &ManifestRecord) -> medallion_stage::Manifest {
    medallion_stage::Manifest {
        table: Some(table.clone()),
        committed: m.committed,
        version: m.version,
        tickets: m
            .tickets
            .iter()
            .filter_map(|t| medallion_flight::TableTicket::decode(t.as_bytes()).ok())
            .collect(),
        rows_written: m.rows_written,
        bytes_written: m.bytes_written,
        table_rows: m.table_rows,
        expectations: Vec::new(),
        quarantined_rows: m.quarantined_rows,
        source_files: m.source_files.clone(),
        input_versions: m.input_versions.clone(),
        source_lag: m.source_lag,
    }
}
