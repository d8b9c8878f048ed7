//! Per-service scaling: two refiner processes behind one URL list. Both get work; one is
//! killed while it runs a task; the run still succeeds, with every row exactly once.

use std::time::Duration;

use medallion_proto::v1::{self as pb, run_event::Event};
use medallion_tests::{Cluster, ClusterOptions, Service, table_name, task, values};

const ROWS: usize = 400_000;

const SPEC: &str = r#"
name: scaled
defaults: { retries: 4, backoff_ms: 300 }
sources:
  - name: sales
    format: csv
    path: sales/*.csv
silver:
  - { name: s1, from: bronze.sales, columns: [{ name: id, type: int64 }, { name: region }, { name: amount, type: int64 }], dedupe: { keys: [id] } }
  - { name: s2, from: bronze.sales, columns: [{ name: id, type: int64 }, { name: region }, { name: amount, type: int64 }], dedupe: { keys: [id] } }
  - { name: s3, from: bronze.sales, columns: [{ name: id, type: int64 }, { name: region }, { name: amount, type: int64 }], dedupe: { keys: [id] } }
  - { name: s4, from: bronze.sales, columns: [{ name: id, type: int64 }, { name: region }, { name: amount, type: int64 }], dedupe: { keys: [id] } }
gold:
  - name: by_region
    sql: SELECT region, COUNT(*) AS n, SUM(amount) AS total FROM s1 GROUP BY region
"#;

/// Tasks a replica has started but not ended, from its log.
fn running_tasks(log: &str) -> usize {
    let started = log.matches("task running").count();
    let ended = log.matches("task finished").count() + log.matches("task failed").count();
    started.saturating_sub(ended)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_refiners_share_the_work_and_survive_losing_one() {
    let mut cluster = Cluster::start_with(ClusterOptions {
        refiners: 2,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let dir = cluster.data_dir().join("sales");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut csv = String::from("id,region,amount\n");
    for i in 0..ROWS {
        csv.push_str(&format!("{i},r{},{}\n", i % 7, i % 100));
    }
    std::fs::write(dir.join("sales.csv"), csv).expect("fixture");
    cluster.apply(SPEC).await.expect("apply");
    // Kill the first refiner while it is running a task. The balancer picks replicas at
    // random, so a run may leave it idle: then a full refresh gives it another chance.
    let mut attempts = 0;
    let (run_id, mut events) = 'started: loop {
        attempts += 1;
        assert!(
            attempts <= 6,
            "refiner 0 never ran a task; its log:\n{}",
            cluster.replica_log(Service::Refiner, 0)
        );
        let (run_id, events) = cluster
            .start_run_with("scaled", attempts > 1)
            .await
            .expect("start");
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while std::time::Instant::now() < deadline {
            if running_tasks(&cluster.replica_log(Service::Refiner, 0)) > 0 {
                break 'started (run_id, events);
            }
            let state = cluster
                .client()
                .await
                .expect("client")
                .get_run(pb::GetRunRequest {
                    run_id: run_id.clone(),
                })
                .await
                .expect("get run")
                .into_inner()
                .state;
            if state != pb::RunState::Queued as i32 && state != pb::RunState::Running as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    cluster.kill_replica(Service::Refiner, 0).await;

    // Drain the events, then read the final run.
    while let Ok(Some(e)) = events.message().await {
        if matches!(e.event, Some(Event::RunFinished(_))) {
            break;
        }
    }
    let (run, _) = cluster.follow(&run_id).await.expect("run");
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");

    // Both replicas got work; the killed one's task was retried.
    for replica in [0, 1] {
        assert!(
            cluster
                .replica_log(Service::Refiner, replica)
                .contains("task running"),
            "refiner {replica} got no task"
        );
    }
    let retried: Vec<String> = ["silver.s1", "silver.s2", "silver.s3", "silver.s4"]
        .iter()
        .filter(|t| task(&run, t).attempts > 1)
        .map(|t| t.to_string())
        .collect();
    assert!(!retried.is_empty(), "no silver task was retried: {run:?}");

    // Every silver table holds every row exactly once (read from the surviving replica).
    for table in ["silver.s1", "silver.s2", "silver.s3", "silver.s4"] {
        let batches = cluster
            .read_from(Service::Refiner, 1, table)
            .await
            .expect("read");
        assert_eq!(values::rows(&batches), ROWS, "{table}");
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(move |r| values::int(b, "id", r)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), ROWS, "{table} has duplicate ids");
    }
    let gold = task(&run, "gold.by_region");
    assert_eq!(
        gold.manifest.as_ref().map(|m| m.table_rows),
        Some(7),
        "{}",
        gold.table.as_ref().map(table_name).unwrap_or_default()
    );
}
