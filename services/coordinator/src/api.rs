//! The public `PipelineService`: requests in, store records out as protobuf.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use medallion_proto::v1 as pb;
use medallion_spec::{Pipeline, TableRef};
use medallion_stage::{manifest_to_pb, table_to_pb};
use tonic::{Request, Response, Status};

use crate::{
    engine::{Engine, to_domain_manifest},
    store::{EventKind, EventRecord, PipelineRecord, RunRecord, RunState, TaskState},
};

pub struct PipelineApi {
    pub engine: Arc<Engine>,
}

fn table_pb(name: &str) -> Option<pb::TableId> {
    name.parse::<TableRef>().ok().map(|t| table_to_pb(&t))
}

fn pipeline_pb(engine: &Engine, p: &PipelineRecord) -> pb::Pipeline {
    let parsed = Pipeline::parse(&p.spec_yaml).ok();
    let now = crate::engine::now_ms();
    let freshness = engine
        .freshness(&p.name)
        .into_iter()
        .map(|f| pb::TableFreshness {
            table: table_pb(&f.table),
            version: f.version,
            committed_at_ms: f.committed_at_ms,
            age_ms: if f.committed_at_ms > 0 {
                (now - f.committed_at_ms).max(0)
            } else {
                -1
            },
            source_lag: f
                .source_lag
                .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)),
        })
        .collect();
    pb::Pipeline {
        mode: match parsed.as_ref().map(|pl| pl.spec.mode) {
            Some(medallion_spec::PipelineMode::Streaming) => "streaming".into(),
            _ => "batch".into(),
        },
        paused: p.paused,
        freshness,
        name: p.name.clone(),
        revision: p.revision,
        spec_yaml: p.spec_yaml.clone(),
        base_dir: p.base_dir.clone(),
        applied_at_ms: p.applied_at_ms,
        tables: parsed
            .as_ref()
            .map(|pl| {
                pl.dag
                    .nodes
                    .iter()
                    .map(|n| pb::TableNode {
                        table: Some(table_to_pb(&n.table)),
                        depends_on: n.depends_on.iter().map(table_to_pb).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        schedule: parsed
            .and_then(|pl| pl.spec.schedule.map(|s| s.cron().to_string()))
            .unwrap_or_default(),
        active_run_id: engine.active_run(&p.name).unwrap_or_default(),
    }
}

fn run_state_pb(s: RunState) -> pb::RunState {
    match s {
        RunState::Queued => pb::RunState::Queued,
        RunState::Running => pb::RunState::Running,
        RunState::Succeeded => pb::RunState::Succeeded,
        RunState::Failed => pb::RunState::Failed,
        RunState::Cancelled => pb::RunState::Cancelled,
    }
}

fn task_state_pb(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
        TaskState::Skipped => pb::TaskState::Skipped,
    }
}

fn action_pb(action: &str) -> i32 {
    (match action {
        "drop" => pb::ExpectationAction::Drop,
        "quarantine" => pb::ExpectationAction::Quarantine,
        "fail" => pb::ExpectationAction::Fail,
        _ => pb::ExpectationAction::Warn,
    }) as i32
}

fn run_pb(r: &RunRecord) -> pb::Run {
    pb::Run {
        id: r.id.clone(),
        pipeline: r.pipeline.clone(),
        pipeline_revision: r.pipeline_revision,
        sequence: r.sequence,
        state: run_state_pb(r.state) as i32,
        full_refresh: r.full_refresh,
        tables: r.tables.clone(),
        created_at_ms: r.created_at_ms,
        finished_at_ms: r.finished_at_ms,
        error: r.error.clone().unwrap_or_default(),
        trigger: r.trigger.clone(),
        tasks: r
            .tasks
            .iter()
            .map(|t| pb::Task {
                table: table_pb(&t.table),
                state: task_state_pb(t.state) as i32,
                attempts: t.attempts,
                manifest: t.manifest.as_ref().and_then(|m| {
                    let table = t.table.parse::<TableRef>().ok()?;
                    let mut pbm = manifest_to_pb(&to_domain_manifest(&table, m));
                    pbm.expectations = m
                        .expectations
                        .iter()
                        .map(|e| pb::ExpectationResult {
                            table: Some(table_to_pb(&table)),
                            name: e.name.clone(),
                            action: action_pb(&e.action),
                            failed_rows: e.failed_rows,
                            checked_rows: e.checked_rows,
                        })
                        .collect();
                    Some(pbm)
                }),
                error: t.error.clone().unwrap_or_default(),
                started_at_ms: t.started_at_ms,
                finished_at_ms: t.finished_at_ms,
            })
            .collect(),
    }
}

pub fn event_pb(run_id: &str, e: &EventRecord) -> pb::RunEvent {
    use pb::run_event::Event;
    let event = match &e.kind {
        EventKind::TaskQueued { table } => Event::TaskQueued(pb::TaskQueued {
            table: table_pb(table),
        }),
        EventKind::TaskStarted { table, attempt } => Event::TaskStarted(pb::TaskStarted {
            table: table_pb(table),
            attempt: *attempt,
        }),
        EventKind::TaskProgress {
            table,
            phase,
            rows,
            bytes,
        } => Event::TaskProgress(pb::TaskProgress {
            table: table_pb(table),
            phase: phase.clone(),
            rows: *rows,
            bytes: *bytes,
        }),
        EventKind::TaskCommitted {
            table,
            committed,
            version,
            rows_written,
            bytes_written,
            table_rows,
        } => Event::TaskCommitted(pb::TaskCommitted {
            table: table_pb(table),
            committed: *committed,
            version: *version,
            rows_written: *rows_written,
            bytes_written: *bytes_written,
            table_rows: *table_rows,
        }),
        EventKind::Expectation {
            table,
            name,
            action,
            failed_rows,
            checked_rows,
        } => Event::Expectation(pb::ExpectationResult {
            table: table_pb(table),
            name: name.clone(),
            action: action_pb(action),
            failed_rows: *failed_rows,
            checked_rows: *checked_rows,
        }),
        EventKind::TaskFailed {
            table,
            attempt,
            error,
            will_retry,
        } => Event::TaskFailed(pb::TaskFailed {
            table: table_pb(table),
            attempt: *attempt,
            error: error.clone(),
            will_retry: *will_retry,
        }),
        EventKind::RunFinished { state, error } => Event::RunFinished(pb::RunFinished {
            state: run_state_pb(*state) as i32,
            error: error.clone().unwrap_or_default(),
        }),
    };
    pb::RunEvent {
        run_id: run_id.to_string(),
        seq: e.seq,
        at_ms: e.at_ms,
        event: Some(event),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::pipeline_service_server::PipelineService for PipelineApi {
    async fn apply_pipeline(
        &self,
        request: Request<pb::ApplyPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let r = request.into_inner();
        let record = self.engine.apply(&r.spec_yaml, &r.base_dir)?;
        Ok(Response::new(pipeline_pb(&self.engine, &record)))
    }

    async fn get_pipeline(
        &self,
        request: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let name = request.into_inner().name;
        let record = self.engine.pipeline(&name)?;
        Ok(Response::new(pipeline_pb(&self.engine, &record)))
    }

    async fn list_pipelines(
        &self,
        _request: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        let pipelines = self
            .engine
            .pipelines()
            .iter()
            .map(|p| pipeline_pb(&self.engine, p))
            .collect();
        Ok(Response::new(pb::ListPipelinesResponse { pipelines }))
    }

    async fn delete_pipeline(
        &self,
        request: Request<pb::DeletePipelineRequest>,
    ) -> Result<Response<pb::DeletePipelineResponse>, Status> {
        self.engine.delete(&request.into_inner().name)?;
        Ok(Response::new(pb::DeletePipelineResponse {}))
    }

    async fn trigger_run(
        &self,
        request: Request<pb::TriggerRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = request.into_inner();
        let run = self
            .engine
            .trigger(&r.pipeline, r.full_refresh, r.tables, "manual")?;
        Ok(Response::new(run_pb(&run)))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(run_pb(
            &self.engine.run(&request.into_inner().run_id)?,
        )))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = request.into_inner();
        let runs = self
            .engine
            .runs(&r.pipeline, r.limit as usize)
            .iter()
            .map(run_pb)
            .collect();
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let run_id = request.into_inner().run_id;
        let (stored, live) = self.engine.watch(&run_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut last_seq = 0;
            for e in &stored {
                last_seq = e.seq;
                if tx.send(Ok(event_pb(&run_id, e))).await.is_err() {
                    return;
                }
            }
            let Some(mut live) = live else { return };
            loop {
                match live.recv().await {
                    Ok(e) => {
                        // Progress ticks are not stored, so they carry the seq of the last stored event + 1.
                        let progress = matches!(e.kind, EventKind::TaskProgress { .. });
                        if !progress && e.seq <= last_seq {
                            continue;
                        }
                        if !progress {
                            last_seq = e.seq;
                        }
                        let finished = matches!(e.kind, EventKind::RunFinished { .. });
                        if tx.send(Ok(event_pb(&run_id, &e))).await.is_err() || finished {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(run = %run_id, skipped = n, "watcher fell behind; progress events skipped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(run_pb(
            &self.engine.cancel(&request.into_inner().run_id)?,
        )))
    }

    async fn set_pipeline_paused(
        &self,
        request: Request<pb::SetPipelinePausedRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let r = request.into_inner();
        let record = self.engine.set_paused(&r.name, r.paused)?;
        Ok(Response::new(pipeline_pb(&self.engine, &record)))
    }
}

/// Checks `authorization: Bearer <token>` on every PipelineService call when a token is set.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<[u8]>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        BearerAuth {
            expected: token.map(|t| Arc::from(t.into_bytes())),
        }
    }
}

/// Compares in time independent of where the first difference is.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if same_token(token.trim().as_bytes(), expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the bearer token is not valid")),
            None => Err(Status::unauthenticated(
                "this API needs a bearer token: send `authorization: Bearer <token>` (the CLI reads MEDALLION_API_TOKEN)",
            )),
        }
    }
}
