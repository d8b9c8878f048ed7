//! Expectations with every action: counts in the run events, quarantined rows with the names
//! of the expectations they failed, and `fail` stopping its table with nothing committed.

use medallion_lake::{Lake, Layer};
use medallion_proto::v1::{self as pb, run_event::Event};
use medallion_tests::{Cluster, table_name, values};

const SPEC: &str = r#"
name: quality
defaults: { retries: 0 }
sources:
  - name: items
    format: csv
    path: items/*.csv
    options: { null_values: [""] }
silver:
  - name: items
    from: bronze.items
    columns:
      - { name: id, type: int64 }
      - { name: qty, type: int64 }
      - { name: price, type: "decimal(10,2)" }
      - { name: category }
    expectations:
      - { name: positive_qty, expr: "qty > 0", action: quarantine }
      - { name: has_price, expr: "price IS NOT NULL", action: drop }
      - { name: has_category, expr: "category IS NOT NULL", action: warn }
  - name: strict_items
    from: bronze.items
    columns:
      - { name: id, type: int64 }
    expectations:
      - { name: small_ids, expr: "id < 5", action: fail }
"#;

const ITEMS: &str =
    "id,qty,price,category\n1,5,10.00,a\n2,-1,10.00,a\n3,5,,a\n4,5,10.00,\n5,0,,b\n";

#[tokio::test(flavor = "multi_thread")]
async fn expectations_warn_drop_quarantine_and_fail() {
    let cluster = Cluster::start(None).await.expect("cluster");
    let dir = cluster.data_dir().join("items");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("items.csv"), ITEMS).expect("fixture");
    cluster.apply(SPEC).await.expect("apply");
    let (run, events) = cluster.run("quality", false).await.expect("run");

    // `fail` stops the run; the other silver table still commits.
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:?}");
    assert!(run.error.contains("small_ids"), "{}", run.error);
    assert!(run.error.contains("1 of 5 rows"), "{}", run.error);

    let counts: Vec<(String, String, u64, u64)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Expectation(x)) => Some((
                x.table.as_ref().map(table_name).unwrap_or_default(),
                x.name.clone(),
                x.failed_rows,
                x.checked_rows,
            )),
            _ => None,
        })
        .collect();
    for (name, failed) in [("positive_qty", 2), ("has_price", 2), ("has_category", 1)] {
        assert!(
            counts.contains(&("silver.items".to_string(), name.to_string(), failed, 5)),
            "expected {name} to fail {failed} of 5 rows; events: {counts:?}"
        );
    }

    let silver = cluster.read("silver.items").await.expect("read silver");
    let mut ids: Vec<i64> = silver
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(move |r| values::int(b, "id", r)))
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 4], "kept rows");

    let quarantine = cluster
        .read("quarantine.items")
        .await
        .expect("read quarantine");
    let mut quarantined: Vec<(i64, String)> = quarantine
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| {
                (
                    values::int(b, "id", r),
                    values::string(b, "_failed_expectations", r).unwrap_or_default(),
                )
            })
        })
        .collect();
    quarantined.sort();
    assert_eq!(
        quarantined,
        vec![
            (2, "positive_qty".to_string()),
            (5, "positive_qty,has_price".to_string())
        ]
    );

    let lake = Lake::open(
        &cluster.lake_dir().display().to_string(),
        Default::default(),
    )
    .expect("lake");
    assert!(
        lake.snapshot(Layer::Silver, "strict_items", None)
            .await
            .expect("snapshot")
            .is_none(),
        "a failed expectation committed data"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_definition_recomputes_and_tables_have_one_owner() {
    let cluster = Cluster::start(None).await.expect("cluster");
    let dir = cluster.data_dir().join("items");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("items.csv"), ITEMS).expect("fixture");
    let spec = SPEC.replace("  - name: strict_items", "  - name: unused_strict_items");
    cluster.apply(&spec).await.expect("apply");
    let (run, _) = cluster.run("quality", false).await.expect("run 1");
    // `unused_strict_items` fails the run; `silver.items` must still have committed.
    let items = medallion_tests::task(&run, "silver.items");
    assert_eq!(
        items.state,
        pb::TaskState::Succeeded as i32,
        "silver.items did not succeed: {items:?}\nrefiner log:\n{}",
        cluster.log(medallion_tests::Service::Refiner)
    );
    let ids = |batches: &[arrow::record_batch::RecordBatch]| {
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(move |r| values::int(b, "id", r)))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(&cluster.read("silver.items").await.expect("read")),
        vec![1, 4]
    );

    // Same inputs, new definition: the table is recomputed, not skipped.
    let stricter = spec.replace(
        r#"expr: "category IS NOT NULL", action: warn"#,
        r#"expr: "category IS NOT NULL", action: drop"#,
    );
    assert_ne!(stricter, spec);
    cluster.apply(&stricter).await.expect("re-apply");
    cluster.run("quality", false).await.expect("run 2");
    assert_eq!(
        ids(&cluster.read("silver.items").await.expect("read")),
        vec![1]
    );

    // Another pipeline may not write a table this one writes.
    let other = "name: other\nsources:\n  - { name: items, format: csv, path: items/*.csv }\n";
    let status = cluster
        .apply(other)
        .await
        .expect_err("a second owner of bronze.items");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("bronze.items") && status.message().contains("quality"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dedupe_keeps_the_first_or_last_row_by_order() {
    let cluster = Cluster::start(None).await.expect("cluster");
    std::fs::create_dir_all(cluster.data_dir()).expect("mkdir");
    std::fs::write(
        cluster.data_dir().join("events.csv"),
        "id,v,ts\n1,a,1\n1,b,3\n2,x,1\n1,c,2\n2,y,0\n",
    )
    .expect("fixture");
    let spec = r#"
name: dedupe
sources:
  - { name: events, format: csv, path: events.csv }
silver:
  - name: latest
    from: bronze.events
    columns: [{ name: id, type: int64 }, { name: v }, { name: ts, type: int64 }]
    dedupe: { keys: [id], order_by: ts, keep: last }
  - name: earliest
    from: bronze.events
    columns: [{ name: id, type: int64 }, { name: v }, { name: ts, type: int64 }]
    dedupe: { keys: [id], order_by: ts, keep: first }
"#;
    cluster.apply(spec).await.expect("apply");
    let (run, _) = cluster.run("dedupe", false).await.expect("run");
    assert!(medallion_tests::succeeded(&run), "{run:?}");
    for (table, want) in [
        ("silver.latest", [(1, "b"), (2, "x")]),
        ("silver.earliest", [(1, "a"), (2, "y")]),
    ] {
        let batches = cluster.read(table).await.expect("read");
        let mut got: Vec<(i64, String)> = batches
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(move |r| {
                    (
                        values::int(b, "id", r),
                        values::string(b, "v", r).unwrap_or_default(),
                    )
                })
            })
            .collect();
        got.sort();
        let want: Vec<(i64, String)> = want.iter().map(|(i, v)| (*i, v.to_string())).collect();
        assert_eq!(got, want, "{table}");
    }
}
