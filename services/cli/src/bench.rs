//! `medallion bench tpch`: the tpch pipeline through the four services (gRPC, Arrow Flight,
//! Delta commits) against the same plan in one process with polars alone (same readers and
//! transforms, no services, no lake), with per-layer seconds, rows/s and peak memory.
//!
//! Each run of either path starts fresh processes. On a machine where touching new memory is
//! slow (page zeroing), a process that reuses a heap warmed by earlier runs is several seconds
//! faster; alternating a fresh services stack with a warm one-process heap measured the heap,
//! not the plan.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::Context;
use medallion_proto::v1 as pb;
use medallion_spec::{Layer, Pipeline, TableRef};
use polars::prelude::DataFrame;

use crate::{demo, display, stack};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The benchmark: `tpch` (batch pipeline, services against polars in one process) or `cdc`
    /// (Debezium events from Kafka through bronze, silver and gold; needs --brokers).
    #[arg(value_parser = ["tpch", "cdc"])]
    pub which: String,
    #[arg(long, default_value_t = 1.0)]
    pub scale_factor: f64,
    /// Work folder: generated data is kept between runs; the lake is made anew each run.
    #[arg(long, default_value = "./.medallion/bench")]
    pub work: PathBuf,
    #[arg(long, default_value_t = 50080)]
    pub base_port: u16,
    /// tpch: runs of each path, alternating (services, one process, services, ...); each
    /// run's figures are printed, and the summary gives the medians over the runs (peak
    /// memory: the highest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// tpch: runs of each path made before the measured ones and left out of every figure.
    /// Where memory is slow to fault in until the machine has used it (a VM whose host takes
    /// back the guest's free pages), the first runs of the one-process path, which touches
    /// about 6 GiB at scale factor 1, take seconds longer in the kernel than later ones; with
    /// warm-up runs the figures show the steady state.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub warmup: u32,
    /// Lake of the services run: `s3://bucket/prefix` puts it on S3 (settings from MEDALLION_S3_*
    /// and AWS_* in the environment); each run writes under a fresh prefix below it. Default: a
    /// folder in the work folder, made anew each run.
    #[arg(long)]
    pub lake: Option<String>,
    /// cdc: bootstrap servers of a Kafka-compatible broker (a fresh topic is created on it).
    #[arg(long)]
    pub brokers: Option<String>,
    /// cdc: change events to produce.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// cdc: distinct row keys (the first event of each key is a create, the rest updates).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// cdc: topic partitions.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// cdc: events per second produced while the pipeline streams (latency phase).
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// cdc: seconds of the latency phase.
    #[arg(long, default_value_t = 30)]
    pub latency_secs: u64,
    /// tpch: runs only the one-process path over the data already in the work folder and
    /// prints its figures on one line. The benchmark runs that path this way, in a fresh
    /// process each run as the services are, so no run reuses memory an earlier one paged in.
    #[arg(long, hide = true)]
    pub one_process_only: bool,
}

/// Triggers a run of `pipeline`, shows its progress until it ends and returns it.
pub(crate) async fn run_to_end(
    client: &mut crate::Client,
    pipeline: &str,
) -> anyhow::Result<pb::Run> {
    let run = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: pipeline.into(),
            full_refresh: false,
            tables: vec![],
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    display::watch(client, &run.id).await?;
    Ok(client
        .get_run(pb::GetRunRequest { run_id: run.id })
        .await?
        .into_inner())
}

/// CPU seconds a process has used so far, in user space and in the kernel on its behalf
/// (page faults, copies into and out of the page cache and sockets).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    /// Read from /proc (clock ticks of 1/100 s, as on Linux); zero when the process is gone.
    pub(crate) fn of(pid: &str) -> CpuTimes {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the parenthesised command name; utime and stime are the 12th and
                // 13th.
                let rest = s.rsplit_once(')')?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
                Some(CpuTimes {
                    user: ticks(11)? as f64 / 100.0,
                    system: ticks(12)? as f64 / 100.0,
                })
            })
            .unwrap_or_default()
    }

    pub(crate) fn total(&self) -> f64 {
        self.user + self.system
    }
}

impl std::iter::Sum for CpuTimes {
    fn sum<I: Iterator<Item = CpuTimes>>(times: I) -> CpuTimes {
        times.fold(CpuTimes::default(), |sum, t| CpuTimes {
            user: sum.user + t.user,
            system: sum.system + t.system,
        })
    }
}

/// Peak resident memory (VmHWM) of a process, in bytes.
pub(crate) fn peak_rss(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// One row of the CPU summary: the medians over `runs` of user, system and total seconds (each
/// its own median, so they need not add up exactly), and with `wall` (the path's median wall
/// seconds) the cores it kept busy on average.
fn cpu_row(name: &str, runs: &[CpuTimes], wall: Option<f64>) -> String {
    let of = |part: fn(&CpuTimes) -> f64| median(runs.iter().map(part).collect());
    let total = of(CpuTimes::total);
    let busy = wall.map_or(String::new(), |w| format!("{:>11.2}", total / w.max(1e-9)));
    format!(
        "{name:<24} {:>8.2} {:>8.2} {total:>8.2} {busy}",
        of(|c| c.user),
        of(|c| c.system)
    )
    .trim_end()
    .to_string()
}

/// The name the one-process path's figures go by.
const ONE_PROCESS: &str = "one process";

/// What one process of a path used over a run.
struct ProcessFigures {
    name: String,
    peak_rss: u64,
    cpu: CpuTimes,
}

/// What one run of a path measured: seconds per layer, total seconds, and its processes.
struct RunFigures {
    layers: BTreeMap<&'static str, f64>,
    total: f64,
    processes: Vec<ProcessFigures>,
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Seconds from the first task start to the last task end of each layer.
fn layer_seconds(run: &pb::Run) -> BTreeMap<&'static str, f64> {
    let mut spans: BTreeMap<&'static str, (i64, i64)> = BTreeMap::new();
    for t in &run.tasks {
        let layer = match t.table.as_ref().map(|x| x.layer) {
            Some(l) if l == pb::Layer::Bronze as i32 => "bronze",
            Some(l) if l == pb::Layer::Silver as i32 => "silver",
            _ => "gold",
        };
        let e = spans.entry(layer).or_insert((i64::MAX, 0));
        e.0 = e.0.min(t.started_at_ms);
        e.1 = e.1.max(t.finished_at_ms);
    }
    spans
        .into_iter()
        .map(|(k, (a, b))| (k, (b - a) as f64 / 1000.0))
        .collect()
}

async fn services_path(args: &BenchArgs, work: &std::path::Path) -> anyhow::Result<RunFigures> {
    let local_lake = work.join("lake");
    let state = work.join("state");
    for dir in [&local_lake, &state] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
    }
    let lake = match &args.lake {
        Some(root) => format!(
            "{}/bench-{}",
            root.trim_end_matches('/'),
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        ),
        None => local_lake.display().to_string(),
    };
    println!("lake: {lake}");
    let stack_args = stack::StackArgs {
        lake,
        state_dir: state,
        base_port: args.base_port,
        warehouse: None,
    };
    let stack = stack::Stack::start(&stack_args).await?;
    let result = async {
        let mut client = crate::connect(&stack.coordinator, &crate::Access::default()).await?;
        crate::apply_text(
            &mut client,
            demo::TPCH_SPEC.to_string(),
            work.display().to_string(),
        )
        .await?;
        let started = Instant::now();
        let run = run_to_end(&mut client, "tpch").await?;
        let total = started.elapsed().as_secs_f64();
        let processes = stack
            .pids()
            .into_iter()
            .map(|(name, pid)| ProcessFigures {
                name,
                peak_rss: peak_rss(&pid.to_string()),
                cpu: CpuTimes::of(&pid.to_string()),
            })
            .collect();
        anyhow::Ok(RunFigures {
            layers: layer_seconds(&run),
            total,
            processes,
        })
    }
    .await;
    stack.stop().await;
    result
}

/// The median of `values` (0 without any).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of each layer's seconds and of the totals over several runs.
fn medians(runs: &[(BTreeMap<&'static str, f64>, f64)]) -> (BTreeMap<&'static str, f64>, f64) {
    let layers = ["bronze", "silver", "gold"]
        .into_iter()
        .map(|layer| {
            let seconds = runs
                .iter()
                .map(|(l, _)| l.get(layer).copied().unwrap_or(0.0))
                .collect();
            (layer, median(seconds))
        })
        .collect();
    (layers, median(runs.iter().map(|(_, t)| *t).collect()))
}

/// Reads one source the way the ingestor does (same reader, same lineage columns).
async fn read_source(pipeline: &Pipeline, name: &str, base: &str) -> anyhow::Result<DataFrame> {
    let source = pipeline.source(name).context("source")?.clone();
    let files =
        medallion_ingestor::sources::list_files(&source, base).map_err(anyhow::Error::msg)?;
    let mut batches = Vec::new();
    let mut schema = None;
    for file in files {
        let medallion_ingestor::sources::Location::Local(path) = &file.location else {
            anyhow::bail!("the in-process baseline reads local files only");
        };
        let (mut rx, handle) =
            medallion_ingestor::sources::spawn_reader(source.clone(), path.clone(), file.display());
        while let Some(batch) = rx.recv().await {
            let batch = batch.map_err(anyhow::Error::msg)?;
            let full = schema
                .get_or_insert_with(|| medallion_ingestor::ingest::with_lineage(&batch.schema()))
                .clone();
            batches.push(medallion_ingestor::ingest::add_lineage(
                &batch, &full, &file, 0, "bench",
            )?);
        }
        handle.await?;
    }
    let schema = schema.context("no data")?;
    Ok(medallion_frames::frame_from_batches(&schema, &batches)?)
}

async fn in_process_path(work: &std::path::Path) -> anyhow::Result<RunFigures> {
    // As in the services: polars' warnings are not printed as bare lines.
    medallion_frames::log_polars_warnings();
    let pipeline = Pipeline::parse(demo::TPCH_SPEC)?;
    let base = work.display().to_string();
    let mut frames: BTreeMap<TableRef, DataFrame> = BTreeMap::new();
    let mut seconds = BTreeMap::new();
    let total = Instant::now();
    for layer in [Layer::Bronze, Layer::Silver, Layer::Gold] {
        let started = Instant::now();
        for node in pipeline.dag.nodes.iter().filter(|n| n.table.layer == layer) {
            let inputs: BTreeMap<TableRef, DataFrame> = node
                .depends_on
                .iter()
                .filter_map(|d| frames.get(d).map(|f| (d.clone(), f.clone())))
                .collect();
            let name = node.table.name.as_str();
            let df = match layer {
                Layer::Bronze => read_source(&pipeline, name, &base).await?,
                Layer::Silver => {
                    let spec = pipeline.silver(name).context("silver")?.clone();
                    tokio::task::spawn_blocking(move || {
                        medallion_refiner::transform::refine(&spec, inputs)
                    })
                    .await??
                    .silver
                }
                _ => {
                    let spec = pipeline.gold(name).context("gold")?.clone();
                    tokio::task::spawn_blocking(move || {
                        medallion_aggregator::compute(&spec, &inputs)
                    })
                    .await??
                }
            };
            frames.insert(node.table.clone(), df);
        }
        seconds.insert(layer.as_str(), started.elapsed().as_secs_f64());
    }
    Ok(RunFigures {
        layers: seconds,
        total: total.elapsed().as_secs_f64(),
        processes: vec![ProcessFigures {
            name: ONE_PROCESS.into(),
            peak_rss: peak_rss("self"),
            cpu: CpuTimes::of("self"),
        }],
    })
}

/// Marks the line a `--one-process-only` child prints its figures on.
const ONE_PROCESS_FIGURES: &str = "one-process figures:";

/// Runs the one-process path in a child process (a fresh heap, like the services get) and
/// reads back its per-layer seconds, total seconds, peak memory and CPU seconds.
async fn in_fresh_process(work: &std::path::Path) -> anyhow::Result<RunFigures> {
    let exe = std::env::current_exe().context("cannot locate the medallion executable")?;
    let output = tokio::process::Command::new(&exe)
        .args(["bench", "tpch", "--one-process-only", "--work"])
        .arg(work)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot start the one-process run ({})", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::bail!(
            "the one-process run failed ({}); its error is printed above{}",
            output.status,
            if stdout.trim().is_empty() {
                String::new()
            } else {
                format!(", its output was: {stdout}")
            }
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(ONE_PROCESS_FIGURES))
        .with_context(|| format!("the one-process run printed no figures: {stdout}"))?;
    let mut figures = BTreeMap::new();
    for pair in line.split_whitespace() {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("unreadable one-process figure {pair:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("unreadable one-process figure {pair:?}"))?;
        figures.insert(key.to_string(), value);
    }
    let get = |key: &str| {
        figures
            .get(key)
            .copied()
            .with_context(|| format!("the one-process run printed no {key}"))
    };
    let layers = BTreeMap::from([
        ("bronze", get("bronze")?),
        ("silver", get("silver")?),
        ("gold", get("gold")?),
    ]);
    Ok(RunFigures {
        layers,
        total: get("total")?,
        processes: vec![ProcessFigures {
            name: ONE_PROCESS.into(),
            peak_rss: get("peak_rss")? as u64,
            cpu: CpuTimes {
                user: get("user_secs")?,
                system: get("system_secs")?,
            },
        }],
    })
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.work)?;
    let work = std::fs::canonicalize(&args.work)?;
    if args.which == "cdc" {
        anyhow::ensure!(
            !args.one_process_only,
            "--one-process-only is a tpch benchmark setting"
        );
        anyhow::ensure!(args.warmup == 0, "--warmup is a tpch benchmark setting");
        return crate::bench_cdc::bench(&args, &work).await;
    }
    if args.one_process_only {
        let figures = in_process_path(&work).await?;
        let seconds: Vec<String> = figures
            .layers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let (peak, cpu) = figures
            .processes
            .first()
            .map_or((0, CpuTimes::default()), |p| (p.peak_rss, p.cpu));
        println!(
            "{ONE_PROCESS_FIGURES} {} total={} peak_rss={peak} user_secs={} system_secs={}",
            seconds.join(" "),
            figures.total,
            cpu.user,
            cpu.system
        );
        return Ok(());
    }
    println!(
        "generating TPC-H at scale factor {} in {}",
        args.scale_factor,
        work.join("data").display()
    );
    let (dir, sf) = (work.clone(), args.scale_factor);
    tokio::task::spawn_blocking(move || demo::generate_tpch(&dir, sf, 1)).await??;
    let rows = {
        let count = |t: &str| -> anyhow::Result<u64> {
            let path = work.join("data").join(t).join("part-1.csv");
            let text = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
            Ok(text
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                .saturating_sub(1) as u64)
        };
        count("lineitem")? + count("orders")?
    };

    for run in 1..=args.warmup {
        let of = format!("warm-up {run} of {}", args.warmup);
        println!("\n== through the services ({of}) ==");
        let services = services_path(&args, &work).await?;
        println!("\n== one process, polars alone ({of}) ==");
        let one_process = in_fresh_process(&work).await?;
        println!(
            "{of}: services {:.2} s, one process {:.2} s (left out of the figures)",
            services.total, one_process.total
        );
    }

    let mut svc_runs = Vec::new();
    let mut inp_runs = Vec::new();
    // Every process of both paths, in the order first seen: peak memory, CPU seconds per run.
    let mut processes: Vec<(String, u64, Vec<CpuTimes>)> = Vec::new();
    let mut services_cpu = Vec::new();
    for run in 1..=args.runs {
        let of = if args.runs > 1 {
            format!(" (run {run} of {})", args.runs)
        } else {
            String::new()
        };
        println!("\n== through the services{of} ==");
        let services = services_path(&args, &work).await?;
        println!("\n== one process, polars alone{of} ==");
        let one_process = in_fresh_process(&work).await?;
        services_cpu.push(services.processes.iter().map(|p| p.cpu).sum::<CpuTimes>());
        for p in services.processes.iter().chain(&one_process.processes) {
            match processes.iter_mut().find(|(n, ..)| *n == p.name) {
                Some((_, peak, cpu)) => {
                    *peak = (*peak).max(p.peak_rss);
                    cpu.push(p.cpu);
                }
                None => processes.push((p.name.clone(), p.peak_rss, vec![p.cpu])),
            }
        }
        let (layers, total) = (services.layers, services.total);
        let (in_layers, in_total) = (one_process.layers, one_process.total);
        if args.runs > 1 {
            let spans = |l: &BTreeMap<&'static str, f64>| {
                ["bronze", "silver", "gold"]
                    .map(|k| format!("{k} {:.2}", l.get(k).copied().unwrap_or(0.0)))
                    .join(", ")
            };
            println!(
                "run {run}: services {total:.2} s ({}), one process {in_total:.2} s ({}), ratio {:.2}",
                spans(&layers),
                spans(&in_layers),
                total / in_total.max(1e-9)
            );
        }
        svc_runs.push((layers, total));
        inp_runs.push((in_layers, in_total));
    }
    let (svc_layers, svc_total) = medians(&svc_runs);
    let (inp_layers, inp_total) = medians(&inp_runs);
    if args.runs > 1 {
        println!("\nmedians of {} runs of each path", args.runs);
    }
    println!(
        "\nTPC-H scale factor {} ({} source rows)",
        args.scale_factor,
        display::thousands(rows)
    );
    println!(
        "{:<8} {:>12} {:>12} {:>8}",
        "layer", "services s", "in-proc s", "ratio"
    );
    for layer in ["bronze", "silver", "gold"] {
        let (a, b) = (
            svc_layers.get(layer).copied().unwrap_or(0.0),
            inp_layers.get(layer).copied().unwrap_or(0.0),
        );
        println!(
            "{layer:<8} {a:>12.2} {b:>12.2} {:>8.2}",
            if b > 0.0 { a / b } else { 0.0 }
        );
    }
    println!(
        "{:<8} {:>12.2} {:>12.2} {:>8.2}",
        "total",
        svc_total,
        inp_total,
        svc_total / inp_total.max(1e-9)
    );
    println!(
        "rows/s  {:>12} {:>12}",
        display::thousands((rows as f64 / svc_total) as u64),
        display::thousands((rows as f64 / inp_total) as u64)
    );
    let (one_process, services): (Vec<_>, Vec<_>) =
        processes.iter().partition(|(name, ..)| name == ONE_PROCESS);
    println!("\npeak RSS");
    for (name, bytes, _) in &services {
        println!("  {name:<24} {}", gib(*bytes));
    }
    let services_peak = services.iter().map(|(_, bytes, _)| bytes).sum();
    println!("  {:<24} {}", "services total", gib(services_peak));
    for (name, bytes, _) in &one_process {
        println!("  {name:<24} {}", gib(*bytes));
    }
    // CPU work beside wall time: on a machine whose cores are all busy, work a path does
    // that the other does not shows here first.
    println!(
        "\n{:<26} {:>8} {:>8} {:>8} {:>11}",
        "CPU seconds", "user", "system", "total", "cores busy"
    );
    for (name, _, cpu) in &services {
        println!("  {}", cpu_row(name, cpu, None));
    }
    println!(
        "  {}",
        cpu_row("services total", &services_cpu, Some(svc_total))
    );
    for (name, _, cpu) in &one_process {
        println!("  {}", cpu_row(name, cpu, Some(inp_total)));
    }
    Ok(())
}
