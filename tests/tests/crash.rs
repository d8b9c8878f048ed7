//! A refiner killed (SIGKILL) while it writes silver: the table stays at a complete version,
//! and after a restart the coordinator's retry finishes the run with no duplicate rows.

use std::collections::BTreeSet;

use futures::StreamExt;
use medallion_lake::{Lake, Layer};
use medallion_proto::v1::run_event::Event;
use medallion_tests::{
    Cluster, ClusterOptions, Service, reference, succeeded, task, values, wait_for_event,
};

/// Reads every row of the latest version of a table straight from the lake files.
async fn lake_rows(lake: &Lake, layer: Layer, table: &str) -> (i64, usize) {
    let snapshot = lake
        .snapshot(layer, table, None)
        .await
        .expect("snapshot")
        .expect("table exists");
    let mut rows = 0;
    for file in &snapshot.files {
        let mut stream = lake.read_file(&snapshot, file, 8192);
        while let Some(batch) = stream.next().await {
            rows += batch.expect("readable data file").num_rows();
        }
    }
    (snapshot.version, rows)
}

#[tokio::test(flavor = "multi_thread")]
async fn refiner_killed_mid_write_recovers_without_duplicates() {
    // Small buckets: silver.lineitem (about 300k rows) is refined and written in 8 buckets, and
    // the kill lands while some of them are written.
    let spool = tempfile::tempdir().expect("spool folder");
    let mut cluster = Cluster::start_with(ClusterOptions {
        env: vec![
            ("MEDALLION_REFINER_BUCKET_ROWS".into(), "40000".into()),
            (
                "MEDALLION_SPOOL_DIR".into(),
                spool.path().display().to_string(),
            ),
        ],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let spill_folders = || std::fs::read_dir(spool.path()).expect("spool").count();
    let generated = cluster.dir.path().join("generated");
    Cluster::gen_tpch(&generated, 0.05, 2)
        .await
        .expect("generate");
    let data = cluster.data_dir().join("data");
    for f in [
        "lineitem/part-1.csv",
        "orders/part-1.csv",
        "orders/part-2.csv",
    ] {
        std::fs::create_dir_all(data.join(f).parent().expect("parent")).expect("mkdir");
        std::fs::copy(generated.join("data").join(f), data.join(f)).expect("copy");
    }
    // Retries far enough apart for the refiner to come back.
    let spec =
        std::fs::read_to_string(medallion_tests::workspace_root().join("examples/tpch.yaml"))
            .expect("spec")
            .replace("retries: 2", "retries: 8")
            .replace("backoff_ms: 500", "backoff_ms: 1000");
    cluster.apply(&spec).await.expect("apply");
    let (run, _) = cluster.run("tpch", false).await.expect("clean run");
    assert!(succeeded(&run), "{run:?}");
    let lake = Lake::open(
        &cluster.lake_dir().display().to_string(),
        Default::default(),
    )
    .expect("lake");
    let (v1, rows1) = lake_rows(&lake, Layer::Silver, "lineitem").await;

    std::fs::copy(
        generated.join("data/lineitem/part-2.csv"),
        data.join("lineitem/part-2.csv"),
    )
    .expect("copy part 2");
    let expected_rows = reference::compute(&data).expect("reference").lineitems;
    let (run_id, mut events) = cluster.start_run("tpch").await.expect("start run");
    wait_for_event(
        &mut events,
        "silver.lineitem",
        |e| matches!(e, Event::TaskProgress(p) if p.phase.starts_with("writing bucket")),
    )
    .await;
    cluster.kill(Service::Refiner).await;
    // The killed task's spill folder stays behind (unless the kill came after its buckets were
    // written); so does one like it, made here to show the restarted refiner removes them.
    assert!(spill_folders() <= 1, "one task was spilling");
    let stale = spool.path().join("medallion-spill-lineitem-stale");
    std::fs::create_dir(&stale).expect("stale spill folder");
    std::fs::write(stale.join("in-use.lock"), b"").expect("stale lock file");

    // Whatever the kill interrupted, the table is at a complete version: the old one or the new one.
    let (v, rows) = lake_rows(&lake, Layer::Silver, "lineitem").await;
    assert!(
        (v == v1 && rows == rows1) || (v > v1 && rows == expected_rows),
        "after the crash silver.lineitem is version {v} with {rows} rows (before: version {v1}, {rows1} rows)"
    );

    cluster
        .restart(Service::Refiner)
        .await
        .expect("restart refiner");
    let (run, _) = cluster.follow(&run_id).await.expect("follow");
    assert!(succeeded(&run), "run after restart: {run:?}");
    // The restarted refiner removed what the killed one left, and cleaned up after itself.
    assert!(!stale.exists(), "the stale spill folder is still there");
    assert_eq!(spill_folders(), 0, "spill folders left behind");
    assert!(
        task(&run, "silver.lineitem").attempts >= 2,
        "the killed task was not retried"
    );

    let silver = cluster.read("silver.lineitem").await.expect("read silver");
    assert_eq!(
        values::rows(&silver),
        expected_rows,
        "silver.lineitem rows after recovery"
    );
    let keys: BTreeSet<(i64, i64)> = silver
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| {
                (
                    values::int(b, "l_orderkey", r),
                    values::int(b, "l_linenumber", r),
                )
            })
        })
        .collect();
    assert_eq!(
        keys.len(),
        expected_rows,
        "duplicate (orderkey, linenumber) rows in silver"
    );
    let (_, lake_count) = lake_rows(&lake, Layer::Silver, "lineitem").await;
    assert_eq!(lake_count, expected_rows);
}
