//! `medallion bench cdc`: Debezium change events through a Kafka broker into the bronze change
//! table via the services: produce rate, events/s into bronze, peak memory of the ingestor.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use medallion_proto::v1 as pb;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{bench::BenchArgs, stack};

/// Sends in flight at once while producing.
const IN_FLIGHT: usize = 10_000;

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
        .set("linger.ms", "20")
        .set("message.timeout.ms", "120000")
        .create()?;
    let started = Instant::now();
    let keys = args.keys.max(1);
    let partitions = args.partitions.max(1) as u64;
    futures::stream::iter(0..args.events)
        .map(|i| {
            let (producer, topic) = (&producer, &topic);
            async move {
                let id = i % keys;
                let op = if i < keys { "c" } else { "u" };
                let key = format!(r#"{{"id":{id}}}"#);
                let value = format!(
                    r#"{{"before":null,"after":{{"id":{id},"name":"customer {id}","balance":{},"updated":{i}}},"source":{{"connector":"postgresql","lsn":{}}},"op":"{op}","ts_ms":{}}}"#,
                    i % 10_000,
                    1_000 + i,
                    1_700_000_000_000u64 + i
                );
                let record = FutureRecord::to(topic)
                    .partition((id % partitions) as i32)
                    .key(&key)
                    .payload(&value);
                producer
                    .send(record, Duration::from_secs(120))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .fold(Ok(()), |acc, r| async move { acc.and(r.map(|_| ())) })
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
        let spec = format!(
            "name: cdc_bench\nsources:\n  - name: changes\n    format: kafka-debezium\n    kafka: {{ brokers: \"{brokers}\", topics: [{topic}], max_batch_rows: 200000, idle_ms: 2000 }}\n"
        );
        crate::apply_text(&mut client, spec, work.display().to_string()).await?;
        let run = crate::bench::run_to_end(&mut client, "cdc_bench").await?;
        let task = run.tasks.first().context("no task")?;
        anyhow::ensure!(
            task.state == pb::TaskState::Succeeded as i32,
            "bronze task failed: {}",
            task.error
        );
        // The task ends idle_ms after the last message; that wait is not ingestion.
        let secs = (task.finished_at_ms - task.started_at_ms) as f64 / 1000.0 - 2.0;
        let rows = task.manifest.as_ref().map_or(0, |m| m.table_rows);
        let rss = stack
            .pids()
            .into_iter()
            .find(|(name, _)| name == "medallion-ingestor")
            .map_or(0, |(_, pid)| crate::bench::peak_rss(&pid.to_string()));
        anyhow::Ok((secs, rows, rss))
    }
    .await;
    stack.stop().await;
    let (secs, rows, rss) = result?;
    println!();
    println!("events produced      {:>12}", args.events);
    println!(
        "produce rate         {:>12.0} events/s",
        args.events as f64 / produce_secs
    );
    println!("rows in bronze       {rows:>12}");
    println!(
        "into bronze          {secs:>12.2} s  ({:.0} events/s)",
        rows as f64 / secs.max(0.001)
    );
    println!(
        "ingestor peak RSS    {:>12.2} GiB",
        rss as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
