//! Debezium change events from Kafka (a tansu broker on loopback) into the bronze change
//! table: every message exactly once across runs and an ingestor killed mid-read, malformed
//! messages kept with their error, tombstones skipped.

use std::collections::BTreeSet;

use medallion_tests::kafka::Broker;
use medallion_tests::{Cluster, Service, succeeded, task, values};

const TOPIC: &str = "shop.public.customers";
const PARTITIONS: i32 = 3;

fn spec(bootstrap: &str, max_batch_rows: usize) -> String {
    format!(
        r#"
name: cdc
sources:
  - name: customers
    format: kafka-debezium
    kafka:
      brokers: "{bootstrap}"
      topics: [{TOPIC}]
      max_batch_rows: {max_batch_rows}
      idle_ms: 1500
"#
    )
}

/// Deterministic events: a mix of creates, updates and deletes (each delete followed by a
/// tombstone), schemas on and off, Postgres and MySQL source blocks. Returns how many
/// non-tombstone messages were sent.
async fn produce(broker: &Broker, from: u64, count: u64) -> u64 {
    let mut sent = 0;
    for i in from..from + count {
        let id = i % 17;
        let partition = (id % PARTITIONS as u64) as i32;
        let key = format!(r#"{{"id":{id}}}"#);
        let op = ["c", "u", "u", "d"][(i % 4) as usize];
        let (before, after) = match op {
            "c" => (
                "null".to_string(),
                format!(r#"{{"id":{id},"name":"n{i}"}}"#),
            ),
            "u" => (
                format!(r#"{{"id":{id},"name":"old"}}"#),
                format!(r#"{{"id":{id},"name":"n{i}"}}"#),
            ),
            _ => (
                format!(r#"{{"id":{id},"name":"n{i}"}}"#),
                "null".to_string(),
            ),
        };
        let source = if i % 2 == 0 {
            format!(r#"{{"connector":"postgresql","lsn":{}}}"#, 1000 + i)
        } else {
            format!(
                r#"{{"connector":"mysql","file":"mysql-bin.000003","pos":{},"row":0}}"#,
                4 + i
            )
        };
        let envelope = format!(
            r#"{{"before":{before},"after":{after},"source":{source},"op":"{op}","ts_ms":{}}}"#,
            1_700_000_000_000u64 + i
        );
        let value = if i % 3 == 0 {
            format!(r#"{{"schema":{{"type":"struct"}},"payload":{envelope}}}"#)
        } else {
            envelope
        };
        broker
            .send(TOPIC, partition, &key, Some(&value))
            .await
            .expect("produce");
        sent += 1;
        if op == "d" {
            broker
                .send(TOPIC, partition, &key, None)
                .await
                .expect("tombstone");
        }
    }
    sent
}

/// (partition, offset) of every bronze row, checking none repeats; and the rows with `_error`.
async fn bronze_rows(cluster: &Cluster) -> (BTreeSet<(i64, i64)>, usize) {
    let mut seen = BTreeSet::new();
    let mut errors = 0;
    for b in cluster.read("bronze.customers").await.expect("read bronze") {
        for r in 0..b.num_rows() {
            let at = (
                values::int(&b, "_partition", r),
                values::int(&b, "_offset", r),
            );
            assert!(seen.insert(at), "message {at:?} landed twice");
            if values::string(&b, "_error", r).is_some() {
                errors += 1;
            }
        }
    }
    (seen, errors)
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_events_land_in_bronze_exactly_once() {
    let broker = Broker::start().await.expect("broker");
    broker.create_topic(TOPIC, PARTITIONS).await.expect("topic");
    let mut cluster = Cluster::start(None).await.expect("cluster");
    cluster
        .apply(&spec(&broker.bootstrap, 40))
        .await
        .expect("apply");

    let mut expected = produce(&broker, 0, 120).await;
    // Malformed messages: kept as rows with the error, the pipeline goes on.
    for bad in [
        "{not json",
        r#"{"after":{"id":1},"source":{}}"#,
        r#"{"after":{"id":1},"op":"x"}"#,
    ] {
        broker
            .send(TOPIC, 0, r#"{"id":1}"#, Some(bad))
            .await
            .expect("produce");
        expected += 1;
    }
    let (run, _) = cluster.run("cdc", false).await.expect("run 1");
    assert!(succeeded(&run), "{run:?}");
    let (rows, errors) = bronze_rows(&cluster).await;
    assert_eq!(rows.len() as u64, expected);
    assert_eq!(errors, 3);
    let bronze = cluster.read("bronze.customers").await.expect("read");
    let ops: BTreeSet<String> = bronze
        .iter()
        .flat_map(|b| (0..b.num_rows()).filter_map(|r| values::string(b, "op", r)))
        .collect();
    assert_eq!(ops, BTreeSet::from(["c".into(), "d".into(), "u".into()]));

    // Nothing new: nothing committed.
    let (run, _) = cluster.run("cdc", false).await.expect("run 2");
    assert!(succeeded(&run), "{run:?}");
    assert!(
        !task(&run, "bronze.customers")
            .manifest
            .as_ref()
            .expect("m")
            .committed
    );

    // More events; the ingestor is killed while reading them (after its first micro-batch
    // commit), restarted, and the next run picks up exactly where bronze left off.
    expected += produce(&broker, 120, 400).await;
    let (run_id, _events) = cluster.start_run("cdc").await.expect("start run 3");
    let version_before = task(&run, "bronze.customers")
        .manifest
        .as_ref()
        .expect("m")
        .version;
    let mut killed = false;
    for _ in 0..400 {
        let snapshot = medallion_lake::Lake::open(
            &cluster.lake_dir().display().to_string(),
            Default::default(),
        )
        .expect("lake")
        .snapshot(medallion_lake::Layer::Bronze, "customers", None)
        .await
        .expect("snapshot");
        if snapshot.is_some_and(|s| s.version > version_before) {
            cluster.kill(Service::Ingestor).await;
            killed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(killed, "the ingestor never committed a micro-batch");
    // The coordinator retries the task once the ingestor is back; either way the run ends.
    cluster.restart(Service::Ingestor).await.expect("restart");
    let _ = cluster.follow(&run_id).await;
    let (run, _) = cluster.run("cdc", false).await.expect("run 4");
    assert!(succeeded(&run), "{run:?}");
    let (rows, _) = bronze_rows(&cluster).await;
    assert_eq!(rows.len() as u64, expected, "messages lost or repeated");
}
