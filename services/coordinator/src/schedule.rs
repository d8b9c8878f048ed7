//! Cron schedules: a pipeline with `schedule` runs at each tick, never overlapping itself.
//! Ticks missed while the coordinator was down are skipped unless the schedule asks to
//! `catch_up`, in which case one run makes up for them.
//!
//! A `mode: streaming` pipeline runs back to back instead: a new run (one micro-batch through
//! every layer) starts as soon as the last one ended, after a pause when it failed. Paused
//! pipelines start nothing.

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use medallion_spec::{Pipeline, PipelineMode};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, now_ms};

/// Checks every pipeline's schedule four times a second until `shutdown`.
pub async fn run_scheduler(engine: Arc<Engine>, shutdown: CancellationToken) {
    // Next tick per pipeline (by name and revision, so a re-applied spec is picked up).
    let mut next: HashMap<(String, u64), DateTime<Utc>> = HashMap::new();
    let started = Utc::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {},
            _ = shutdown.cancelled() => return,
        }
        let now = Utc::now();
        for p in engine.pipelines() {
            let Ok(parsed) = Pipeline::parse(&p.spec_yaml) else {
                continue;
            };
            if p.paused {
                // Ticks while paused are skipped: the next one is after the resume.
                if let Some(cron) = parsed
                    .spec
                    .schedule
                    .as_ref()
                    .and_then(|s| cron::Schedule::from_str(s.cron()).ok())
                {
                    next.insert(
                        (p.name.clone(), p.revision),
                        cron.after(&now).next().unwrap_or(DateTime::<Utc>::MAX_UTC),
                    );
                }
                continue;
            }
            if parsed.spec.mode == PipelineMode::Streaming {
                next_micro_batch(&engine, &p.name);
                continue;
            }
            let Some(schedule) = parsed.spec.schedule else {
                continue;
            };
            let Ok(cron) = cron::Schedule::from_str(schedule.cron()) else {
                continue;
            };
            let key = (p.name.clone(), p.revision);
            let due = *next.entry(key.clone()).or_insert_with(|| {
                let last = p
                    .last_tick_ms
                    .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
                let from = match (schedule.catch_up(), last) {
                    (true, Some(last)) => last,
                    _ => started.max(
                        Utc.timestamp_millis_opt(p.applied_at_ms)
                            .single()
                            .unwrap_or(started),
                    ),
                };
                cron.after(&from).next().unwrap_or(DateTime::<Utc>::MAX_UTC)
            });
            if due > now {
                continue;
            }
            if let Some(active) = engine.active_run(&p.name) {
                tracing::info!(pipeline = %p.name, run = %active, "schedule tick skipped: previous run still going");
            } else if let Err(e) = engine.trigger(&p.name, false, Vec::new(), "schedule") {
                tracing::warn!(pipeline = %p.name, "scheduled run not started: {e}");
            }
            if let Err(e) = engine.set_last_tick(&p.name, now_ms()) {
                tracing::warn!(pipeline = %p.name, "cannot record schedule tick: {e}");
            }
            next.insert(
                key,
                cron.after(&now).next().unwrap_or(DateTime::<Utc>::MAX_UTC),
            );
        }
    }
}

/// Finished streaming runs kept on record per pipeline.
const STREAMING_RUNS_KEPT: usize = 50;
/// Wait after a failed micro-batch before the next one.
const STREAMING_RETRY_MS: i64 = 5_000;

/// Starts the next micro-batch of a streaming pipeline unless one is running (or the last one
/// failed moments ago).
fn next_micro_batch(engine: &Arc<Engine>, pipeline: &str) {
    if engine.active_run(pipeline).is_some() {
        return;
    }
    if let Some(last) = engine.runs(pipeline, 1).first()
        && last.state == crate::store::RunState::Failed
        && now_ms() - last.finished_at_ms < STREAMING_RETRY_MS
    {
        return;
    }
    match engine.trigger(pipeline, false, Vec::new(), "streaming") {
        Ok(_) => engine.prune_runs(pipeline, "streaming", STREAMING_RUNS_KEPT),
        Err(e) => tracing::warn!(pipeline, "streaming run not started: {e}"),
    }
}
