//! `medallion bench cdc`: Debezium change events through a Kafka broker and the services.
//!
//! 1. Backlog: `--events` changes over `--keys` keys are produced, then one run takes them into
//!    bronze, applies them to an SCD1 silver table and aggregates gold: events/s into bronze and
//!    into silver, peak memory of the ingestor and refiner.
//! 2. Latency: the pipeline turns `mode: streaming` while changes are produced at `--rate` for
//!    `--latency-secs`; gold (the highest event number applied per partition) is read over
//!    Flight every 100 ms, giving each event's time from produce to visible in gold: p50, p99.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use futures::StreamExt;
use medallion_proto::v1 as pb;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{bench::BenchArgs, display, stack};

/// Sends in flight at once while producing the backlog.
const IN_FLIGHT: usize = 10_000;
/// How often gold is read during the latency phase.
const POLL: Duration = Duration::from_millis(100);

/// The bench pipeline: changes -> current state (SCD1) -> highest event number per partition.
fn spec(brokers: &str, topic: &str, streaming: bool) -> String {
    // Streaming is tuned for latency: short reads, and the broker answers fetches within 100 ms
    // instead of librdkafka's default 500 ms.
    let (mode, idle_ms, max_task_ms) = if streaming {
        ("streaming", 100, 500)
    } else {
        ("batch", 2000, 0)
    };
    format!(
        r#"
name: cdc_bench
mode: {mode}
sources:
  - name: changes
    format: kafka-debezium
    kafka: {{ brokers: "{brokers}", topics: [{topic}], max_batch_rows: 200000, idle_ms: {idle_ms}, max_task_ms: {max_task_ms}, settings: {{ fetch.wait.max.ms: "100" }} }}
silver:
  - name: current
    from: bronze.changes
    apply_changes: {{ stored_as: scd1, buckets: 16 }}
    columns:
      - {{ name: id, type: int64 }}
      - {{ name: name, type: string }}
      - {{ name: balance, type: int64 }}
      - {{ name: part, type: int64 }}
      - {{ name: n, type: int64 }}
gold:
  - name: progress
    sql: SELECT part, MAX(n) AS n, COUNT(*) AS keys FROM current GROUP BY part
"#
    )
}

/// Event `n`: key `n % keys` (a create the first time, then updates), on the key's partition.
fn event(n: u64, keys: u64, partitions: u64) -> (i32, String, String) {
    let id = n % keys;
    let part = id % partitions;
    let op = if n < keys { "c" } else { "u" };
    let key = format!(r#"{{"id":{id}}}"#);
    let value = format!(
        r#"{{"before":null,"after":{{"id":{id},"name":"customer {id}","balance":{},"part":{part},"n":{n}}},"source":{{"connector":"postgresql","lsn":{}}},"op":"{op}","ts_ms":{}}}"#,
        n % 10_000,
        1_000 + n,
        1_700_000_000_000u64 + n
    );
    (part as i32, key, value)
}

async fn send(
    producer: &FutureProducer,
    topic: &str,
    n: u64,
    keys: u64,
    partitions: u64,
) -> anyhow::Result<()> {
    let (partition, key, value) = event(n, keys, partitions);
    let record = FutureRecord::to(topic)
        .partition(partition)
        .key(&key)
        .payload(&value);
    producer
        .send(record, Duration::from_secs(120))
        .await
        .map(|_| ())
        .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))
}

pub async fn bench(args: &BenchArgs, work: &std::path::Path) -> anyhow::Result<()> {
    let brokers = args
        .brokers
        .as_deref()
        .context("bench cdc needs --brokers HOST:PORT of a Kafka-compatible broker")?;
    let topic = format!(
        "medallion.bench.{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S")
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for result in admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                args.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?
    {
        result.map_err(|(t, code)| anyhow::anyhow!("creating topic {t}: {code}"))?;
    }

    println!(
        "producing {} change events over {} keys to {topic} ({} partitions)",
        args.events, args.keys, args.partitions
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .create()?;
    let started = Instant::now();
    let keys = args.keys.max(1);
    let partitions = args.partitions.max(1) as u64;
    futures::stream::iter(0..args.events)
        .map(|n| send(&producer, &topic, n, keys, partitions))
        .buffer_unordered(IN_FLIGHT)
        .fold(Ok(()), |acc, r| async move { acc.and(r) })
        .await?;
    let produce_secs = started.elapsed().as_secs_f64();

    let lake = work.join("lake-cdc");
    let state = work.join("state-cdc");
    for dir in [&lake, &state] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
    }
    let stack = stack::Stack::start(&stack::StackArgs {
        lake: lake.display().to_string(),
        state_dir: state,
        base_port: args.base_port,
        warehouse: None,
    })
    .await?;
    let result = async {
        let mut client = crate::connect(&stack.coordinator, &crate::Access::default()).await?;
        crate::apply_text(
            &mut client,
            spec(brokers, &topic, false),
            work.display().to_string(),
        )
        .await?;
        let run = crate::bench::run_to_end(&mut client, "cdc_bench").await?;
        anyhow::ensure!(
            run.state == pb::RunState::Succeeded as i32,
            "the backlog run failed: {}",
            run.error
        );
        let secs = |table: &str| -> anyhow::Result<(f64, u64)> {
            let task = run
                .tasks
                .iter()
                .find(|t| t.table.as_ref().map(display::table_name).as_deref() == Some(table))
                .with_context(|| format!("no task for {table}"))?;
            let rows = task.manifest.as_ref().map_or(0, |m| m.table_rows);
            Ok((
                (task.finished_at_ms - task.started_at_ms) as f64 / 1000.0,
                rows,
            ))
        };
        let (bronze, bronze_rows) = secs("bronze.changes")?;
        // The bronze task ends idle_ms after the last message; that wait is not ingestion.
        let bronze = bronze - 2.0;
        let (silver, silver_rows) = secs("silver.current")?;
        let (gold, _) = secs("gold.progress")?;
        let pid = |service: &str| {
            stack
                .pids()
                .into_iter()
                .find(|(name, _)| name == service)
                .map_or_else(String::new, |(_, pid)| pid.to_string())
        };
        let rss = |service: &str| crate::bench::peak_rss(&pid(service));
        let backlog = Backlog {
            bronze,
            bronze_rows,
            silver,
            silver_rows,
            gold,
            ingestor_rss: rss("medallion-ingestor"),
            refiner_rss: rss("medallion-refiner"),
            ingestor_cpu: crate::bench::CpuTimes::of(&pid("medallion-ingestor")).total(),
            refiner_cpu: crate::bench::CpuTimes::of(&pid("medallion-refiner")).total(),
        };

        // Streaming from here on, with changes arriving at a steady rate.
        crate::apply_text(
            &mut client,
            spec(brokers, &topic, true),
            work.display().to_string(),
        )
        .await?;
        let gold_flight = display::default_flight("gold.progress", args.base_port);
        let latencies = latency(&producer, &topic, args, &gold_flight, args.events).await;
        client
            .set_pipeline_paused(pb::SetPipelinePausedRequest {
                name: "cdc_bench".into(),
                paused: true,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        anyhow::Ok((backlog, latencies?))
    }
    .await;
    stack.stop().await;
    let (backlog, mut latencies) = result?;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    println!();
    println!("events produced      {:>12}", args.events);
    println!(
        "produce rate         {:>12.0} events/s",
        args.events as f64 / produce_secs
    );
    println!("rows in bronze       {:>12}", backlog.bronze_rows);
    println!(
        "into bronze          {:>12.2} s  ({:.0} events/s)",
        backlog.bronze,
        backlog.bronze_rows as f64 / backlog.bronze.max(0.001)
    );
    println!("keys in silver       {:>12}", backlog.silver_rows);
    println!(
        "applied to silver    {:>12.2} s  ({:.0} events/s)",
        backlog.silver,
        args.events as f64 / backlog.silver.max(0.001)
    );
    println!(
        "bronze + silver      {:>12.2} s  ({:.0} events/s)",
        backlog.bronze + backlog.silver,
        args.events as f64 / (backlog.bronze + backlog.silver).max(0.001)
    );
    println!("gold                 {:>12.2} s", backlog.gold);
    println!(
        "ingestor CPU         {:>12.2} s  ({:.0} events per CPU second)",
        backlog.ingestor_cpu,
        args.events as f64 / backlog.ingestor_cpu.max(0.001)
    );
    println!(
        "refiner CPU          {:>12.2} s  ({:.0} events per CPU second)",
        backlog.refiner_cpu,
        args.events as f64 / backlog.refiner_cpu.max(0.001)
    );
    println!(
        "ingestor peak RSS    {:>12.2} GiB",
        gib(backlog.ingestor_rss)
    );
    println!(
        "refiner peak RSS     {:>12.2} GiB",
        gib(backlog.refiner_rss)
    );
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64())
    };
    println!(
        "streaming            {:>12} of {} events reached gold, produced at {} events/s for {} s",
        latencies.len(),
        args.rate * args.latency_secs,
        args.rate,
        args.latency_secs
    );
    println!(
        "produce -> gold      p50 {:.2} s   p99 {:.2} s   max {:.2} s",
        pct(0.50),
        pct(0.99),
        latencies.last().map_or(f64::NAN, Duration::as_secs_f64)
    );
    Ok(())
}

struct Backlog {
    bronze: f64,
    bronze_rows: u64,
    silver: f64,
    silver_rows: u64,
    gold: f64,
    ingestor_rss: u64,
    refiner_rss: u64,
    /// CPU seconds of the whole backlog run (the broker's are not counted).
    ingestor_cpu: f64,
    refiner_cpu: f64,
}

/// Produces at `args.rate` for `args.latency_secs` (event numbers from `first`) while reading
/// gold every [`POLL`]; returns each event's time from produce to visible in gold.
async fn latency(
    producer: &FutureProducer,
    topic: &str,
    args: &BenchArgs,
    gold_flight: &str,
    first: u64,
) -> anyhow::Result<Vec<Duration>> {
    let keys = args.keys.max(1);
    let partitions = args.partitions.max(1) as u64;
    let total = args.rate.saturating_mul(args.latency_secs);
    println!(
        "streaming: {total} events at {} events/s, gold read every {} ms",
        args.rate,
        POLL.as_millis()
    );
    // Per partition, in produce order: (event number, when it was handed to the producer).
    let mut produced: BTreeMap<u64, Vec<(u64, Instant)>> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(total as usize);
    let mut applied: BTreeMap<u64, usize> = BTreeMap::new();
    let mut sends = futures::stream::FuturesUnordered::new();
    let started = Instant::now();
    let mut next = first;
    let mut next_poll = started;
    let deadline_after_produce = Duration::from_secs(60);
    let mut produce_done: Option<Instant> = None;
    loop {
        // Produce what the rate allows by now.
        let due = first + ((started.elapsed().as_secs_f64() * args.rate as f64) as u64).min(total);
        while next < due {
            let part = (next % keys) % partitions;
            produced
                .entry(part)
                .or_default()
                .push((next, Instant::now()));
            sends.push(send(producer, topic, next, keys, partitions));
            next += 1;
        }
        if next == first + total && produce_done.is_none() {
            produce_done = Some(Instant::now());
        }
        // Deliveries that completed.
        while let Some(Some(result)) = futures::FutureExt::now_or_never(sends.next()) {
            result?;
        }
        if Instant::now() >= next_poll {
            next_poll = Instant::now() + POLL;
            if let Ok((_, batches)) = display::read_table(
                gold_flight,
                &medallion_server::TlsOptions::default(),
                "gold.progress",
                None,
                usize::MAX,
            )
            .await
            {
                let seen = Instant::now();
                for batch in &batches {
                    let (Some(part), Some(n)) =
                        (batch.column_by_name("part"), batch.column_by_name("n"))
                    else {
                        continue;
                    };
                    let (part, n) = (
                        part.as_primitive::<Int64Type>(),
                        n.as_primitive::<Int64Type>(),
                    );
                    for row in 0..batch.num_rows() {
                        if part.is_null(row) || n.is_null(row) {
                            continue;
                        }
                        let (p, max) = (part.value(row) as u64, n.value(row) as u64);
                        let events = produced.get(&p).map(Vec::as_slice).unwrap_or_default();
                        let done = applied.entry(p).or_default();
                        while *done < events.len() && events[*done].0 <= max {
                            latencies.push(seen - events[*done].1);
                            *done += 1;
                        }
                    }
                }
            }
        }
        if latencies.len() as u64 >= total {
            break;
        }
        if produce_done.is_some_and(|t| t.elapsed() > deadline_after_produce) {
            // The pipeline did not keep up with the rate: report what arrived.
            println!(
                "only {} of {total} events reached gold within {} s of the last produce",
                latencies.len(),
                deadline_after_produce.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Some(result) = sends.next().await {
        result?;
    }
    Ok(latencies)
}
