//! examples/tpch.yaml through the four service processes: gold equals an independent
//! computation from the CSV files, the warehouse equals gold, and incremental runs take in
//! only new files.

use std::path::Path;

use medallion_tests::{Cluster, reference, succeeded, task, unique_name, values};

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(from, to).expect("copy fixture file");
}

/// Checks both gold tables against the reference computed from `data`.
async fn assert_gold_matches(cluster: &Cluster, data: &Path) {
    let expected = reference::compute(data).expect("reference");
    let pricing = cluster
        .read("gold.pricing_summary")
        .await
        .expect("read pricing_summary");
    let mut seen = 0;
    for b in &pricing {
        for row in 0..b.num_rows() {
            let key = (
                values::string(b, "l_returnflag", row).expect("flag"),
                values::string(b, "l_linestatus", row).expect("status"),
            );
            let want = expected
                .pricing
                .get(&key)
                .unwrap_or_else(|| panic!("unexpected group {key:?}"));
            assert_eq!(
                values::decimal(b, "sum_qty", row, 2),
                want.sum_qty,
                "{key:?} sum_qty"
            );
            assert_eq!(
                values::decimal(b, "sum_base_price", row, 2),
                want.sum_base_price,
                "{key:?} sum_base_price"
            );
            assert_eq!(
                values::decimal(b, "sum_disc_price", row, 4),
                want.sum_disc_price,
                "{key:?} sum_disc_price"
            );
            assert_eq!(
                values::decimal(b, "sum_charge", row, 6),
                want.sum_charge,
                "{key:?} sum_charge"
            );
            assert_eq!(
                values::int(b, "count_order", row),
                want.count,
                "{key:?} count_order"
            );
            let n = want.count as f64;
            let cents = |x: f64| (x * 100.0).round();
            assert_eq!(
                cents(values::float(b, "avg_qty", row)),
                cents(want.sum_qty as f64 / 100.0 / n),
                "{key:?} avg_qty"
            );
            assert_eq!(
                cents(values::float(b, "avg_price", row)),
                cents(want.sum_base_price as f64 / 100.0 / n),
                "{key:?} avg_price"
            );
            assert_eq!(
                cents(values::float(b, "avg_disc", row)),
                cents(want.sum_disc as f64 / 100.0 / n),
                "{key:?} avg_disc"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, expected.pricing.len(), "pricing_summary groups");

    let monthly = cluster
        .read("gold.monthly_revenue")
        .await
        .expect("read monthly_revenue");
    let mut seen = 0;
    for b in &monthly {
        for row in 0..b.num_rows() {
            let key = (
                values::string(b, "order_month", row).expect("month"),
                values::string(b, "o_orderpriority", row).expect("priority"),
            );
            let want = expected
                .monthly
                .get(&key)
                .unwrap_or_else(|| panic!("unexpected group {key:?}"));
            assert_eq!(
                values::decimal(b, "revenue", row, 4),
                want.revenue,
                "{key:?} revenue"
            );
            assert_eq!(
                values::int(b, "order_count", row),
                want.orders.len() as i64,
                "{key:?} order_count"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, expected.monthly.len(), "monthly_revenue groups");
}

/// The warehouse holds exactly the gold rows.
async fn assert_warehouse_matches(cluster: &Cluster, schema: &str) {
    let (client, connection) =
        tokio_postgres::connect(&medallion_tests::postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let gold = cluster
        .read("gold.pricing_summary")
        .await
        .expect("read gold");
    let rows = client
        .query(
            &format!(
                "SELECT l_returnflag, l_linestatus, sum_qty::text, sum_disc_price::text, sum_charge::text, count_order \
                 FROM \"{schema}\".pricing_summary ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .expect("query warehouse");
    assert_eq!(
        rows.len(),
        values::rows(&gold),
        "warehouse pricing_summary rows"
    );
    let mut i = 0;
    for b in &gold {
        for row in 0..b.num_rows() {
            let r = &rows[i];
            assert_eq!(
                r.get::<_, String>(0),
                values::string(b, "l_returnflag", row).expect("flag")
            );
            assert_eq!(
                r.get::<_, String>(1),
                values::string(b, "l_linestatus", row).expect("status")
            );
            assert_eq!(
                reference::fixed(&r.get::<_, String>(2), 2).expect("qty"),
                values::decimal(b, "sum_qty", row, 2)
            );
            assert_eq!(
                reference::fixed(&r.get::<_, String>(3), 4).expect("disc"),
                values::decimal(b, "sum_disc_price", row, 4)
            );
            assert_eq!(
                reference::fixed(&r.get::<_, String>(4), 6).expect("charge"),
                values::decimal(b, "sum_charge", row, 6)
            );
            assert_eq!(r.get::<_, i64>(5), values::int(b, "count_order", row));
            i += 1;
        }
    }
    let gold_monthly = values::rows(
        &cluster
            .read("gold.monthly_revenue")
            .await
            .expect("read gold"),
    );
    let count: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".monthly_revenue"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        count as usize, gold_monthly,
        "warehouse monthly_revenue rows"
    );
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .expect("drop test schema");
}

#[tokio::test(flavor = "multi_thread")]
async fn tpch_gold_matches_reference_and_runs_incrementally() {
    let cluster = Cluster::start(Some(medallion_tests::postgres_url()))
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
