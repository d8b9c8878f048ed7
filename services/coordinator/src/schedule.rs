//! Cron schedules: a pipeline with `schedule` runs at each tick, never overlapping itself.
//! Ticks missed while the coordinator was down are skipped unless the schedule asks to
//! `catch_up`, in which case one run makes up for them.

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use medallion_spec::Pipeline;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, now_ms};

/// Checks every pipeline's schedule once a second until `shutdown`.
pub async fn run_scheduler(engine: Arc<Engine>, shutdown: CancellationToken) {
    // Next tick per pipeline (by name and revision, so a re-applied spec is picked up).
    let mut next: HashMap<(String, u64), DateTime<Utc>> = HashMap::new();
    let started = Utc::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {},
            _ = shutdown.cancelled() => return,
        }
        let now = Utc::now();
        for p in engine.pipelines() {
            let Ok(parsed) = Pipeline::parse(&p.spec_yaml) else {
                continue;
            };
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
