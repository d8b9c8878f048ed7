//! Gold tables queued together on the aggregator read their common silver input over Flight
//! once: the first to run reads the columns of all of them, the others take theirs from it.
//! Shown in the run's trace (a real OTLP receiver): every Flight read of that input is under
//! one gold task, and both gold tables hold the right rows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arrow::record_batch::RecordBatch;

use medallion_proto::v1::run_event::Event;
use medallion_tests::otlp::{ExportedSpan, TraceCollector};
use medallion_tests::{
    Cluster, ClusterOptions, postgres_url, succeeded, table_name, unique_name, values,
};

/// `gate` is computed from `silver.regions` as soon as it commits and holds the aggregator's
/// one task slot while it loads the warehouse; `silver.sales` joins `silver.regions`, so it
/// commits later, and `by_region` and `by_channel` (which read different columns of it) wait
/// behind `gate` together.
fn spec(name: &str, schema: &str) -> String {
    format!(
        r#"
name: {name}
defaults: {{ retries: 0 }}
sources:
  - {{ name: regions, format: csv, path: regions/*.csv }}
  - {{ name: sales, format: csv, path: sales/*.csv }}
silver:
  - name: regions
    from: bronze.regions
    columns: [{{ name: region }}, {{ name: manager }}]
  - name: sales
    from: bronze.sales
    columns:
      - {{ name: id, type: int64 }}
      - {{ name: region }}
      - {{ name: channel }}
      - {{ name: amount, type: "decimal(10,2)" }}
    join: {{ with: silver.regions, on: [{{ left: region, right: region }}], columns: [manager] }}
gold:
  - name: gate
    from: silver.regions
    group_by: [manager]
    aggregations: [{{ name: regions, expr: "COUNT(*)" }}]
    warehouse: {{ table: {schema}.gate, mode: replace }}
  - name: by_region
    from: silver.sales
    group_by: [region]
    aggregations: [{{ name: total, expr: "SUM(amount)" }}]
  - name: by_channel
    from: silver.sales
    group_by: [channel]
    aggregations:
      - {{ name: orders, expr: "COUNT(*)" }}
      - {{ name: last_id, expr: "MAX(id)" }}
warehouse:
  postgres: {{ url_env: MEDALLION_WAREHOUSE_URL, optional: true }}
"#
    )
}

const REGIONS: &str = "region,manager\nnorth,ana\nsouth,ben\n";
const SALES: &str = "id,region,channel,amount\n1,north,web,10.50\n2,south,shop,4.00\n\
                     3,north,shop,1.25\n4,south,web,7.25\n5,north,web,2.00\n";

/// The gold task span (`task` with table `gold.<name>`) above `span`, if any.
fn gold_task_of<'a>(trace: &'a [ExportedSpan], span: &'a ExportedSpan) -> Option<&'a str> {
    let mut at = span;
    loop {
        if at.name == "task" {
            return at.attributes.get("table").map(String::as_str);
        }
        at = trace.iter().find(|p| p.span_id == at.parent_span_id)?;
    }
}

/// A gold table's rows by the value of its string column `key`: each as its batch and row.
async fn gold_rows(
    cluster: &Cluster,
    table: &str,
    key: &str,
) -> BTreeMap<String, (RecordBatch, usize)> {
    let mut rows = BTreeMap::new();
    for batch in cluster.read(table).await.expect("read gold") {
        for row in 0..batch.num_rows() {
            let value = values::string(&batch, key, row).expect("a key value");
            rows.insert(value, (batch.clone(), row));
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn gold_tasks_waiting_together_read_their_silver_input_once() {
    let collector = TraceCollector::start().await.expect("OTLP receiver");
    let cluster = Cluster::start_with(ClusterOptions {
        warehouse: Some(postgres_url()),
        env: collector.exporter_env(),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    for (folder, csv) in [("regions", REGIONS), ("sales", SALES)] {
        let dir = cluster.data_dir().join(folder);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("{folder}.csv")), csv).expect("fixture");
    }
    let name = unique_name("gold_reads");
    cluster.apply(&spec(&name, &name)).await.expect("apply");
    // The first run creates the warehouse table of `gate`.
    let (first, _) = cluster.run(&name, false).await.expect("first run");
    assert!(succeeded(&first), "{first:?}");

    // Holding `gate`'s warehouse table keeps its load, and so the aggregator's slot, busy.
    let (mut pg, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .expect("postgres");
    tokio::spawn(connection);
    let lock = pg.transaction().await.expect("BEGIN");
    lock.batch_execute(&format!(
        "LOCK TABLE \"{name}\".\"gate\" IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .expect("lock gate's table");
    let (run_id, mut events) = cluster
        .start_run_with(&name, true)
        .await
        .expect("second run");
    // Both wait behind `gate` (in whichever order they arrive) before it is let go.
    let mut queued = BTreeSet::new();
    let wait = async {
        while queued.len() < 2 {
            let event = events
                .message()
                .await
                .expect("events")
                .expect("run still going");
            if let Some(Event::TaskProgress(p)) = &event.event
                && p.phase.starts_with("queued")
                && let Some(table) = &p.table
            {
                let table = table_name(table);
                if ["gold.by_region", "gold.by_channel"].contains(&table.as_str()) {
                    queued.insert(table);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .unwrap_or_else(|_| panic!("only {queued:?} were queued behind gold.gate"));
    lock.rollback().await.expect("release gate's table");
    let (run, _) = cluster.follow(&run_id).await.expect("second run ends");
    assert!(succeeded(&run), "{run:?}");

    // Both tables are right, each from its own columns of the one read.
    let by_region = gold_rows(&cluster, "gold.by_region", "region").await;
    let totals: Vec<(&str, i128)> = by_region
        .iter()
        .map(|(k, (b, i))| (k.as_str(), values::decimal(b, "total", *i, 2)))
        .collect();
    assert_eq!(totals, [("north", 1375), ("south", 1125)]);
    let by_channel = gold_rows(&cluster, "gold.by_channel", "channel").await;
    let channels: Vec<(&str, i64, i64)> = by_channel
        .iter()
        .map(|(k, (b, i))| {
            (
                k.as_str(),
                values::int(b, "orders", *i),
                values::int(b, "last_id", *i),
            )
        })
        .collect();
    assert_eq!(channels, [("shop", 2, 3), ("web", 3, 5)]);

    // The second run's trace: `silver.sales` was read over Flight under one gold task only.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let readers = loop {
        let trace = collector.run_trace(&run_id);
        let reads: Vec<&ExportedSpan> = trace
            .iter()
            .filter(|s| {
                s.service == "medallion-aggregator"
                    && s.name == "flight.do_get"
                    && s.attributes.get("table").map(String::as_str) == Some("silver.sales")
            })
            .collect();
        let readers: Vec<Option<String>> = reads
            .iter()
            .map(|s| gold_task_of(&trace, s).map(str::to_string))
            .collect();
        let tasks = trace
            .iter()
            .filter(|s| s.service == "medallion-aggregator" && s.name == "task")
            .count();
        if tasks == 3 && readers.iter().all(Option::is_some) {
            break readers;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no complete trace of run {run_id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !readers.is_empty(),
        "silver.sales was never read over Flight"
    );
    assert!(
        readers.iter().all(|r| r == &readers[0]),
        "silver.sales was read by more than one gold task: {readers:?}"
    );
}
