//! The cloud path on real local servers: the lake and the sources on an S3-compatible server
//! (moto), gold loaded into "Redshift" through the Redshift Data API (the local endpoint on
//! PostgreSQL, reached by the real aws-sdk-redshiftdata client).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use medallion_lake::{CommitOutcome, CommitSpec, Lake, Layer, WriteMode};
use medallion_tests::reference::{assert_gold_matches, assert_warehouse_matches};
use medallion_tests::s3::{RedshiftDataLocal, S3Server};
use medallion_tests::{Cluster, ClusterOptions, succeeded, task, unique_name, values};

const REDSHIFT_WAREHOUSE: &str = "warehouse:
  redshift:
    cluster_id: local-cluster
    database: dev
    db_user: medallion
    iam_role: arn:aws:iam::000000000000:role/medallion-copy
    staging: s3://stage/medallion/
";

/// A cluster whose services use `s3` (lake at `s3://lake/<prefix>`) and, when given, the
/// local Redshift Data API endpoint.
async fn cloud_cluster(
    s3: &S3Server,
    redshift: Option<&RedshiftDataLocal>,
    prefix: &str,
) -> Cluster {
    let mut env = s3.env();
    if let Some(redshift) = redshift {
        env.push((
            "MEDALLION_REDSHIFT_DATA_ENDPOINT".into(),
            redshift.endpoint.clone(),
        ));
    }
    Cluster::start_with(ClusterOptions {
        lake: Some(format!("s3://lake/{prefix}")),
        env,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster")
}

/// An S3 server with buckets `lake`, `raw` and `stage`, and the Redshift endpoint on it (its
/// log in the returned folder).
async fn s3_and_redshift() -> (S3Server, RedshiftDataLocal, tempfile::TempDir) {
    let s3 = S3Server::start().await.expect("S3 server");
    for bucket in ["lake", "raw", "stage"] {
        s3.create_bucket(bucket).await.expect("bucket");
    }
    let logs = tempfile::tempdir().expect("tempdir");
    let redshift = RedshiftDataLocal::start(&s3, &logs.path().join("redshift.log"))
        .await
        .expect("redshift endpoint");
    (s3, redshift, logs)
}

async fn upload_dir(s3: &S3Server, local: &Path, bucket: &str, prefix: &str) {
    for entry in walk(local) {
        let relative = entry
            .strip_prefix(local)
            .expect("under the folder")
            .to_string_lossy()
            .replace('\\', "/");
        s3.put_file(bucket, &format!("{prefix}{relative}"), &entry)
            .await
            .expect("upload");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn tpch_on_the_s3_lake_loads_redshift_with_the_same_gold() {
    let (s3, redshift, _logs) = s3_and_redshift().await;
    let cluster = cloud_cluster(&s3, Some(&redshift), "tpch").await;

    let generated = cluster.dir.path().join("generated");
    Cluster::gen_tpch(&generated, 0.01, 2)
        .await
        .expect("generate TPC-H");
    let data = generated.join("data");
    upload_dir(&s3, &data, "raw", "tpch/").await;

    let schema = unique_name("tpch_rs");
    let spec =
        std::fs::read_to_string(medallion_tests::workspace_root().join("examples/tpch.yaml"))
            .expect("examples/tpch.yaml")
            .replace("medallion_tpch.", &format!("{schema}."))
            .replace("path: data/", "path: s3://raw/tpch/");
    let spec = format!(
        "{}{REDSHIFT_WAREHOUSE}",
        &spec[..spec.find("warehouse:\n").expect("warehouse section")]
    );
    cluster.apply(&spec).await.expect("apply");
    let (run, _) = cluster.run("tpch", false).await.expect("run");
    assert!(succeeded(&run), "run failed: {run:?}");

    // The same answers as the local-folder run: both are checked against the reference.
    assert_gold_matches(&cluster, &data).await;
    // Every layer is on S3, as Delta tables.
    for table in ["bronze/lineitem", "silver/lineitem", "gold/pricing_summary"] {
        let log = s3
            .keys("lake", &format!("tpch/{table}/_delta_log/"))
            .await
            .expect("list");
        assert!(!log.is_empty(), "no Delta log for {table} on S3");
    }
    // Bronze remembers each object by URL and ETag.
    let bronze = cluster.read("bronze.lineitem").await.expect("bronze");
    let file = values::string(&bronze[0], "_source_file", 0).expect("lineage");
    assert!(file.starts_with("s3://raw/tpch/lineitem/"), "{file}");
    // The staged Parquet files are gone after the load.
    let staged = s3.keys("stage", "medallion/").await.expect("list staging");
    assert!(staged.is_empty(), "staged files left behind: {staged:?}");
    assert_warehouse_matches(&cluster, &schema).await;
}

const INCREMENTAL: &str = r#"
name: landing
sources:
  - { name: events, format: csv, path: "s3://raw/events/*.csv" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn s3_sources_ingest_only_new_and_rewritten_objects() {
    let s3 = S3Server::start().await.expect("S3 server");
    for bucket in ["lake", "raw"] {
        s3.create_bucket(bucket).await.expect("bucket");
    }
    let cluster = cloud_cluster(&s3, None, "incremental").await;
    s3.put("raw", "events/a.csv", b"id,kind\n1,x\n2,y\n".to_vec())
        .await
        .expect("put");
    s3.put("raw", "events/b.csv", b"id,kind\n3,z\n".to_vec())
        .await
        .expect("put");
    // Not matched by the glob: ignored.
    s3.put("raw", "events/readme.txt", b"not data".to_vec())
        .await
        .expect("put");
    cluster.apply(INCREMENTAL).await.expect("apply");

    let (run, _) = cluster.run("landing", false).await.expect("run 1");
    assert!(succeeded(&run), "{run:?}");
    let m = task(&run, "bronze.events")
        .manifest
        .clone()
        .expect("manifest");
    assert_eq!(m.rows_written, 3);
    assert_eq!(
        m.source_files,
        ["s3://raw/events/a.csv", "s3://raw/events/b.csv"]
    );

    // Nothing new: nothing committed.
    let (run, _) = cluster.run("landing", false).await.expect("run 2");
    let m = task(&run, "bronze.events")
        .manifest
        .clone()
        .expect("manifest");
    assert!(!m.committed, "a run without new objects committed");

    // One new object and one rewritten object (new ETag): only they are read, and the
    // rewritten object's old rows are replaced.
    s3.put("raw", "events/c.csv", b"id,kind\n4,w\n".to_vec())
        .await
        .expect("put");
    s3.put("raw", "events/a.csv", b"id,kind\n1,x2\n".to_vec())
        .await
        .expect("put");
    let (run, _) = cluster.run("landing", false).await.expect("run 3");
    assert!(succeeded(&run), "{run:?}");
    let m = task(&run, "bronze.events")
        .manifest
        .clone()
        .expect("manifest");
    assert!(m.committed);
    assert_eq!(
        m.source_files,
        ["s3://raw/events/a.csv", "s3://raw/events/c.csv"]
    );
    let batches = cluster.read("bronze.events").await.expect("read");
    let mut rows = Vec::new();
    for b in &batches {
        for r in 0..b.num_rows() {
            rows.push((
                values::string(b, "id", r).expect("id"),
                values::string(b, "kind", r).expect("kind"),
            ));
        }
    }
    rows.sort();
    let want: Vec<(String, String)> = [("1", "x2"), ("3", "z"), ("4", "w")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(rows, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_to_one_s3_table_never_both_take_a_version() {
    let s3 = S3Server::start().await.expect("S3 server");
    s3.create_bucket("lake").await.expect("bucket");
    let lake = Lake::open("s3://lake/race", s3.storage_options()).expect("lake");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("writer", DataType::Utf8, false),
    ]));
    // Version 0 first, so the writers race for the versions after it.
    let mut first = lake
        .writer(Layer::Silver, "t", schema.clone())
        .await
        .expect("writer");
    first
        .write(batch(&schema, "setup", 0..1))
        .await
        .expect("write");
    first
        .commit(commit_spec(WriteMode::Overwrite, "setup"))
        .await
        .expect("commit");

    const WRITERS: i64 = 6;
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (lake, schema) = (lake.clone(), schema.clone());
        handles.push(tokio::spawn(async move {
            let name = format!("w{w}");
            let mut writer = lake.writer(Layer::Silver, "t", schema.clone()).await?;
            writer
                .write(batch(&schema, &name, (w * 100)..(w * 100 + 100)))
                .await?;
            writer.commit(commit_spec(WriteMode::Append, &name)).await
        }));
    }
    let mut versions = Vec::new();
    for handle in handles {
        match handle.await.expect("join").expect("commit") {
            CommitOutcome::Committed { version, .. } => versions.push(version),
            other => panic!("a writer did not commit: {other:?}"),
        }
    }
    versions.sort();
    // Every writer landed, each at its own version, none lost or doubled.
    assert_eq!(versions, (1..=WRITERS).collect::<Vec<_>>());
    let snapshot = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .expect("snapshot")
        .expect("table");
    assert_eq!(snapshot.version, WRITERS);
    assert_eq!(snapshot.total_rows(), Some(1 + WRITERS * 100));
    // The log holds exactly one entry per version.
    let entries = s3
        .keys("lake", "race/silver/t/_delta_log/")
        .await
        .expect("list");
    let commits = entries.iter().filter(|k| k.ends_with(".json")).count();
    assert_eq!(commits as i64, WRITERS + 1, "{entries:?}");
}

fn commit_spec(mode: WriteMode, app_id: &str) -> CommitSpec {
    CommitSpec {
        mode,
        app_id: app_id.to_string(),
        txn_version: 1,
        metadata: Default::default(),
        more_transactions: Vec::new(),
        expect_transactions: Vec::new(),
    }
}

fn batch(schema: &Arc<Schema>, writer: &str, ids: std::ops::Range<i64>) -> RecordBatch {
    let n = (ids.end - ids.start) as usize;
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(ids)),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                writer, n,
            ))),
        ],
    )
    .expect("batch")
}

#[tokio::test(flavor = "multi_thread")]
async fn cloud_failures_are_clear_and_commit_nothing() {
    let (s3, redshift, _logs) = s3_and_redshift().await;
    let cluster = cloud_cluster(&s3, Some(&redshift), "failures").await;

    // A source in a bucket that does not exist.
    cluster
        .apply(
            "name: missing\nsources:\n  - { name: gone, format: csv, path: \"s3://no-such-bucket/x/\" }\n",
        )
        .await
        .expect("apply");
    let (run, _) = cluster.run("missing", false).await.expect("run");
    assert!(!succeeded(&run));
    let error = &task(&run, "bronze.gone").error;
    assert!(
        error.contains("bucket `no-such-bucket` does not exist"),
        "{error}"
    );
    assert!(
        s3.keys("lake", "failures/bronze/gone/")
            .await
            .expect("list")
            .is_empty(),
        "something was written for a failed source"
    );

    // Redshift refuses the load: the target exists with other columns. Redshift's own error
    // text comes back, and the target keeps its rows.
    let schema = unique_name("rs_fail");
    let (client, connection) =
        tokio_postgres::connect(&medallion_tests::postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\"; CREATE TABLE \"{schema}\".totals (other integer); INSERT INTO \"{schema}\".totals VALUES (7);"
        ))
        .await
        .expect("prepare target");
    s3.put(
        "raw",
        "sales/a.csv",
        b"region,amount\neu,10\nus,5\neu,1\n".to_vec(),
    )
    .await
    .expect("put");
    let spec = format!(
        "name: sales
sources:
  - {{ name: sales, format: csv, path: \"s3://raw/sales/\" }}
silver:
  - name: sales
    from: bronze.sales
    columns:
      - {{ name: region, type: string }}
      - {{ name: amount, type: int64 }}
gold:
  - name: totals
    sql: SELECT region, sum(amount) AS amount FROM sales GROUP BY region
    warehouse: {{ table: {schema}.totals, mode: replace }}
{REDSHIFT_WAREHOUSE}"
    );
    cluster.apply(&spec).await.expect("apply");
    let (run, _) = cluster.run("sales", false).await.expect("run");
    assert!(!succeeded(&run));
    let error = &task(&run, "gold.totals").error;
    assert!(
        error.contains("redshift load of") && error.contains("ERROR:") && error.contains("column"),
        "{error}"
    );
    let kept: Vec<i32> = client
        .query(&format!("SELECT other FROM \"{schema}\".totals"), &[])
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, [7], "the failed load changed the target");
    assert!(
        s3.keys("stage", "medallion/")
            .await
            .expect("list")
            .is_empty(),
        "staged files left behind after a failed load"
    );
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_s3_credentials_fail_naming_the_object_and_commit_nothing() {
    // Requests 1-3 (readiness probe, bucket, object) are served without checking; from then
    // on credentials are checked, and the services' key is unknown to the server.
    let s3 = S3Server::start_checking_credentials_after(3)
        .await
        .expect("S3 server");
    s3.create_bucket("raw").await.expect("bucket");
    s3.put("raw", "in/a.csv", b"id\n1\n".to_vec())
        .await
        .expect("put");
    let cluster = Cluster::start_with(ClusterOptions {
        env: s3.env(),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    cluster
        .apply("name: denied\nsources:\n  - { name: a, format: csv, path: \"s3://raw/in/\" }\n")
        .await
        .expect("apply");
    let (run, _) = cluster.run("denied", false).await.expect("run");
    assert!(!succeeded(&run));
    let error = &task(&run, "bronze.a").error;
    assert!(
        error.contains("s3://raw/in/") && error.contains("InvalidAccessKeyId"),
        "{error}"
    );
    assert!(
        !error.contains(medallion_tests::s3::SECRET_KEY),
        "the secret key leaked into an error"
    );
    assert!(
        !cluster.lake_dir().join("bronze/a/_delta_log").exists(),
        "bronze.a was committed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_refuses_to_start_on_a_lake_in_a_missing_bucket() {
    let s3 = S3Server::start().await.expect("S3 server");
    let output =
        tokio::process::Command::new(medallion_tests::bin_dir().join("medallion-ingestor"))
            .args(["--listen", "127.0.0.1:0", "--lake", "s3://no-such-lake/x"])
            .envs(s3.env())
            .kill_on_drop(true)
            .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), output)
        .await
        .expect("the ingestor should exit, not serve")
        .expect("run the ingestor");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("s3://no-such-lake/x")
            && stderr.contains("bucket `no-such-lake` does not exist"),
        "{stderr}"
    );
}
