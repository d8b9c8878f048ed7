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
async fn bronze_rows(cluster: &Cluster, table: &str) -> (BTreeSet<(i64, i64)>, usize) {
    let mut seen = BTreeSet::new();
    let mut errors = 0;
    for b in cluster.read(table).await.expect("read bronze") {
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
    let (rows, errors) = bronze_rows(&cluster, "bronze.customers").await;
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
    let (rows, _) = bronze_rows(&cluster, "bronze.customers").await;
    if rows.len() as u64 != expected {
        let missing: Vec<(i64, i64)> = rows.iter().copied().collect();
        panic!(
            "{} messages in bronze, {expected} sent; present: {missing:?}\nthe ingestor's log:\n{}",
            rows.len(),
            cluster
                .replica_log(Service::Ingestor, 0)
                .lines()
                .filter(|l| !l.contains("Skipping column"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A customer row of the generated source table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Customer {
    name: String,
    region: String,
    balance_cents: i64,
    visits: i64,
    signup_days: i32,
}

impl Customer {
    fn json(&self, id: i64) -> String {
        format!(
            r#"{{"id":{id},"name":"{}","region":"{}","balance":"{}.{:02}","visits":{},"signup":{}}}"#,
            self.name,
            self.region,
            self.balance_cents / 100,
            self.balance_cents % 100,
            self.visits,
            self.signup_days
        )
    }
}

/// One change of the source table, in commit order (`position` orders them: the Postgres
/// LSN, or the MySQL binlog file and position).
#[derive(Debug, Clone)]
struct SourceChange {
    position: u64,
    id: Option<i64>,
    op: &'static str,
    before: Option<Customer>,
    after: Option<Customer>,
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const REGIONS: [&str; 4] = ["north", "south", "east", "west"];

/// Random inserts, updates (some only of `visits`, which SCD2 does not track) and deletes of
/// `keys` customers, applied to `state`.
fn generate(
    rng: &mut Rng,
    state: &mut std::collections::BTreeMap<i64, Customer>,
    position: &mut u64,
    count: usize,
    keys: u64,
) -> Vec<SourceChange> {
    let mut changes = Vec::new();
    for _ in 0..count {
        *position += 8;
        let id = rng.below(keys) as i64;
        let before = state.get(&id).cloned();
        let (op, after) = match &before {
            None => (
                "c",
                Some(Customer {
                    name: format!("c{}", rng.below(1000)),
                    region: REGIONS[rng.below(4) as usize].into(),
                    balance_cents: rng.below(1_000_000) as i64,
                    visits: 0,
                    signup_days: 19_000 + rng.below(1000) as i32,
                }),
            ),
            Some(old) => match rng.below(10) {
                0..=2 => ("d", None),
                3..=5 => (
                    "u",
                    Some(Customer {
                        visits: old.visits + 1,
                        ..old.clone()
                    }),
                ),
                _ => (
                    "u",
                    Some(Customer {
                        region: REGIONS[rng.below(4) as usize].into(),
                        balance_cents: rng.below(1_000_000) as i64,
                        name: format!("c{}", rng.below(1000)),
                        ..old.clone()
                    }),
                ),
            },
        };
        match &after {
            Some(row) => state.insert(id, row.clone()),
            None => state.remove(&id),
        };
        changes.push(SourceChange {
            position: *position,
            id: Some(id),
            op,
            before,
            after,
        });
    }
    changes
}

/// The Debezium message of a change: Postgres or MySQL `source` block, schemas on for every
/// other message.
fn debezium_message(change: &SourceChange, mysql: bool) -> (String, String) {
    let image = |row: &Option<Customer>| match (row, change.id) {
        (Some(r), Some(id)) => r.json(id),
        _ => "null".into(),
    };
    let source = if mysql {
        // A new binlog file every 4000 positions; positions restart in each file.
        format!(
            r#"{{"connector":"mysql","file":"mysql-bin.{:06}","pos":{},"row":0}}"#,
            1 + change.position / 4000,
            4 + change.position % 4000
        )
    } else {
        format!(
            r#"{{"connector":"postgresql","db":"shop","schema":"public","table":"customers","lsn":{}}}"#,
            change.position
        )
    };
    let envelope = format!(
        r#"{{"before":{},"after":{},"source":{source},"op":"{}","ts_ms":{}}}"#,
        image(&change.before),
        image(&change.after),
        change.op,
        1_700_000_000_000u64 + change.position
    );
    let key = change
        .id
        .map_or_else(String::new, |id| format!(r#"{{"id":{id}}}"#));
    if change.position % 16 == 0 {
        (
            format!(r#"{{"schema":{{"type":"struct","optional":false}},"payload":{key}}}"#),
            format!(r#"{{"schema":{ENVELOPE_SCHEMA},"payload":{envelope}}}"#),
        )
    } else {
        (key, envelope)
    }
}

/// The JsonConverter's schema of a customers change event (decimals as text, dates as days).
const ENVELOPE_SCHEMA: &str = r#"{"type":"struct","fields":[
{"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"},{"type":"string","optional":true,"field":"name"},{"type":"string","optional":true,"field":"region"},{"type":"string","optional":true,"field":"balance"},{"type":"int64","optional":true,"field":"visits"},{"type":"int32","optional":true,"name":"io.debezium.time.Date","version":1,"field":"signup"}],"optional":true,"name":"shop.customers.Value","field":"before"},
{"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"},{"type":"string","optional":true,"field":"name"},{"type":"string","optional":true,"field":"region"},{"type":"string","optional":true,"field":"balance"},{"type":"int64","optional":true,"field":"visits"},{"type":"int32","optional":true,"name":"io.debezium.time.Date","version":1,"field":"signup"}],"optional":true,"name":"shop.customers.Value","field":"after"},
{"type":"struct","fields":[{"type":"string","optional":false,"field":"connector"}],"optional":false,"name":"io.debezium.connector.Source","field":"source"},
{"type":"string","optional":false,"field":"op"},{"type":"int64","optional":true,"field":"ts_ms"}],
"optional":false,"name":"shop.customers.Envelope"}"#;

/// Sends the changes, partitioned by key, each delete followed by its tombstone; then sends
/// `late` of them again (duplicates arriving after newer changes of their keys).
async fn deliver(
    broker: &Broker,
    topic: &str,
    changes: &[SourceChange],
    mysql: bool,
    late: usize,
    rng: &mut Rng,
) {
    for change in changes {
        send_change(broker, topic, change, mysql).await;
    }
    for _ in 0..late {
        let change = &changes[rng.below(changes.len() as u64) as usize];
        send_change(broker, topic, change, mysql).await;
    }
}

async fn send_change(broker: &Broker, topic: &str, change: &SourceChange, mysql: bool) {
    let (key, value) = debezium_message(change, mysql);
    let partition = change
        .id
        .map_or(0, |id| (id % i64::from(PARTITIONS)) as i32);
    broker
        .send(topic, partition, &key, Some(&value))
        .await
        .expect("produce");
    if change.op == "d" {
        broker
            .send(topic, partition, &key, None)
            .await
            .expect("tombstone");
    }
}

/// Silver SCD1 rows by id: (customer, sequence).
fn scd1_rows(
    batches: &[arrow::record_batch::RecordBatch],
) -> std::collections::BTreeMap<i64, (Customer, String)> {
    let mut rows = std::collections::BTreeMap::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let id = values::int(b, "id", r);
            let customer = customer_at(b, r);
            let key = values::string(b, "__key", r).expect("__key");
            assert_eq!(key, format!(r#"{{"id":{id}}}"#));
            let seq = values::string(b, "__sequence", r).expect("__sequence");
            assert!(
                rows.insert(id, (customer, seq)).is_none(),
                "id {id} twice in silver"
            );
        }
    }
    rows
}

fn customer_at(b: &arrow::record_batch::RecordBatch, r: usize) -> Customer {
    use arrow::array::AsArray as _;
    let signup = b
        .column_by_name("signup")
        .expect("signup")
        .as_primitive::<arrow::datatypes::Date32Type>()
        .value(r);
    Customer {
        name: values::string(b, "name", r).expect("name"),
        region: values::string(b, "region", r).expect("region"),
        balance_cents: values::decimal(b, "balance", r, 2) as i64,
        visits: values::int(b, "visits", r),
        signup_days: signup,
    }
}

/// The SCD2 history the changes imply: per id, (customer, start, end) with a new version only
/// when name, region or balance change.
fn expected_history(
    changes: &[SourceChange],
) -> std::collections::BTreeSet<(i64, Customer, u64, Option<u64>)> {
    let mut open: std::collections::BTreeMap<i64, (Customer, u64)> = Default::default();
    let mut history = std::collections::BTreeSet::new();
    for c in changes {
        let Some(id) = c.id else { continue };
        let current = open.remove(&id);
        match (&c.after, current) {
            (Some(after), Some((row, start)))
                if (&row.name, &row.region, row.balance_cents)
                    == (&after.name, &after.region, after.balance_cents) =>
            {
                open.insert(id, (after.clone(), start));
            }
            (Some(after), current) => {
                if let Some((row, start)) = current {
                    history.insert((id, row, start, Some(c.position)));
                }
                open.insert(id, (after.clone(), c.position));
            }
            (None, Some((row, start))) => {
                history.insert((id, row, start, Some(c.position)));
            }
            (None, None) => {}
        }
    }
    for (id, (row, start)) in open {
        history.insert((id, row, start, None));
    }
    history
}

fn apply_spec(bootstrap: &str, schema: &str) -> String {
    format!(
        r#"
name: cdc_apply
sources:
  - name: customers_pg
    format: kafka-debezium
    kafka: {{ brokers: "{bootstrap}", topics: [pg.public.customers], max_batch_rows: 1000, idle_ms: 1500 }}
  - name: customers_my
    format: kafka-debezium
    kafka: {{ brokers: "{bootstrap}", topics: [my.shop.customers], max_batch_rows: 1000, idle_ms: 1500 }}
silver:
{}{}{}gold:
  - name: balance_by_region
    sql: SELECT region, COUNT(*) AS customers, SUM(balance) AS balance FROM customers GROUP BY region
    warehouse: {{ table: {schema}.balance_by_region, mode: merge, keys: [region] }}
  - name: by_signup
    from: silver.customers
    group_by: [signup]
    aggregations:
      - {{ name: customers, expr: "COUNT(*)" }}
      - {{ name: balance, expr: "SUM(balance)" }}
      - {{ name: most_visits, expr: "MAX(visits)" }}
    warehouse: {{ table: {schema}.by_signup, mode: merge, keys: [signup] }}
warehouse:
  postgres: {{ url_env: MEDALLION_WAREHOUSE_URL }}
"#,
        untyped_customers_silver(
            "customers",
            "bronze.customers_pg",
            "stored_as: scd1, buckets: 8"
        ),
        customers_silver(
            "customers_history",
            "bronze.customers_pg",
            "stored_as: scd2, track_history_on: [name, region, balance]"
        ),
        customers_silver("customers_mysql", "bronze.customers_my", "stored_as: scd1"),
    )
}

/// A silver entry applying a customers change source with `apply` (the inside of the
/// `apply_changes` block).
fn customers_silver(name: &str, from: &str, apply: &str) -> String {
    format!(
        r#"  - name: {name}
    from: {from}
    apply_changes: {{ {apply} }}
    columns:
      - {{ name: id, type: int64 }}
      - {{ name: name, type: string }}
      - {{ name: region, type: string }}
      - {{ name: balance, type: "decimal(12,2)" }}
      - {{ name: visits, type: int64 }}
      - {{ name: signup, type: date }}
"#
    )
}

/// Like [`customers_silver`], with `visits` and `signup` typed by the Debezium schema that
/// every 16th message carries.
fn untyped_customers_silver(name: &str, from: &str, apply: &str) -> String {
    customers_silver(name, from, apply)
        .replace("{ name: visits, type: int64 }", "{ name: visits }")
        .replace("{ name: signup, type: date }", "{ name: signup }")
}

/// Checks every silver table and the warehouse against the source tables' states.
async fn assert_applied(
    cluster: &Cluster,
    pg_state: &std::collections::BTreeMap<i64, Customer>,
    pg_changes: &[SourceChange],
    my_state: &std::collections::BTreeMap<i64, Customer>,
    schema: &str,
) {
    let silver = scd1_rows(&cluster.read("silver.customers").await.expect("read silver"));
    let got: std::collections::BTreeMap<i64, Customer> =
        silver.iter().map(|(id, (c, _))| (*id, c.clone())).collect();
    assert_eq!(
        &got, pg_state,
        "silver.customers differs from the source table"
    );
    // Each row carries the position of the last change of its key.
    for (id, (_, seq)) in &silver {
        let last = pg_changes
            .iter()
            .rev()
            .find(|c| c.id == Some(*id))
            .expect("a change of the key");
        assert_eq!(
            seq.parse::<u64>().expect("numeric LSN sequence"),
            last.position
        );
    }
    let mysql = scd1_rows(&cluster.read("silver.customers_mysql").await.expect("read"));
    let got: std::collections::BTreeMap<i64, Customer> =
        mysql.into_iter().map(|(id, (c, _))| (id, c)).collect();
    assert_eq!(
        &got, my_state,
        "silver.customers_mysql differs from the source table"
    );

    let mut history = std::collections::BTreeSet::new();
    for b in cluster
        .read("silver.customers_history")
        .await
        .expect("read history")
    {
        for r in 0..b.num_rows() {
            let position = |name: &str| {
                values::string(&b, name, r).map(|s| s.parse::<u64>().expect("numeric sequence"))
            };
            history.insert((
                values::int(&b, "id", r),
                customer_at(&b, r),
                position("__start_at").expect("__start_at"),
                position("__end_at"),
            ));
        }
    }
    let expected = expected_history(pg_changes);
    assert_eq!(history.len(), expected.len(), "SCD2 version count");
    assert_eq!(history, expected, "SCD2 history differs");

    let (client, connection) =
        tokio_postgres::connect(&medallion_tests::postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let rows = client
        .query(
            &format!(r#"SELECT region, customers, (balance * 100)::bigint FROM "{schema}".balance_by_region"#),
            &[],
        )
        .await
        .expect("query warehouse");
    let got: std::collections::BTreeMap<String, (i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, i64>(1), r.get::<_, i64>(2)),
            )
        })
        .collect();
    let mut want: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    for c in pg_state.values() {
        let e = want.entry(c.region.clone()).or_default();
        e.0 += 1;
        e.1 += c.balance_cents;
    }
    assert_eq!(got, want, "warehouse gold differs");

    // The group-by gold table, recomputed whole or for the touched groups only.
    let rows = client
        .query(
            &format!(
                r#"SELECT signup - DATE '1970-01-01', customers, (balance * 100)::bigint, most_visits FROM "{schema}".by_signup"#
            ),
            &[],
        )
        .await
        .expect("query warehouse");
    let got: std::collections::BTreeMap<i32, (i64, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i32>(0),
                (r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, i64>(3)),
            )
        })
        .collect();
    let want = by_signup(pg_state);
    assert_eq!(got, want, "warehouse by_signup differs");
    let gold = cluster.read("gold.by_signup").await.expect("read gold");
    assert_eq!(values::rows(&gold), want.len(), "gold.by_signup rows");
}

/// Customers, balance in cents and most visits per signup day.
fn by_signup(
    state: &std::collections::BTreeMap<i64, Customer>,
) -> std::collections::BTreeMap<i32, (i64, i64, i64)> {
    let mut want: std::collections::BTreeMap<i32, (i64, i64, i64)> = Default::default();
    for c in state.values() {
        let e = want.entry(c.signup_days).or_default();
        e.0 += 1;
        e.1 += c.balance_cents;
        e.2 = e.2.max(c.visits);
    }
    want
}

/// What the last commit of a gold table recorded for the warehouse: the rows of its hidden
/// upsert and delete files, and the version those changes apply to (`None` if it has none,
/// i.e. the table was recomputed whole).
async fn gold_changes(cluster: &Cluster, table: &str) -> (i64, Option<(usize, usize, i64)>) {
    let snapshot = snapshot(cluster, medallion_lake::Layer::Gold, table).await;
    let rows = |kind: &str| -> usize {
        snapshot
            .hidden
            .iter()
            .filter(|f| f.tags.get("medallion.change").is_some_and(|k| k == kind))
            .map(|f| f.rows.unwrap_or(0) as usize)
            .sum()
    };
    let base = snapshot
        .hidden
        .iter()
        .find_map(|f| f.tags.get("medallion.change_base"))
        .map(|b| b.parse::<i64>().expect("numeric base"));
    (
        snapshot.version,
        base.map(|b| (rows("upserts"), rows("deletes"), b)),
    )
}

/// The current version of a table, read straight from the lake.
async fn snapshot(
    cluster: &Cluster,
    layer: medallion_lake::Layer,
    table: &str,
) -> medallion_lake::TableSnapshot {
    medallion_lake::Lake::open(
        &cluster.lake_dir().display().to_string(),
        Default::default(),
    )
    .expect("lake")
    .snapshot(layer, table, None)
    .await
    .expect("snapshot")
    .expect("table exists")
}

/// Files of a silver table: path -> (bucket, hidden).
async fn silver_files(
    cluster: &Cluster,
    table: &str,
) -> std::collections::BTreeMap<String, String> {
    let snapshot = snapshot(cluster, medallion_lake::Layer::Silver, table).await;
    snapshot
        .files
        .iter()
        .chain(&snapshot.hidden)
        .map(|f| {
            (
                f.path.clone(),
                f.tags.get("medallion.bucket").cloned().expect("bucket tag"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_changes_apply_to_silver_scd1_scd2_and_gold_in_postgres() {
    let broker = Broker::start().await.expect("broker");
    broker
        .create_topic("pg.public.customers", PARTITIONS)
        .await
        .expect("topic");
    broker
        .create_topic("my.shop.customers", PARTITIONS)
        .await
        .expect("topic");
    let cluster = Cluster::start(Some(medallion_tests::postgres_url()))
        .await
        .expect("cluster");
    let schema = medallion_tests::unique_name("cdc");
    cluster
        .apply(&apply_spec(&broker.bootstrap, &schema))
        .await
        .expect("apply");

    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let (mut pg_state, mut my_state) = (Default::default(), Default::default());
    let (mut pg_position, mut my_position) = (1000u64, 1000u64);
    let mut pg_changes = generate(&mut rng, &mut pg_state, &mut pg_position, 2500, 300);
    let my_changes = generate(&mut rng, &mut my_state, &mut my_position, 1500, 200);
    deliver(
        &broker,
        "pg.public.customers",
        &pg_changes,
        false,
        200,
        &mut rng,
    )
    .await;
    deliver(
        &broker,
        "my.shop.customers",
        &my_changes,
        true,
        100,
        &mut rng,
    )
    .await;
    // Malformed: bad JSON, no op, an unknown op (kept by the ingestor with the error), and a
    // row image that does not fit the declared types (found by the refiner).
    for bad in [
        "{not json".to_string(),
        r#"{"after":{"id":1},"source":{"connector":"postgresql","lsn":5}}"#.to_string(),
        r#"{"after":{"id":1},"op":"x","source":{"connector":"postgresql","lsn":5}}"#.to_string(),
        r#"{"before":null,"after":{"id":999999,"name":"x","region":"north","balance":"lots","visits":0,"signup":1},"source":{"connector":"postgresql","lsn":7},"op":"c"}"#.to_string(),
    ] {
        broker
            .send("pg.public.customers", 0, r#"{"id":999999}"#, Some(&bad))
            .await
            .expect("produce");
    }
    let (run, _) = cluster.run("cdc_apply", false).await.expect("run 1");
    assert!(succeeded(&run), "{run:?}");
    assert_applied(&cluster, &pg_state, &pg_changes, &my_state, &schema).await;
    // Types not declared came from the Debezium schema of the events.
    let silver = cluster.read("silver.customers").await.expect("read silver");
    let silver_schema = silver.first().expect("rows").schema();
    let type_of = |c: &str| {
        silver_schema
            .field_with_name(c)
            .expect(c)
            .data_type()
            .clone()
    };
    assert_eq!(type_of("signup"), arrow::datatypes::DataType::Date32);
    assert_eq!(type_of("visits"), arrow::datatypes::DataType::Int64);
    let dead = cluster
        .read("quarantine.customers")
        .await
        .expect("dead letters");
    assert_eq!(values::rows(&dead), 4, "dead letters");
    let errors: Vec<String> = dead
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| values::string(b, "_error", r).expect("error"))
        })
        .collect();
    assert!(errors.iter().any(|e| e.contains("not JSON")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("balance")), "{errors:?}");

    // More changes, late duplicates, and a truncate of the MySQL table in the middle.
    let more = generate(&mut rng, &mut pg_state, &mut pg_position, 2500, 300);
    deliver(&broker, "pg.public.customers", &more, false, 300, &mut rng).await;
    pg_changes.extend(more);
    let before_truncate = generate(&mut rng, &mut my_state, &mut my_position, 300, 200);
    my_position += 8;
    let truncate = SourceChange {
        position: my_position,
        id: None,
        op: "t",
        before: None,
        after: None,
    };
    my_state.clear();
    let after_truncate = generate(&mut rng, &mut my_state, &mut my_position, 400, 200);
    let mut my_round = before_truncate;
    my_round.push(truncate);
    my_round.extend(after_truncate);
    deliver(&broker, "my.shop.customers", &my_round, true, 0, &mut rng).await;
    let (run, _) = cluster.run("cdc_apply", false).await.expect("run 2");
    assert!(succeeded(&run), "{run:?}");
    assert_applied(&cluster, &pg_state, &pg_changes, &my_state, &schema).await;

    // Nothing new: silver commits nothing.
    let (run, _) = cluster.run("cdc_apply", false).await.expect("run 3");
    assert!(succeeded(&run), "{run:?}");
    assert!(
        !task(&run, "silver.customers")
            .manifest
            .as_ref()
            .expect("m")
            .committed
    );

    // A one-row change rewrites only the files of its key's bucket.
    let files_before = silver_files(&cluster, "customers").await;
    let one = generate(&mut rng, &mut pg_state, &mut pg_position, 1, 300);
    deliver(&broker, "pg.public.customers", &one, false, 0, &mut rng).await;
    pg_changes.extend(one);
    let (run, _) = cluster.run("cdc_apply", false).await.expect("run 4");
    assert!(succeeded(&run), "{run:?}");
    let files_after = silver_files(&cluster, "customers").await;
    let changed: BTreeSet<&String> = files_before
        .iter()
        .filter(|(path, _)| !files_after.contains_key(*path))
        .chain(
            files_after
                .iter()
                .filter(|(path, _)| !files_before.contains_key(*path)),
        )
        .map(|(_, bucket)| bucket)
        .collect();
    assert_eq!(
        changed.len(),
        1,
        "buckets rewritten by a one-row change: {changed:?}"
    );
    let buckets: BTreeSet<&String> = files_after.values().collect();
    assert!(
        buckets.len() > 4,
        "keys spread over the buckets: {buckets:?}"
    );
    assert_applied(&cluster, &pg_state, &pg_changes, &my_state, &schema).await;

    // Three changes touching three signup days: the only customer of one day deleted (its
    // group vanishes), a customer of a new day inserted, another's balance updated. Gold
    // recomputes those groups alone and the warehouse gets just them.
    let (gold_before, _) = gold_changes(&cluster, "by_signup").await;
    let days = by_signup(&pg_state);
    let (&lone_id, lone) = pg_state
        .iter()
        .find(|(_, c)| days[&c.signup_days].0 == 1)
        .expect("a signup day with one customer");
    let lone = lone.clone();
    let (&other_id, other) = pg_state
        .iter()
        .find(|(_, c)| c.signup_days != lone.signup_days)
        .expect("another customer");
    let other = other.clone();
    let newcomer = Customer {
        name: "newcomer".into(),
        region: "north".into(),
        balance_cents: 12_345,
        visits: 3,
        signup_days: 30_000,
    };
    let mut round = Vec::new();
    for (id, op, before, after) in [
        (lone_id, "d", Some(lone), None),
        (
            other_id,
            "u",
            Some(other.clone()),
            Some(Customer {
                balance_cents: other.balance_cents + 100,
                ..other
            }),
        ),
        (5_000, "c", None, Some(newcomer)),
    ] {
        pg_position += 8;
        match &after {
            Some(row) => pg_state.insert(id, row.clone()),
            None => pg_state.remove(&id),
        };
        round.push(SourceChange {
            position: pg_position,
            id: Some(id),
            op,
            before,
            after,
        });
    }
    deliver(&broker, "pg.public.customers", &round, false, 0, &mut rng).await;
    pg_changes.extend(round);
    let (run, _) = cluster.run("cdc_apply", false).await.expect("run 5");
    assert!(succeeded(&run), "{run:?}");
    assert_applied(&cluster, &pg_state, &pg_changes, &my_state, &schema).await;
    let (gold_after, changes) = gold_changes(&cluster, "by_signup").await;
    assert_eq!(
        changes,
        Some((2, 1, gold_before)),
        "gold.by_signup version {gold_after}: recomputed 2 groups, 1 vanished, over version {gold_before}"
    );
    let (client, connection) =
        tokio_postgres::connect(&medallion_tests::postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let loaded: i64 = client
        .query_one(
            &format!(
                r#"SELECT version FROM "{schema}".medallion_loads WHERE target = 'by_signup'"#
            ),
            &[],
        )
        .await
        .expect("loaded version")
        .get(0);
    assert_eq!(loaded, gold_after, "the warehouse holds the gold version");
}

/// The pipeline as `GetPipeline` reports it.
async fn pipeline(cluster: &Cluster, name: &str) -> medallion_proto::v1::Pipeline {
    cluster
        .client()
        .await
        .expect("client")
        .get_pipeline(medallion_proto::v1::GetPipelineRequest { name: name.into() })
        .await
        .expect("get pipeline")
        .into_inner()
}

/// Waits until silver.customers equals `state` (the streaming runs apply on their own).
async fn wait_for_silver(cluster: &Cluster, state: &std::collections::BTreeMap<i64, Customer>) {
    let mut last = None;
    for _ in 0..240 {
        if let Ok(batches) = cluster.read("silver.customers").await {
            let got: std::collections::BTreeMap<i64, Customer> = scd1_rows(&batches)
                .into_iter()
                .map(|(id, (c, _))| (id, c))
                .collect();
            if &got == state {
                return;
            }
            last = Some(got.len());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let log = cluster.replica_log(Service::Ingestor, 0);
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "silver never caught up with the source (last saw {last:?} rows); the ingestor's log ends:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_pipeline_applies_changes_on_its_own_pauses_and_survives_a_broker_restart() {
    let mut broker = Broker::start().await.expect("broker");
    broker
        .create_topic("pg.public.customers", PARTITIONS)
        .await
        .expect("topic");
    let cluster = Cluster::start(None).await.expect("cluster");
    let spec = format!(
        r#"
name: stream
mode: streaming
sources:
  - name: customers_pg
    format: kafka-debezium
    kafka: {{ brokers: "{}", topics: [pg.public.customers], idle_ms: 300, max_task_ms: 500 }}
silver:
{}gold:
  - name: by_region
    sql: SELECT region, COUNT(*) AS customers FROM customers GROUP BY region
"#,
        broker.bootstrap,
        customers_silver("customers", "bronze.customers_pg", "stored_as: scd1")
    );
    cluster.apply(&spec).await.expect("apply");
    let mut rng = Rng(42);
    let mut state = Default::default();
    let mut position = 1000u64;
    let changes = generate(&mut rng, &mut state, &mut position, 600, 100);
    deliver(
        &broker,
        "pg.public.customers",
        &changes,
        false,
        50,
        &mut rng,
    )
    .await;
    wait_for_silver(&cluster, &state).await;

    let p = pipeline(&cluster, "stream").await;
    assert_eq!(p.mode, "streaming");
    let fresh: BTreeSet<String> = p
        .freshness
        .iter()
        .filter_map(|f| f.table.as_ref().map(medallion_tests::table_name))
        .collect();
    assert_eq!(
        fresh,
        BTreeSet::from([
            "bronze.customers_pg".into(),
            "silver.customers".into(),
            "gold.by_region".into()
        ])
    );
    let bronze = p
        .freshness
        .iter()
        .find(|f| {
            f.table.as_ref().map(medallion_tests::table_name).as_deref()
                == Some("bronze.customers_pg")
        })
        .expect("bronze freshness");
    assert!(bronze.source_lag >= 0, "the ingestor reports the Kafka lag");
    assert!(bronze.committed_at_ms > 0 && bronze.age_ms >= 0);

    // Paused: once the run in progress ends, no run starts and new changes wait.
    let mut client = cluster.client().await.expect("client");
    let paused = client
        .set_pipeline_paused(medallion_proto::v1::SetPipelinePausedRequest {
            name: "stream".into(),
            paused: true,
        })
        .await
        .expect("pause")
        .into_inner();
    assert!(paused.paused);
    for _ in 0..120 {
        if pipeline(&cluster, "stream").await.active_run_id.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let silver_version = |p: &medallion_proto::v1::Pipeline| {
        p.freshness
            .iter()
            .find(|f| {
                f.table.as_ref().map(medallion_tests::table_name).as_deref()
                    == Some("silver.customers")
            })
            .map(|f| f.version)
    };
    let before = silver_version(&pipeline(&cluster, "stream").await);
    let more = generate(&mut rng, &mut state, &mut position, 200, 100);
    deliver(&broker, "pg.public.customers", &more, false, 0, &mut rng).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let p = pipeline(&cluster, "stream").await;
    assert!(
        p.active_run_id.is_empty(),
        "a paused pipeline started a run"
    );
    assert_eq!(silver_version(&p), before);

    client
        .set_pipeline_paused(medallion_proto::v1::SetPipelinePausedRequest {
            name: "stream".into(),
            paused: false,
        })
        .await
        .expect("resume");
    wait_for_silver(&cluster, &state).await;

    // The broker dies and comes back: the stream resumes on its own, every message once.
    broker
        .restart(std::time::Duration::from_secs(2))
        .await
        .expect("restart broker");
    let after = generate(&mut rng, &mut state, &mut position, 300, 100);
    deliver(&broker, "pg.public.customers", &after, false, 0, &mut rng).await;
    wait_for_silver(&cluster, &state).await;
    let (messages, _) = bronze_rows(&cluster, "bronze.customers_pg").await;
    // Every change once, plus the 50 re-sent ones; tombstones are not rows.
    assert_eq!(
        messages.len(),
        changes.len() + 50 + more.len() + after.len()
    );
}

/// Two ingestor replicas are members of the source's consumer group and split its partitions.
/// One is killed in the middle of a run and restarted: it comes back under its own identity in
/// the group, starts its partitions at the offsets bronze holds, and nothing is lost or lands
/// twice. A full refresh while both members run resets bronze, and both members read their
/// partitions again from the beginning: every message once.
#[tokio::test(flavor = "multi_thread")]
async fn two_ingestor_replicas_share_the_partitions_and_survive_a_crash_and_a_refresh() {
    let broker = Broker::start().await.expect("broker");
    broker
        .create_topic("pg.public.customers", PARTITIONS)
        .await
        .expect("topic");
    let mut cluster = Cluster::start_with(medallion_tests::ClusterOptions {
        ingestors: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let spec = format!(
        r#"
name: shared
sources:
  - name: customers_pg
    format: kafka-debezium
    kafka: {{ brokers: "{}", topics: [pg.public.customers], idle_ms: 1000, max_batch_rows: 100 }}
silver:
{}"#,
        broker.bootstrap,
        customers_silver("customers", "bronze.customers_pg", "stored_as: scd1")
    );
    cluster.apply(&spec).await.expect("apply");
    let lake = medallion_lake::Lake::open(
        &cluster.lake_dir().display().to_string(),
        Default::default(),
    )
    .expect("lake");
    let mut rng = Rng(7);
    let mut state = Default::default();
    let mut position = 1000u64;
    let mut sent = 0;
    for round in 0..3 {
        let changes = generate(&mut rng, &mut state, &mut position, 800, 150);
        deliver(
            &broker,
            "pg.public.customers",
            &changes,
            false,
            40,
            &mut rng,
        )
        .await;
        sent += changes.len() + 40;
        if round == 1 {
            // Replica 1 is killed once bronze has taken a micro-batch of this round (it may
            // hold rows read but not committed), and restarted.
            let before = lake
                .snapshot(medallion_lake::Layer::Bronze, "customers_pg", None)
                .await
                .expect("snapshot")
                .map_or(-1, |s| s.version);
            let (run_id, _) = cluster.start_run("shared").await.expect("start run");
            for _ in 0..400 {
                let now = lake
                    .snapshot(medallion_lake::Layer::Bronze, "customers_pg", None)
                    .await
                    .expect("snapshot")
                    .map_or(-1, |s| s.version);
                if now > before {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            cluster.kill_replica(Service::Ingestor, 1).await;
            cluster
                .restart_replica(Service::Ingestor, 1)
                .await
                .expect("restart replica 1");
            // The run may fail (its call to replica 1 broke) or succeed after a retry.
            let _ = cluster.follow(&run_id).await;
        }
        // A full refresh in the last round, while both members are in the group.
        let (run, _) = cluster.run("shared", round == 2).await.expect("run");
        assert!(succeeded(&run), "round {round}: {run:?}");
        // (Reading bronze fails the test on any message that landed twice.)
        let (messages, _) = bronze_rows(&cluster, "bronze.customers_pg").await;
        assert_eq!(messages.len(), sent, "round {round}: messages lost");
        let got: std::collections::BTreeMap<i64, Customer> =
            scd1_rows(&cluster.read("silver.customers").await.expect("read"))
                .into_iter()
                .map(|(id, (c, _))| (id, c))
                .collect();
        assert_eq!(got, state, "round {round}");
        // Each replica holds a share of the partitions (replica 1 again after its restart).
        for r in 0..2 {
            let log = cluster.replica_log(Service::Ingestor, r);
            let last = log
                .lines()
                .filter(|l| l.contains("partitions assigned"))
                .next_back();
            assert!(
                last.is_some_and(|l| !l.contains("partitions=0 ")),
                "round {round}: replica {r} holds no partition:\n{log}"
            );
        }
    }
    // Both members keep reading after the refresh: one more round, every message once.
    let changes = generate(&mut rng, &mut state, &mut position, 300, 150);
    deliver(&broker, "pg.public.customers", &changes, false, 0, &mut rng).await;
    sent += changes.len();
    let (run, _) = cluster.run("shared", false).await.expect("run");
    assert!(succeeded(&run), "after the refresh: {run:?}");
    let (messages, _) = bronze_rows(&cluster, "bronze.customers_pg").await;
    assert_eq!(messages.len(), sent, "after the refresh: messages lost");
    let got: std::collections::BTreeMap<i64, Customer> =
        scd1_rows(&cluster.read("silver.customers").await.expect("read"))
            .into_iter()
            .map(|(id, (c, _))| (id, c))
            .collect();
    assert_eq!(got, state, "after the refresh");
}
