//! What the CLI prints: live run progress from `WatchRun`, run summaries, and tables read
//! over Arrow Flight.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use arrow::{record_batch::RecordBatch, util::pretty::pretty_format_batches};
use arrow_flight::{FlightClient, FlightDescriptor};
use futures::TryStreamExt;
use medallion_proto::v1::{self as pb, run_event::Event};

pub fn table_name(t: &pb::TableId) -> String {
    let layer = match pb::Layer::try_from(t.layer) {
        Ok(pb::Layer::Bronze) => "bronze",
        Ok(pb::Layer::Silver) => "silver",
        Ok(pb::Layer::Gold) => "gold",
        Ok(pb::Layer::Quarantine) => "quarantine",
        _ => "?",
    };
    format!("{layer}.{}", t.name)
}

fn name(t: &Option<pb::TableId>) -> String {
    t.as_ref().map(table_name).unwrap_or_default()
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn run_state(s: i32) -> &'static str {
    match pb::RunState::try_from(s) {
        Ok(pb::RunState::Queued) => "queued",
        Ok(pb::RunState::Running) => "running",
        Ok(pb::RunState::Succeeded) => "succeeded",
        Ok(pb::RunState::Failed) => "failed",
        Ok(pb::RunState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn task_state(s: i32) -> &'static str {
    match pb::TaskState::try_from(s) {
        Ok(pb::TaskState::Pending) => "pending",
        Ok(pb::TaskState::Running) => "running",
        Ok(pb::TaskState::Succeeded) => "succeeded",
        Ok(pb::TaskState::Failed) => "failed",
        Ok(pb::TaskState::Cancelled) => "cancelled",
        Ok(pb::TaskState::Skipped) => "skipped",
        _ => "unknown",
    }
}

fn action(a: i32) -> &'static str {
    match pb::ExpectationAction::try_from(a) {
        Ok(pb::ExpectationAction::Drop) => "drop",
        Ok(pb::ExpectationAction::Quarantine) => "quarantine",
        Ok(pb::ExpectationAction::Fail) => "fail",
        _ => "warn",
    }
}

/// Follows a run live, then prints its summary; an error if the run did not succeed.
pub async fn watch(client: &mut crate::Client, run_id: &str) -> anyhow::Result<()> {
    let mut events = client
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut last_progress: HashMap<String, Instant> = HashMap::new();
    while let Some(event) = events
        .message()
        .await
        .context("lost the coordinator while watching")?
    {
        match event.event {
            Some(Event::TaskStarted(e)) => {
                println!("  > {:<28} started (attempt {})", name(&e.table), e.attempt)
            }
            Some(Event::TaskProgress(e)) => {
                let table = name(&e.table);
                let due = last_progress
                    .get(&table)
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
                if due {
                    last_progress.insert(table.clone(), Instant::now());
                    println!(
                        "    {:<28} {:<36} {:>12} rows {:>10}",
                        table,
                        e.phase,
                        thousands(e.rows),
                        megabytes(e.bytes)
                    );
                }
            }
            Some(Event::TaskCommitted(e)) => {
                if e.committed {
                    println!(
                        "  + {:<28} committed version {} ({} rows written, {} in table)",
                        name(&e.table),
                        e.version,
                        thousands(e.rows_written),
                        thousands(e.table_rows)
                    );
                } else {
                    println!(
                        "  = {:<28} up to date at version {} ({} rows)",
                        name(&e.table),
                        e.version,
                        thousands(e.table_rows)
                    );
                }
            }
            Some(Event::Expectation(e)) => {
                if e.failed_rows > 0 {
                    println!(
                        "  ! {:<28} expectation {} ({}): {} of {} rows failed",
                        name(&e.table),
                        e.name,
                        action(e.action),
                        thousands(e.failed_rows),
                        thousands(e.checked_rows)
                    );
                }
            }
            Some(Event::TaskFailed(e)) => {
                let next = if e.will_retry {
                    "retrying"
                } else {
                    "giving up"
                };
                println!(
                    "  x {:<28} attempt {} failed ({next}): {}",
                    name(&e.table),
                    e.attempt,
                    e.error
                );
            }
            Some(Event::RunFinished(_)) => break,
            Some(Event::TaskQueued(_)) | None => {}
        }
    }
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    print_run(&run);
    if run.state != pb::RunState::Succeeded as i32 {
        bail!("run {} {}: {}", run.id, run_state(run.state), run.error);
    }
    Ok(())
}

pub fn print_run(run: &pb::Run) {
    let secs = if run.finished_at_ms > 0 {
        (run.finished_at_ms - run.created_at_ms) as f64 / 1000.0
    } else {
        0.0
    };
    println!();
    println!(
        "run {}  pipeline {} (revision {})  {}  {:.1}s  trigger {}",
        run.id,
        run.pipeline,
        run.pipeline_revision,
        run_state(run.state),
        secs,
        run.trigger
    );
    println!(
        "{:<28} {:<10} {:>8} {:>14} {:>14} {:>9} {:>8}",
        "table", "state", "version", "rows written", "table rows", "attempts", "secs"
    );
    for t in &run.tasks {
        let m = t.manifest.clone().unwrap_or_default();
        let secs = if t.finished_at_ms > 0 {
            (t.finished_at_ms - t.started_at_ms) as f64 / 1000.0
        } else {
            0.0
        };
        let version = if t.manifest.is_some() {
            m.version.to_string()
        } else {
            "-".into()
        };
        println!(
            "{:<28} {:<10} {:>8} {:>14} {:>14} {:>9} {:>8.1}",
            name(&t.table),
            task_state(t.state),
            version,
            thousands(m.rows_written),
            thousands(m.table_rows),
            t.attempts,
            secs
        );
        for e in m.expectations.iter().filter(|e| e.failed_rows > 0) {
            println!(
                "    expectation {} ({}): {} of {} rows failed",
                e.name,
                action(e.action),
                thousands(e.failed_rows),
                thousands(e.checked_rows)
            );
        }
        if m.quarantined_rows > 0 {
            println!(
                "    {} rows quarantined in quarantine.{}",
                thousands(m.quarantined_rows),
                t.table.as_ref().map(|x| x.name.clone()).unwrap_or_default()
            );
        }
        if !t.error.is_empty() && t.state != pb::TaskState::Succeeded as i32 {
            println!("    error: {}", t.error);
        }
    }
    if !run.error.is_empty() {
        println!("error: {}", run.error);
    }
}

/// A pipeline's mode and every table's latest version, age and source lag.
pub fn print_status(p: &pb::Pipeline) {
    let state = match (p.paused, p.active_run_id.is_empty()) {
        (true, _) => "paused".to_string(),
        (false, false) => format!("running {}", p.active_run_id),
        (false, true) => "idle".to_string(),
    };
    let schedule = if p.schedule.is_empty() {
        String::new()
    } else {
        format!(", schedule {}", p.schedule)
    };
    println!(
        "{} (revision {}, {}{schedule}): {state}",
        p.name, p.revision, p.mode
    );
    println!(
        "{:<36} {:>8} {:>12} {:>12}",
        "table", "version", "age", "kafka lag"
    );
    for f in &p.freshness {
        let age = if f.age_ms < 0 {
            "-".to_string()
        } else {
            format!("{:.1} s", f.age_ms as f64 / 1000.0)
        };
        let lag = u64::try_from(f.source_lag).map_or_else(|_| "-".to_string(), thousands);
        println!(
            "{:<36} {:>8} {:>12} {:>12}",
            name(&f.table),
            f.version,
            age,
            lag
        );
    }
}

pub fn print_runs(runs: &[pb::Run]) {
    println!(
        "{:<38} {:<16} {:<10} {:<20} {:>8}",
        "run", "pipeline", "state", "created (UTC)", "secs"
    );
    for r in runs {
        let created = chrono::DateTime::from_timestamp_millis(r.created_at_ms)
            .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let secs = if r.finished_at_ms > 0 {
            (r.finished_at_ms - r.created_at_ms) as f64 / 1000.0
        } else {
            0.0
        };
        println!(
            "{:<38} {:<16} {:<10} {:<20} {:>8.1}",
            r.id,
            r.pipeline,
            run_state(r.state),
            created,
            secs
        );
    }
}

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// `layer.table`, e.g. gold.pricing_summary.
    pub table: String,
    /// Rows to print.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// A table version (default: the latest).
    #[arg(long)]
    pub version: Option<i64>,
    /// Flight endpoint of the layer's service (default: the local stack's, from --base-port).
    #[arg(long)]
    pub flight: Option<String>,
    #[arg(long, env = "MEDALLION_BASE_PORT", default_value_t = 50060)]
    pub base_port: u16,
}

/// Reads up to `limit` rows of a table over Flight.
pub async fn read_table(
    endpoint: &str,
    tls: &medallion_server::TlsOptions,
    table: &str,
    version: Option<i64>,
    limit: usize,
) -> anyhow::Result<(u64, Vec<RecordBatch>)> {
    let (layer, name) = table
        .split_once('.')
        .with_context(|| format!("`{table}` must be written layer.table"))?;
    let channel = medallion_server::endpoint(endpoint, tls)?
        .connect()
        .await
        .with_context(|| format!("cannot reach {endpoint}"))?;
    let mut client = FlightClient::new(channel);
    let mut path = vec![layer.to_string(), name.to_string()];
    if let Some(v) = version {
        path.push(v.to_string());
    }
    let info = client
        .get_flight_info(FlightDescriptor::new_path(path))
        .await
        .with_context(|| format!("cannot read {table} from {endpoint}"))?;
    let total = info.total_records.max(0) as u64;
    let mut batches = Vec::new();
    let mut rows = 0;
    for ep in info.endpoint {
        if rows >= limit {
            break;
        }
        let Some(ticket) = ep.ticket else { continue };
        let mut stream = client.do_get(ticket).await?;
        while let Some(batch) = stream.try_next().await? {
            let take = (limit - rows).min(batch.num_rows());
            rows += take;
            batches.push(batch.slice(0, take));
            if rows >= limit {
                break;
            }
        }
    }
    Ok((total, batches))
}

pub fn default_flight(table: &str, base_port: u16) -> String {
    let offset = match table.split('.').next() {
        Some("bronze") => 1,
        Some("silver") | Some("quarantine") => 2,
        _ => 3,
    };
    format!("http://127.0.0.1:{}", base_port + offset)
}

pub async fn print_table(
    endpoint: &str,
    tls: &medallion_server::TlsOptions,
    table: &str,
    version: Option<i64>,
    limit: usize,
) -> anyhow::Result<()> {
    let (total, batches) = read_table(endpoint, tls, table, version, limit).await?;
    let shown: usize = batches.iter().map(RecordBatch::num_rows).sum();
    println!(
        "{table} ({} rows{})",
        thousands(total),
        if (shown as u64) < total {
            format!(", first {shown} shown")
        } else {
            String::new()
        }
    );
    if !batches.is_empty() {
        println!("{}", pretty_format_batches(&batches)?);
    }
    Ok(())
}

pub async fn query(args: QueryArgs, tls: &medallion_server::TlsOptions) -> anyhow::Result<()> {
    let endpoint = args
        .flight
        .clone()
        .unwrap_or_else(|| default_flight(&args.table, args.base_port));
    print_table(&endpoint, tls, &args.table, args.version, args.limit).await
}
