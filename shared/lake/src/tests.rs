#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array,
    Int64Array, StringArray, StringViewArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt as _;

use super::*;

fn lake() -> (tempfile::TempDir, Lake) {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path().join("lake").to_str().unwrap(), HashMap::new()).unwrap();
    (dir, lake)
}

fn spec(mode: WriteMode, app_id: &str, txn_version: i64) -> CommitSpec {
    let mut metadata = serde_json::Map::new();
    metadata.insert("run_id".into(), serde_json::json!("run-1"));
    CommitSpec {
        mode,
        app_id: app_id.into(),
        txn_version,
        metadata,
        more_transactions: Vec::new(),
        expect_transactions: Vec::new(),
    }
}

fn all_types_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, true),
        Field::new("city", DataType::Utf8View, true),
        Field::new("qty", DataType::Int32, false),
        Field::new("id", DataType::Int64, false),
        Field::new("ratio", DataType::Float64, true),
        Field::new("active", DataType::Boolean, true),
        Field::new("day", DataType::Date32, true),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("amount", DataType::Decimal128(18, 2), true),
    ]))
}

fn all_types_batch(ids: &[i64]) -> RecordBatch {
    let n = ids.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter(
            ids.iter()
                .map(|i| (i % 3 != 0).then(|| format!("name-{i}"))),
        )),
        Arc::new(StringViewArray::from_iter(ids.iter().map(|i| {
            Some(format!("a city name longer than twelve bytes {i}"))
        }))),
        Arc::new(Int32Array::from_iter_values(
            ids.iter().map(|i| *i as i32 * 10),
        )),
        Arc::new(Int64Array::from(ids.to_vec())),
        Arc::new(Float64Array::from_iter(
            ids.iter().map(|i| Some(*i as f64 / 4.0)),
        )),
        Arc::new(BooleanArray::from_iter(
            ids.iter().map(|i| Some(i % 2 == 0)),
        )),
        Arc::new(Date32Array::from_iter_values(
            ids.iter().map(|i| 19_000 + *i as i32),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                ids.iter().map(|i| 1_700_000_000_000_000 + i * 1_000_001),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            // 12345678901234.56 and friends: exact cents, beyond f64's exact range.
            Decimal128Array::from_iter_values(
                ids.iter().map(|i| 1_234_567_890_123_456 + *i as i128),
            )
            .with_precision_and_scale(18, 2)
            .unwrap(),
        ),
    ];
    assert_eq!(columns[0].len(), n);
    RecordBatch::try_new(all_types_schema(), columns).unwrap()
}

fn simple_schema(col: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(col, DataType::Int64, true)]))
}

fn simple_batch(col: &str, values: &[i64]) -> RecordBatch {
    RecordBatch::try_new(
        simple_schema(col),
        vec![Arc::new(Int64Array::from(values.to_vec()))],
    )
    .unwrap()
}

async fn write_simple(
    lake: &Lake,
    table: &str,
    col: &str,
    values: &[i64],
    spec: CommitSpec,
) -> CommitOutcome {
    let mut w = lake
        .writer(Layer::Silver, table, simple_schema(col))
        .await
        .unwrap();
    w.write(simple_batch(col, values)).await.unwrap();
    w.commit(spec).await.unwrap()
}

/// Every batch of every file of the snapshot, in file order.
async fn read_all(lake: &Lake, snap: &TableSnapshot) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for file in &snap.files {
        let batches: Vec<RecordBatch> = lake
            .read_file(snap, file, 1024)
            .try_collect()
            .await
            .unwrap();
        out.extend(batches);
    }
    out
}

async fn read_i64(lake: &Lake, snap: &TableSnapshot, col: &str) -> Vec<i64> {
    let mut values: Vec<i64> = read_all(lake, snap)
        .await
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name(col)
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            a.values().to_vec()
        })
        .collect();
    values.sort();
    values
}

#[test]
fn open_accepts_path_and_file_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("lake");
    let by_path = Lake::open(path.to_str().unwrap(), HashMap::new()).unwrap();
    assert!(path.is_dir(), "local root is created");
    let url = url::Url::from_directory_path(&path).unwrap();
    let by_url = Lake::open(url.as_str(), HashMap::new()).unwrap();
    assert_eq!(by_path.root(), by_url.root());
    let t = by_path.table_url(Layer::Bronze, "orders");
    assert!(t.as_str().ends_with("/lake/bronze/orders/"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_table_name_is_rejected() {
    let (_dir, lake) = lake();
    for bad in ["", "../x", "a/b", "_delta_log", ".hidden"] {
        let err = lake.snapshot(Layer::Gold, bad, None).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidTableName { .. }),
            "{bad}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_append_and_read_back_exact_values() {
    let (_dir, lake) = lake();
    let first = all_types_batch(&[1, 2, 3]);
    let second = all_types_batch(&[4, 5]);

    let mut w = lake
        .writer(Layer::Bronze, "orders", all_types_schema())
        .await
        .unwrap();
    w.write(first.clone()).await.unwrap();
    let out = w
        .commit(spec(WriteMode::Append, "ingest-orders", 1))
        .await
        .unwrap();
    let CommitOutcome::Committed {
        version,
        rows,
        bytes,
        files,
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!((version, rows, files), (0, 3, 1));
    assert!(bytes > 0);

    let mut w = lake
        .writer(Layer::Bronze, "orders", all_types_schema())
        .await
        .unwrap();
    w.write(second.clone()).await.unwrap();
    let out = w
        .commit(spec(WriteMode::Append, "ingest-orders", 2))
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            CommitOutcome::Committed {
                version: 1,
                rows: 2,
                ..
            }
        ),
        "{out:?}"
    );

    let snap = lake
        .snapshot(Layer::Bronze, "orders", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.version, 1);
    assert_eq!(snap.files.len(), 2);
    assert_eq!(snap.total_rows(), Some(5));
    assert_eq!(
        snap.total_bytes(),
        snap.files.iter().map(|f| f.size).sum::<i64>()
    );
    assert_eq!(snap.app_version("ingest-orders").await.unwrap(), Some(2));
    assert_eq!(snap.app_version("someone-else").await.unwrap(), None);

    // Schema: Utf8View comes back as Utf8, everything else exactly as written.
    let types: Vec<(String, DataType)> = snap
        .schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let expected: Vec<(String, DataType)> = all_types_schema()
        .fields()
        .iter()
        .map(|f| {
            let dt = match f.data_type() {
                DataType::Utf8View => DataType::Utf8,
                other => other.clone(),
            };
            (f.name().clone(), dt)
        })
        .collect();
    assert_eq!(types, expected);
    assert!(!snap.schema.field_with_name("id").unwrap().is_nullable());

    // Data: identical values (Utf8View column compared as Utf8).
    let mut batches = read_all(&lake, &snap).await;
    batches.sort_by_key(|b| b.num_rows());
    let as_table = |b: &RecordBatch| {
        let city = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let mut cols = b.columns().to_vec();
        cols[1] = city;
        RecordBatch::try_new(snap.schema.clone(), cols).unwrap()
    };
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0], as_table(&second));
    assert_eq!(batches[1], as_table(&first));
    let amounts = batches[1]
        .column_by_name("amount")
        .unwrap()
        .as_any()
        .downcast_ref::<Decimal128Array>()
        .unwrap();
    assert_eq!(amounts.value_as_string(0), "12345678901234.57");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_file_streams_in_bounded_batches() {
    let (_dir, lake) = lake();
    let values: Vec<i64> = (0..10_000).collect();
    write_simple(&lake, "big", "v", &values, spec(WriteMode::Append, "a", 1)).await;
    let snap = lake
        .snapshot(Layer::Silver, "big", None)
        .await
        .unwrap()
        .unwrap();
    let batches: Vec<RecordBatch> = lake
        .read_file(&snap, &snap.files[0], 1_000)
        .try_collect()
        .await
        .unwrap();
    assert!(batches.len() >= 10);
    assert!(batches.iter().all(|b| b.num_rows() <= 1_000));
    assert_eq!(read_i64(&lake, &snap, "v").await, values);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_replaces_content_and_schema() {
    let (_dir, lake) = lake();
    write_simple(&lake, "t", "a", &[1, 2, 3], spec(WriteMode::Append, "x", 1)).await;
    write_simple(&lake, "t", "a", &[4], spec(WriteMode::Append, "x", 2)).await;

    // Same schema overwrite.
    let out = write_simple(&lake, "t", "a", &[7, 8], spec(WriteMode::Overwrite, "x", 3)).await;
    assert!(
        matches!(out, CommitOutcome::Committed { version: 2, .. }),
        "{out:?}"
    );
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_i64(&lake, &snap, "a").await, vec![7, 8]);

    // Different schema overwrite: new metadata in the same commit.
    let schema = Arc::new(Schema::new(vec![
        Field::new("b", DataType::Utf8, false),
        Field::new("c", DataType::Decimal128(10, 3), true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["x"])),
            Arc::new(
                Decimal128Array::from(vec![Some(1_234)])
                    .with_precision_and_scale(10, 3)
                    .unwrap(),
            ),
        ],
    )
    .unwrap();
    let mut w = lake
        .writer(Layer::Silver, "t", schema.clone())
        .await
        .unwrap();
    w.write(batch.clone()).await.unwrap();
    let out = w.commit(spec(WriteMode::Overwrite, "x", 4)).await.unwrap();
    assert!(
        matches!(
            out,
            CommitOutcome::Committed {
                version: 3,
                rows: 1,
                ..
            }
        ),
        "{out:?}"
    );
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.schema, schema);
    assert_eq!(snap.files.len(), 1);
    assert_eq!(read_all(&lake, &snap).await, vec![batch]);

    // Appending with yet another schema is an error naming the table; nothing committed.
    let mut w = lake
        .writer(Layer::Silver, "t", simple_schema("a"))
        .await
        .unwrap();
    w.write(simple_batch("a", &[1])).await.unwrap();
    let err = w.commit(spec(WriteMode::Append, "x", 5)).await.unwrap_err();
    assert!(matches!(err, Error::SchemaMismatch { .. }), "{err}");
    assert!(err.to_string().contains("silver/t"), "{err}");
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_commit_is_idempotent() {
    let (dir, lake) = lake();
    let out = write_simple(
        &lake,
        "t",
        "a",
        &[1, 2],
        spec(WriteMode::Append, "task-7", 5),
    )
    .await;
    assert!(matches!(out, CommitOutcome::Committed { version: 0, .. }));

    // The same task retried (same app id and txn version), and an older one: no commit.
    for txn in [5, 4] {
        let out = write_simple(
            &lake,
            "t",
            "a",
            &[1, 2],
            spec(WriteMode::Append, "task-7", txn),
        )
        .await;
        assert_eq!(out, CommitOutcome::AlreadyCommitted { version: 0 });
    }
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.version, 0);
    assert_eq!(read_i64(&lake, &snap, "a").await, vec![1, 2]);

    // The skipped writers' files were deleted: only the committed file is on disk.
    let table_dir = dir.path().join("lake").join("silver").join("t");
    let parquet: Vec<_> = std::fs::read_dir(&table_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        .collect();
    assert_eq!(parquet.len(), 1);

    // Idempotency also holds for overwrites; a newer txn version commits.
    let out = write_simple(
        &lake,
        "t",
        "a",
        &[9],
        spec(WriteMode::Overwrite, "task-7", 5),
    )
    .await;
    assert_eq!(out, CommitOutcome::AlreadyCommitted { version: 0 });
    let out = write_simple(
        &lake,
        "t",
        "a",
        &[9],
        spec(WriteMode::Overwrite, "task-7", 6),
    )
    .await;
    assert!(
        matches!(out, CommitOutcome::Committed { version: 1, .. }),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_round_trip_per_part() {
    let (_dir, lake) = lake();
    let mut w = lake
        .writer(Layer::Bronze, "events", simple_schema("v"))
        .await
        .unwrap();
    let tags = |name: &str| {
        BTreeMap::from([
            ("source_path".to_string(), format!("s3://in/{name}.csv")),
            ("source_size".to_string(), "1234".to_string()),
            (
                "source_mtime".to_string(),
                "2026-01-02T03:04:05Z".to_string(),
            ),
        ])
    };
    w.write(simple_batch("v", &[1, 2])).await.unwrap();
    w.finish_part(tags("one")).await.unwrap();
    w.write(simple_batch("v", &[3])).await.unwrap();
    w.write(simple_batch("v", &[4])).await.unwrap();
    w.finish_part(tags("two")).await.unwrap();
    w.write(simple_batch("v", &[5])).await.unwrap(); // left open: committed untagged
    let out = w
        .commit(spec(WriteMode::Append, "ingest", 1))
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            CommitOutcome::Committed {
                rows: 5,
                files: 3,
                ..
            }
        ),
        "{out:?}"
    );

    let snap = lake
        .snapshot(Layer::Bronze, "events", None)
        .await
        .unwrap()
        .unwrap();
    let mut by_rows: Vec<(Option<i64>, BTreeMap<String, String>)> = snap
        .files
        .iter()
        .map(|f| (f.rows, f.tags.clone()))
        .collect();
    by_rows.sort();
    assert_eq!(
        by_rows,
        vec![
            (Some(1), BTreeMap::new()),
            (Some(2), tags("one")),
            (Some(2), tags("two")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_stay_readable() {
    let (_dir, lake) = lake();
    write_simple(&lake, "t", "a", &[1], spec(WriteMode::Append, "x", 1)).await;
    write_simple(&lake, "t", "a", &[2], spec(WriteMode::Append, "x", 2)).await;
    write_simple(&lake, "t", "a", &[3], spec(WriteMode::Overwrite, "x", 3)).await;

    let v0 = lake
        .snapshot(Layer::Silver, "t", Some(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v0.version, 0);
    assert_eq!(read_i64(&lake, &v0, "a").await, vec![1]);
    assert_eq!(v0.app_version("x").await.unwrap(), Some(1));
    let v1 = lake
        .snapshot(Layer::Silver, "t", Some(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_i64(&lake, &v1, "a").await, vec![1, 2]);
    let latest = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.version, 2);
    assert_eq!(read_i64(&lake, &latest, "a").await, vec![3]);

    let err = lake
        .snapshot(Layer::Silver, "t", Some(9))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("silver/t"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_none() {
    let (_dir, lake) = lake();
    assert!(
        lake.snapshot(Layer::Gold, "nope", None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        lake.snapshot(Layer::Gold, "nope", Some(0))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_writes_leave_previous_version() {
    let (_dir, lake) = lake();
    write_simple(&lake, "t", "a", &[1], spec(WriteMode::Append, "x", 1)).await;

    // A writer that wrote and finished parts, then "crashed" (dropped) before committing.
    let mut w = lake
        .writer(Layer::Silver, "t", simple_schema("a"))
        .await
        .unwrap();
    w.write(simple_batch("a", &[2, 3])).await.unwrap();
    w.finish_part(BTreeMap::new()).await.unwrap();
    w.write(simple_batch("a", &[4])).await.unwrap();
    drop(w);

    // A writer for a table that does not exist yet: still no table.
    let mut w = lake
        .writer(Layer::Silver, "new", simple_schema("a"))
        .await
        .unwrap();
    w.write(simple_batch("a", &[2, 3])).await.unwrap();
    w.finish_part(BTreeMap::new()).await.unwrap();
    drop(w);

    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.version, 0);
    assert_eq!(read_i64(&lake, &snap, "a").await, vec![1]);
    assert!(
        lake.snapshot(Layer::Silver, "new", None)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(lake.list_tables(Layer::Silver).await.unwrap(), vec!["t"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_write_creates_readable_table() {
    let (_dir, lake) = lake();
    let mut w = lake
        .writer(Layer::Gold, "empty", all_types_schema())
        .await
        .unwrap();
    w.write(all_types_batch(&[])).await.unwrap();
    let out = w
        .commit(spec(WriteMode::Overwrite, "agg", 1))
        .await
        .unwrap();
    assert_eq!(
        out,
        CommitOutcome::Committed {
            version: 0,
            rows: 0,
            bytes: 0,
            files: 0
        }
    );
    let snap = lake
        .snapshot(Layer::Gold, "empty", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.files, vec![]);
    assert_eq!(snap.total_rows(), Some(0));
    assert_eq!(snap.schema.fields().len(), 9);
    assert_eq!(snap.app_version("agg").await.unwrap(), Some(1));

    // Overwriting a populated table with nothing empties it.
    write_simple(&lake, "t", "a", &[1], spec(WriteMode::Append, "x", 1)).await;
    let w = lake
        .writer(Layer::Silver, "t", simple_schema("a"))
        .await
        .unwrap();
    w.commit(spec(WriteMode::Overwrite, "x", 2)).await.unwrap();
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((snap.version, snap.files.len()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_tables_lists_committed_tables() {
    let (dir, lake) = lake();
    assert!(lake.list_tables(Layer::Bronze).await.unwrap().is_empty());
    write_simple(&lake, "b", "a", &[1], spec(WriteMode::Append, "x", 1)).await;
    write_simple(&lake, "a", "a", &[1], spec(WriteMode::Append, "x", 1)).await;
    // A stray folder without a Delta log is not a table.
    std::fs::create_dir_all(dir.path().join("lake").join("silver").join("junk")).unwrap();
    assert_eq!(
        lake.list_tables(Layer::Silver).await.unwrap(),
        vec!["a", "b"]
    );
    assert!(lake.list_tables(Layer::Gold).await.unwrap().is_empty());
}

/// Action kinds of one commit file, read independently of deltalake.
fn commit_actions(dir: &std::path::Path, table: &str, version: u64) -> Vec<serde_json::Value> {
    let file = dir
        .join("lake")
        .join("silver")
        .join(table)
        .join("_delta_log")
        .join(format!("{version:020}.json"));
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn kinds(actions: &[serde_json::Value]) -> Vec<String> {
    let mut k: Vec<String> = actions
        .iter()
        .map(|a| a.as_object().unwrap().keys().next().unwrap().clone())
        .collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_is_exactly_one_commit() {
    let (dir, lake) = lake();
    write_simple(&lake, "t", "a", &[1], spec(WriteMode::Append, "x", 1)).await;
    let v0 = commit_actions(dir.path(), "t", 0);
    assert_eq!(
        kinds(&v0),
        ["add", "commitInfo", "metaData", "protocol", "txn"]
    );
    let info = v0.iter().find_map(|a| a.get("commitInfo")).unwrap();
    assert_eq!(info["run_id"], "run-1");
    let txn = v0.iter().find_map(|a| a.get("txn")).unwrap();
    assert_eq!(
        (txn["appId"].as_str(), txn["version"].as_i64()),
        (Some("x"), Some(1))
    );

    write_simple(&lake, "t", "a", &[2], spec(WriteMode::Append, "x", 2)).await;
    assert_eq!(
        kinds(&commit_actions(dir.path(), "t", 1)),
        ["add", "commitInfo", "txn"]
    );

    write_simple(&lake, "t", "b", &[3], spec(WriteMode::Overwrite, "x", 3)).await;
    assert_eq!(
        kinds(&commit_actions(dir.path(), "t", 2)),
        ["add", "commitInfo", "metaData", "remove", "remove", "txn"]
    );
    let log = dir.path().join("lake/silver/t/_delta_log");
    assert!(!log.join(format!("{:020}.json", 3)).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_a_creating_task_commit_once() {
    let (_dir, lake) = lake();
    let mut a = lake
        .writer(Layer::Silver, "t", simple_schema("a"))
        .await
        .unwrap();
    let mut b = lake
        .writer(Layer::Silver, "t", simple_schema("a"))
        .await
        .unwrap();
    a.write(simple_batch("a", &[1])).await.unwrap();
    b.write(simple_batch("a", &[1])).await.unwrap();
    let (ra, rb) = tokio::join!(
        a.commit(spec(WriteMode::Append, "task", 1)),
        b.commit(spec(WriteMode::Append, "task", 1))
    );
    let outcomes = [ra, rb];
    let committed = outcomes
        .iter()
        .filter(|r| matches!(r, Ok(CommitOutcome::Committed { .. })))
        .count();
    let already = outcomes
        .iter()
        .filter(|r| matches!(r, Ok(CommitOutcome::AlreadyCommitted { version: 0 })))
        .count();
    assert_eq!((committed, already), (1, 1), "{outcomes:?}");
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.version, 0);
    assert_eq!(read_i64(&lake, &snap, "a").await, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_on_an_existing_table_commit_once() {
    let (_dir, lake) = lake();
    write_simple(&lake, "t", "a", &[0], spec(WriteMode::Append, "other", 1)).await;
    for mode in [WriteMode::Append, WriteMode::Overwrite] {
        let txn = if mode == WriteMode::Append { 1 } else { 2 };
        let mut a = lake
            .writer(Layer::Silver, "t", simple_schema("a"))
            .await
            .unwrap();
        let mut b = lake
            .writer(Layer::Silver, "t", simple_schema("a"))
            .await
            .unwrap();
        a.write(simple_batch("a", &[txn])).await.unwrap();
        b.write(simple_batch("a", &[txn])).await.unwrap();
        let (ra, rb) = tokio::join!(
            a.commit(spec(mode.clone(), "task", txn)),
            b.commit(spec(mode.clone(), "task", txn))
        );
        let outcomes = [ra, rb];
        // One commits; the other sees the conflict and reports the same task's success.
        let committed = outcomes
            .iter()
            .filter(|r| matches!(r, Ok(CommitOutcome::Committed { .. })))
            .count();
        let already = outcomes
            .iter()
            .filter(|r| matches!(r, Ok(CommitOutcome::AlreadyCommitted { .. })))
            .count();
        assert_eq!((committed, already), (1, 1), "{mode:?}: {outcomes:?}");
    }
    let snap = lake
        .snapshot(Layer::Silver, "t", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.version, 2);
    assert_eq!(read_i64(&lake, &snap, "a").await, vec![2]);
}

/// Two Kafka readers that both believe they own partition 0: the one continuing from an
/// offset the other already moved is refused, and its rows never land.
#[tokio::test]
async fn a_commit_continuing_from_a_moved_transaction_is_refused() {
    let (_dir, lake) = lake();
    let fenced = |app: &str, offset: i64, expected: Option<i64>| {
        let mut s = spec(WriteMode::Append, app, offset);
        s.expect_transactions = vec![(app.to_string(), expected)];
        s
    };
    // A table that does not exist yet holds no transaction.
    let w = lake
        .writer(Layer::Silver, "changes", simple_schema("a"))
        .await
        .unwrap();
    let refused = w.commit(fenced("kafka:t:0", 9, Some(4))).await;
    assert!(
        matches!(refused, Err(Error::TransactionMoved { found: None, .. })),
        "{refused:?}"
    );
    // Reader A reads offsets 0..=9 from nothing and commits them.
    let a = write_simple(&lake, "changes", "a", &[0, 9], fenced("kafka:t:0", 9, None)).await;
    assert!(matches!(a, CommitOutcome::Committed { version: 0, .. }));
    // Reader B was also handed the partition when it was still empty: refused, naming both.
    let mut w = lake
        .writer(Layer::Silver, "changes", simple_schema("a"))
        .await
        .unwrap();
    w.write(simple_batch("a", &[0, 1, 2])).await.unwrap();
    let refused = w.commit(fenced("kafka:t:0", 2, None)).await;
    match refused {
        Err(e @ Error::TransactionMoved { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("kafka:t:0") && message.contains("Some(9)"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A continues from where it left off.
    let a = write_simple(
        &lake,
        "changes",
        "a",
        &[10],
        fenced("kafka:t:0", 10, Some(9)),
    )
    .await;
    assert!(matches!(a, CommitOutcome::Committed { version: 1, .. }));
    let snap = lake
        .snapshot(Layer::Silver, "changes", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.total_rows(), Some(3));
    assert_eq!(snap.app_version("kafka:t:0").await.unwrap(), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_encoders_share_a_large_write_and_commit_every_row_once() {
    let (_dir, lake) = lake();
    let mut w = lake
        .writer(Layer::Bronze, "big", simple_schema("v"))
        .await
        .unwrap();
    w.encode_in_parallel(2);
    // 2.5 encoder runs of rows in one part, then a small second part.
    let total = write::ENCODER_RUN_ROWS as i64 * 5 / 2;
    let chunk = 64 * 1024;
    let mut start = 0;
    while start < total {
        let end = (start + chunk).min(total);
        let values: Vec<i64> = (start..end).collect();
        w.write(simple_batch("v", &values)).await.unwrap();
        start = end;
    }
    let tag = |part: &str| BTreeMap::from([("part".to_string(), part.to_string())]);
    w.finish_part(tag("one")).await.unwrap();
    w.write(simple_batch("v", &[total, total + 1]))
        .await
        .unwrap();
    w.finish_part(tag("two")).await.unwrap();
    let out = w.commit(spec(WriteMode::Append, "load", 1)).await.unwrap();
    let CommitOutcome::Committed { rows, files, .. } = out else {
        panic!("not committed: {out:?}");
    };
    assert_eq!(rows, total + 2);
    assert!(files >= 3, "both encoders wrote part one: {files} files");

    let snap = lake
        .snapshot(Layer::Bronze, "big", None)
        .await
        .unwrap()
        .unwrap();
    let rows_by_part = |part: &str| -> i64 {
        snap.files
            .iter()
            .filter(|f| f.tags == tag(part))
            .map(|f| f.rows.unwrap())
            .sum()
    };
    assert_eq!(rows_by_part("one"), total);
    assert_eq!(rows_by_part("two"), 2);
    let values = read_i64(&lake, &snap, "v").await;
    assert_eq!(values, (0..total + 2).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_smaller_than_an_encoder_run_is_written_by_one_encoder() {
    let (_dir, lake) = lake();
    let mut w = lake
        .writer(Layer::Bronze, "files", simple_schema("v"))
        .await
        .unwrap();
    w.encode_in_parallel(2);
    let run = write::ENCODER_RUN_ROWS as i64;
    let tag = |part: &str| BTreeMap::from([("part".to_string(), part.to_string())]);
    // Part one leaves its encoder just short of a full run; part two must not spill over.
    for (part, range) in [("one", 0..run - 1000), ("two", run..run + 300_000)] {
        let values: Vec<i64> = range.collect();
        for chunk in values.chunks(64 * 1024) {
            w.write(simple_batch("v", chunk)).await.unwrap();
        }
        w.finish_part(tag(part)).await.unwrap();
    }
    w.commit(spec(WriteMode::Append, "load", 1)).await.unwrap();
    let snap = lake
        .snapshot(Layer::Bronze, "files", None)
        .await
        .unwrap()
        .unwrap();
    for part in ["one", "two"] {
        let files = snap.files.iter().filter(|f| f.tags == tag(part)).count();
        assert_eq!(files, 1, "part {part} is in {files} files");
    }
}

/// The metadata of every row group of a snapshot's data files, file by file.
fn row_groups(
    dir: &std::path::Path,
    snap: &TableSnapshot,
) -> Vec<parquet::file::metadata::RowGroupMetaData> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let root = dir.join("lake").join(snap.layer.as_str()).join(&snap.table);
    let mut groups = Vec::new();
    for file in &snap.files {
        let reader =
            SerializedFileReader::new(std::fs::File::open(root.join(&file.path)).unwrap()).unwrap();
        groups.extend(reader.metadata().row_groups().iter().cloned());
    }
    groups
}

/// Every column chunk of every data file: (has a dictionary page, has statistics, codec).
fn column_chunks(
    dir: &std::path::Path,
    snap: &TableSnapshot,
) -> Vec<(bool, bool, parquet::basic::Compression)> {
    row_groups(dir, snap)
        .iter()
        .flat_map(|rg| rg.columns())
        .map(|c| {
            (
                c.dictionary_page_offset().is_some(),
                c.statistics().is_some(),
                c.compression(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bronze_files_are_plain_lz4_without_statistics_and_silver_files_keep_both_under_snappy() {
    let (dir, lake) = lake();
    let ids: Vec<i64> = (0..5_000).map(|i| i % 7).collect();
    for layer in [Layer::Bronze, Layer::Silver] {
        let mut w = lake
            .writer(layer, "rows", all_types_schema())
            .await
            .unwrap();
        w.write(all_types_batch(&ids)).await.unwrap();
        w.commit(spec(WriteMode::Append, "load", 1)).await.unwrap();
        let snap = lake.snapshot(layer, "rows", None).await.unwrap().unwrap();
        let chunks = column_chunks(dir.path(), &snap);
        assert_eq!(chunks.len(), all_types_schema().fields().len());
        let silver = layer == Layer::Silver;
        let codec = if silver {
            parquet::basic::Compression::SNAPPY
        } else {
            parquet::basic::Compression::LZ4_RAW
        };
        for (field, (dictionary, statistics, compression)) in
            all_types_schema().fields().iter().zip(chunks)
        {
            let column = field.name();
            // Parquet has no dictionary encoding for booleans.
            let dictionary_expected = silver && field.data_type() != &DataType::Boolean;
            assert_eq!(
                dictionary, dictionary_expected,
                "{layer}.rows `{column}`: dictionary page"
            );
            assert_eq!(statistics, silver, "{layer}.rows `{column}`: statistics");
            assert_eq!(compression, codec, "{layer}.rows `{column}`: compression");
        }
        // The values read back are the same either way.
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(read_i64(&lake, &snap, "id").await, sorted, "{layer}.rows");
    }
}

/// Per column (over the row groups of every data file): whether some data page is written
/// plain, and whether some is written as dictionary indices.
fn data_page_encodings(dir: &std::path::Path, snap: &TableSnapshot) -> Vec<(bool, bool)> {
    use parquet::basic::Encoding;
    let mut columns = vec![(false, false); snap.schema.fields().len()];
    for rg in row_groups(dir, snap) {
        for (i, column) in rg.columns().iter().enumerate() {
            // The reader keeps the data pages' encodings as a set (dictionary pages apart).
            let data_pages = column
                .page_encoding_stats_mask()
                .expect("the writer records the data pages' encodings");
            columns[i].0 |= data_pages.is_set(Encoding::PLAIN);
            columns[i].1 |= data_pages.is_set(Encoding::RLE_DICTIONARY);
        }
    }
    columns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_unique_silver_column_gives_up_its_dictionary_and_a_repetitive_one_keeps_it() {
    let (dir, lake) = lake();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("flag", DataType::Int64, false),
    ]));
    // 40,000 distinct keys make a 312 KiB dictionary: past the limit, under Parquet's 1 MiB.
    let rows = 40_000i64;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..rows)),
            Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i % 3))),
        ],
    )
    .unwrap();
    let mut w = lake.writer(Layer::Silver, "keys", schema).await.unwrap();
    w.write(batch).await.unwrap();
    w.commit(spec(WriteMode::Append, "load", 1)).await.unwrap();
    let snap = lake
        .snapshot(Layer::Silver, "keys", None)
        .await
        .unwrap()
        .unwrap();
    let pages = data_page_encodings(dir.path(), &snap);
    assert_eq!(
        pages[0],
        (true, true),
        "`key` starts with a dictionary and falls back to plain pages"
    );
    assert_eq!(
        pages[1],
        (false, true),
        "`flag` keeps its dictionary in every data page"
    );
    assert_eq!(
        read_i64(&lake, &snap, "key").await,
        (0..rows).collect::<Vec<_>>()
    );
}
