//! examples/tpch.yaml through the four service processes: gold equals an independent
//! computation from the CSV files, the warehouse equals gold, and incremental runs take in
//! only new files.

use std::path::Path;

use medallion_tests::reference::{assert_gold_matches, assert_warehouse_matches};
use medallion_tests::{Cluster, ClusterOptions, Service, reference, succeeded, task, unique_name};

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(from, to).expect("copy fixture file");
}

#[tokio::test(flavor = "multi_thread")]
async fn tpch_gold_matches_reference_and_runs_incrementally() {
    // silver.lineitem (30k-60k rows) is refined in buckets of 20k input rows, silver.orders whole.
    let cluster = Cluster::start_with(ClusterOptions {
        warehouse: Some(medallion_tests::postgres_url()),
        env: vec![("MEDALLION_REFINER_BUCKET_ROWS".into(), "20000".into())],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let generated = cluster.dir.path().join("generated");
    Cluster::gen_tpch(&generated, 0.01, 2)
        .await
        .expect("generate TPC-H");
    let data = cluster.data_dir().join("data");
    copy(
        &generated.join("data/lineitem/part-1.csv"),
        &data.join("lineitem/part-1.csv"),
    );
    copy(
        &generated.join("data/orders/part-1.csv"),
        &data.join("orders/part-1.csv"),
    );
    copy(
        &generated.join("data/orders/part-2.csv"),
        &data.join("orders/part-2.csv"),
    );

    let schema = unique_name("tpch");
    let spec =
        std::fs::read_to_string(medallion_tests::workspace_root().join("examples/tpch.yaml"))
            .expect("examples/tpch.yaml")
            .replace("medallion_tpch.", &format!("{schema}."));
    cluster.apply(&spec).await.expect("apply tpch spec");

    // First run: everything is new.
    let (run, _) = cluster.run("tpch", false).await.expect("run 1");
    assert!(succeeded(&run), "run 1 failed: {run:?}");
    assert_gold_matches(&cluster, &data).await;
    assert_warehouse_matches(&cluster, &schema).await;
    let refiner_log = cluster.log(Service::Refiner);
    assert!(
        refiner_log.lines().any(|l| l.contains("refined")
            && l.contains("silver.lineitem")
            && l.contains("buckets=")),
        "silver.lineitem was not refined in buckets:\n{refiner_log}"
    );
    // pricing_summary's `DATE '1998-09-02'` makes polars warn of a deprecation: it goes
    // through the log, not onto stderr as a bare line.
    for service in [Service::Refiner, Service::Aggregator] {
        let log = cluster.log(service);
        assert!(
            !log.lines().any(|l| l.starts_with("Deprecation:")),
            "a bare polars warning in the {service:?} log:\n{log}"
        );
    }
    let bronze_version = task(&run, "bronze.lineitem")
        .manifest
        .as_ref()
        .expect("manifest")
        .version;
    let gold_version = task(&run, "gold.pricing_summary")
        .manifest
        .as_ref()
        .expect("manifest")
        .version;

    // Second run, no new files: nothing is committed and gold stays as it was.
    let (run, _) = cluster.run("tpch", false).await.expect("run 2");
    assert!(succeeded(&run), "run 2 failed: {run:?}");
    for t in &run.tasks {
        let m = t.manifest.as_ref().expect("manifest");
        assert!(
            !m.committed,
            "{:?} committed on a run without new files",
            t.table
        );
    }
    assert_eq!(
        task(&run, "bronze.lineitem")
            .manifest
            .as_ref()
            .expect("m")
            .version,
        bronze_version
    );
    assert_eq!(
        task(&run, "gold.pricing_summary")
            .manifest
            .as_ref()
            .expect("m")
            .version,
        gold_version
    );

    // One added file: it alone is ingested, and gold follows.
    copy(
        &generated.join("data/lineitem/part-2.csv"),
        &data.join("lineitem/part-2.csv"),
    );
    let (run, _) = cluster.run("tpch", false).await.expect("run 3");
    assert!(succeeded(&run), "run 3 failed: {run:?}");
    let bronze = task(&run, "bronze.lineitem")
        .manifest
        .as_ref()
        .expect("manifest");
    assert_eq!(
        bronze.source_files.len(),
        1,
        "ingested {:?}",
        bronze.source_files
    );
    assert!(
        bronze.source_files[0].ends_with("lineitem/part-2.csv"),
        "{:?}",
        bronze.source_files
    );
    let expected = reference::compute(&data).expect("reference");
    assert_eq!(bronze.table_rows as usize, expected.lineitems);
    assert!(
        !task(&run, "bronze.orders")
            .manifest
            .as_ref()
            .expect("m")
            .committed
    );
    assert_gold_matches(&cluster, &data).await;

    // Full refresh rebuilds every layer to the same gold.
    let (run, _) = cluster.run("tpch", true).await.expect("full refresh");
    assert!(succeeded(&run), "full refresh failed: {run:?}");
    assert!(
        task(&run, "bronze.lineitem")
            .manifest
            .as_ref()
            .expect("m")
            .committed
    );
    assert_eq!(
        task(&run, "bronze.lineitem")
            .manifest
            .as_ref()
            .expect("m")
            .table_rows as usize,
        expected.lineitems
    );
    assert_gold_matches(&cluster, &data).await;
}
