//! Silver tables with more input rows than a bucket are de-duplicated and joined one key
//! bucket at a time (spilled to disk); the rows must equal those of the whole-table
//! computation, made here independently from the CSV text.

use std::collections::BTreeMap;

use medallion_tests::{Cluster, ClusterOptions, Service, succeeded, task, values};

const SPEC: &str = r#"
name: buckets
defaults: { retries: 0 }
sources:
  - { name: events, format: csv, path: events.csv, options: { null_values: [""] } }
  - { name: customers, format: csv, path: customers.csv, options: { null_values: [""] } }
silver:
  # Bucketed by `name` alone (de-duplication only).
  - name: customers
    from: bronze.customers
    columns: [{ name: name }, { name: segment }, { name: version, type: int64 }]
    dedupe: { keys: [name], order_by: version, keep: last }
  # Bucketed by `customer`, the join key that is also a de-duplication key.
  - name: latest
    from: bronze.events
    columns:
      - { name: customer }
      - { name: id, type: int64 }
      - { name: seq, type: int64 }
      - { name: amount, type: int64 }
    expectations:
      - { name: has_amount, expr: "amount IS NOT NULL", action: quarantine }
    dedupe: { keys: [customer, id], order_by: seq, keep: last }
    join: { with: silver.customers, on: [{ left: customer, right: name }], how: left, columns: [segment] }
  # Bucketed by `customer, id`; the first row read wins (no `order_by`).
  - name: first_seen
    from: bronze.events
    columns: [{ name: customer }, { name: id, type: int64 }, { name: seq, type: int64 }]
    dedupe: { keys: [customer, id], keep: first }
  # Bucketed by the join key (no de-duplication).
  - name: matched
    from: bronze.events
    columns: [{ name: customer }, { name: id, type: int64 }, { name: amount, type: int64 }]
    join: { with: silver.customers, on: [{ left: customer, right: name }], how: inner }
"#;

/// A small deterministic generator (64-bit LCG), so the fixture is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

type Event = (Option<String>, i64, i64, Option<i64>);

/// Every row of `table` (read over Flight) as `row` makes it, sorted.
async fn sorted_rows<T: Ord>(
    cluster: &Cluster,
    table: &str,
    row: impl Fn(&arrow::record_batch::RecordBatch, usize) -> T,
) -> Vec<T> {
    let batches = cluster.read(table).await.expect("read");
    let mut rows: Vec<T> = batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(|r| row(b, r)).collect::<Vec<_>>())
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_refined_in_buckets_equal_the_whole_table_computation() {
    let spool = tempfile::tempdir().expect("spool folder");
    let cluster = Cluster::start_with(ClusterOptions {
        env: vec![
            ("MEDALLION_REFINER_BUCKET_ROWS".into(), "1000".into()),
            (
                "MEDALLION_SPOOL_DIR".into(),
                spool.path().display().to_string(),
            ),
        ],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let mut rng = Lcg(7);

    // Customers: 1500 names over 3000 rows, each name's newest version wins; 50 event
    // customers have no customer row at all.
    let mut customers: Vec<(String, String, i64)> = Vec::new();
    let mut csv = String::from("name,segment,version\n");
    for _ in 0..3000 {
        let name = format!("c{}", rng.next(1500));
        let segment = format!("s{}", rng.next(9));
        let version = rng.next(5) as i64;
        csv.push_str(&format!("{name},{segment},{version}\n"));
        customers.push((name, segment, version));
    }
    std::fs::create_dir_all(cluster.data_dir()).expect("mkdir");
    std::fs::write(cluster.data_dir().join("customers.csv"), csv).expect("customers.csv");

    // Events: 12000 rows over (customer, id) pairs with repeats, ties in `seq`, null
    // customers and null amounts.
    let mut events: Vec<Event> = Vec::new();
    let mut csv = String::from("customer,id,seq,amount\n");
    for _ in 0..12_000 {
        let customer = (rng.next(40) != 0).then(|| format!("c{}", rng.next(1550)));
        let id = rng.next(4) as i64;
        let seq = rng.next(6) as i64;
        let amount = (rng.next(25) != 0).then(|| rng.next(1000) as i64);
        csv.push_str(&format!(
            "{},{id},{seq},{}\n",
            customer.clone().unwrap_or_default(),
            amount.map(|a| a.to_string()).unwrap_or_default()
        ));
        events.push((customer, id, seq, amount));
    }
    std::fs::write(cluster.data_dir().join("events.csv"), csv).expect("events.csv");

    cluster.apply(SPEC).await.expect("apply");
    let (run, _) = cluster.run("buckets", false).await.expect("run");
    assert!(succeeded(&run), "{run:?}");

    // The expected tables. Last by order, ties in input order: a later row with an equal
    // order value wins.
    let mut segment_of: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for (name, segment, version) in &customers {
        let newer = segment_of.get(name).is_none_or(|(v, _)| version >= v);
        if newer {
            segment_of.insert(name.clone(), (*version, segment.clone()));
        }
    }
    let kept: Vec<&Event> = events.iter().filter(|e| e.3.is_some()).collect();
    let mut latest: BTreeMap<(Option<String>, i64), (i64, i64)> = BTreeMap::new();
    for (customer, id, seq, amount) in &kept {
        let key = (customer.clone(), *id);
        if latest.get(&key).is_none_or(|(s, _)| seq >= s) {
            latest.insert(key, (*seq, amount.unwrap_or_default()));
        }
    }
    let segment = |c: &Option<String>| {
        c.as_ref()
            .and_then(|c| segment_of.get(c))
            .map(|(_, s)| s.clone())
    };
    let mut want_latest: Vec<(Option<String>, i64, i64, i64, Option<String>)> = latest
        .iter()
        .map(|((c, id), (seq, amount))| (c.clone(), *id, *seq, *amount, segment(c)))
        .collect();
    want_latest.sort();
    let mut want_matched: Vec<(String, i64, Option<i64>, String)> = events
        .iter()
        .filter_map(|(c, id, _, amount)| {
            let c = c.clone()?;
            let s = segment(&Some(c.clone()))?;
            Some((c, *id, *amount, s))
        })
        .collect();
    want_matched.sort();
    let mut first_seen: BTreeMap<(Option<String>, i64), i64> = BTreeMap::new();
    for (customer, id, seq, _) in &events {
        first_seen.entry((customer.clone(), *id)).or_insert(*seq);
    }
    let want_first: Vec<(Option<String>, i64, i64)> = first_seen
        .into_iter()
        .map(|((c, id), seq)| (c, id, seq))
        .collect();
    let mut want_customers: Vec<(String, String, i64)> = segment_of
        .iter()
        .map(|(n, (v, s))| (n.clone(), s.clone(), *v))
        .collect();
    want_customers.sort();

    let got = sorted_rows(&cluster, "silver.customers", |b, r| {
        (
            values::string(b, "name", r).expect("name"),
            values::string(b, "segment", r).expect("segment"),
            values::int(b, "version", r),
        )
    })
    .await;
    assert_eq!(got, want_customers, "silver.customers");

    let got = sorted_rows(&cluster, "silver.latest", |b, r| {
        (
            values::string(b, "customer", r),
            values::int(b, "id", r),
            values::int(b, "seq", r),
            values::int(b, "amount", r),
            values::string(b, "segment", r),
        )
    })
    .await;
    assert_eq!(got.len(), want_latest.len(), "silver.latest rows");
    assert_eq!(got, want_latest, "silver.latest");

    let got = sorted_rows(&cluster, "silver.first_seen", |b, r| {
        (
            values::string(b, "customer", r),
            values::int(b, "id", r),
            values::int(b, "seq", r),
        )
    })
    .await;
    assert_eq!(got, want_first, "silver.first_seen");

    let got = sorted_rows(&cluster, "silver.matched", |b, r| {
        let amount = b
            .column_by_name("amount")
            .is_some_and(|c| !arrow::array::Array::is_null(c, r))
            .then(|| values::int(b, "amount", r));
        (
            values::string(b, "customer", r).expect("customer"),
            values::int(b, "id", r),
            amount,
            values::string(b, "segment", r).expect("segment"),
        )
    })
    .await;
    assert_eq!(got.len(), want_matched.len(), "silver.matched rows");
    assert_eq!(got, want_matched, "silver.matched");

    // Rows with no amount went to quarantine, counted once.
    let quarantined = task(&run, "silver.latest")
        .manifest
        .as_ref()
        .expect("manifest")
        .quarantined_rows;
    assert_eq!(quarantined as usize, events.len() - kept.len());

    // Every table took the bucketed path (the refiner logs how many buckets it used).
    let log = cluster.log(Service::Refiner);
    for table in [
        "silver.customers",
        "silver.latest",
        "silver.first_seen",
        "silver.matched",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("refined") && l.contains(table) && l.contains("buckets=")),
            "{table} was not refined in buckets:\n{log}"
        );
    }
    // The spill folders are gone once the tables are committed.
    let left: Vec<_> = std::fs::read_dir(spool.path())
        .expect("spool folder")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "spill folders left behind: {left:?}");
}
