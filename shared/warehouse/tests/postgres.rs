//! Loads into the real local PostgreSQL (MEDALLION_TEST_PG_URL, default
//! postgres://postgres@127.0.0.1:5432/test). Each test works in its own fresh schema and drops
//! it at the end; expected values are written out by hand as PostgreSQL's text rendering.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
    LargeStringArray, RecordBatch, StringArray, StringViewArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use futures::stream;
use medallion_warehouse::{Error, LoadMode, LoadReport, PostgresSink, QualifiedName};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn url() -> String {
    std::env::var("MEDALLION_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh schema plus an independent admin connection for checking results.
struct Fixture {
    schema: String,
    admin: Client,
    sink: PostgresSink,
}

impl Fixture {
    async fn new() -> Result<Self, Box<dyn std::error::Error>> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let schema = format!(
            "t_{:x}_{}_{}",
            nanos,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let (admin, connection) = tokio_postgres::connect(&url(), NoTls).await?;
        tokio::spawn(connection);
        admin.batch_execute("SET TimeZone = 'UTC'").await?;
        let sink = PostgresSink::connect(&url()).await?;
        Ok(Self {
            schema,
            admin,
            sink,
        })
    }

    fn table(&self, name: &str) -> QualifiedName {
        QualifiedName::new(&self.schema, name)
    }

    /// Every row of `sql` as text cells (NULL as None).
    async fn rows(
        &self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, Box<dyn std::error::Error>> {
        let mut out = Vec::new();
        for message in self.admin.simple_query(sql).await? {
            if let SimpleQueryMessage::Row(row) = message {
                out.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    async fn drop_schema(self) -> TestResult {
        self.admin
            .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .await?;
        Ok(())
    }
}

fn cells(rows: &[&[Option<&str>]]) -> Vec<Vec<Option<String>>> {
    rows.iter()
        .map(|row| row.iter().map(|c| c.map(str::to_owned)).collect())
        .collect()
}

fn ok_stream(
    batches: Vec<RecordBatch>,
) -> impl futures::Stream<Item = Result<RecordBatch, ArrowError>> {
    stream::iter(batches.into_iter().map(Ok))
}

fn all_types_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("s", DataType::Utf8, true),
        Field::new("sv", DataType::Utf8View, true),
        Field::new("sl", DataType::LargeUtf8, true),
        Field::new("i", DataType::Int32, true),
        Field::new("f", DataType::Float64, true),
        Field::new("b", DataType::Boolean, true),
        Field::new("d", DataType::Date32, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("tn", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        Field::new("dec", DataType::Decimal128(38, 4), true),
        Field::new("dec2", DataType::Decimal128(10, 2), true),
    ]))
}

const NINES_38: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999;

#[allow(clippy::too_many_arguments)]
fn all_types_batch(
    schema: &SchemaRef,
    id: Vec<i64>,
    s: Vec<Option<&str>>,
    sv: Vec<Option<&str>>,
    sl: Vec<Option<&str>>,
    i: Vec<Option<i32>>,
    f: Vec<Option<f64>>,
    b: Vec<Option<bool>>,
    d: Vec<Option<i32>>,
    ts: Vec<Option<i64>>,
    tn: Vec<Option<i64>>,
    dec: Vec<Option<i128>>,
    dec2: Vec<Option<i128>>,
) -> Result<RecordBatch, ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(id)),
        Arc::new(StringArray::from(s)),
        Arc::new(StringViewArray::from(sv)),
        Arc::new(LargeStringArray::from(sl)),
        Arc::new(Int32Array::from(i)),
        Arc::new(Float64Array::from(f)),
        Arc::new(BooleanArray::from(b)),
        Arc::new(Date32Array::from(d)),
        Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        Arc::new(TimestampMicrosecondArray::from(tn)),
        Arc::new(Decimal128Array::from(dec).with_precision_and_scale(38, 4)?),
        Arc::new(Decimal128Array::from(dec2).with_precision_and_scale(10, 2)?),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

#[tokio::test]
async fn replace_round_trips_every_type_including_nulls() -> TestResult {
    let mut fx = Fixture::new().await?;
    let target = fx.table("all_types");
    let schema = all_types_schema();
    let first = all_types_batch(
        &schema,
        vec![1, 2],
        vec![Some("héllo"), None],
        vec![
            Some("a view string longer than twelve bytes ストリング"),
            None,
        ],
        vec![Some("large"), None],
        vec![Some(i32::MIN), None],
        vec![Some(1.5), None],
        vec![Some(true), None],
        vec![Some(0), None],
        vec![Some(0), None],
        vec![Some(1_700_000_000_123_456), None],
        vec![Some(123_456_789_012_345_678), None],
        vec![Some(-1), None],
    )?;
    // A sliced batch exercises non-zero array offsets.
    let second = all_types_batch(
        &schema,
        vec![99, 3, 4],
        vec![Some("skipped"), Some(""), Some("x")],
        vec![Some("skipped"), Some("short"), Some("y")],
        vec![Some("skipped"), Some("quote\"'\\"), Some("z")],
        vec![Some(7), Some(i32::MAX), Some(0)],
        vec![Some(7.0), Some(1e300), Some(-0.25)],
        vec![Some(true), Some(false), Some(true)],
        vec![Some(7), Some(-1), Some(10_957)],
        vec![Some(7), Some(-1), Some(946_684_800_000_000)],
        vec![Some(7), Some(-86_400_000_000), Some(0)],
        vec![Some(7), Some(NINES_38), Some(-NINES_38)],
        vec![Some(7), Some(0), Some(1)],
    )?
    .slice(1, 2);
    let empty = first.slice(0, 0);

    let report = fx
        .sink
        .load(
            &target,
            &schema,
            ok_stream(vec![first, empty, second]),
            LoadMode::Replace,
        )
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 4,
            inserted: 4,
            updated: 0,
            deleted: 0
        }
    );

    let types = fx
        .rows(&format!(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull::text \
             FROM pg_attribute a WHERE a.attrelid = '\"{}\".all_types'::regclass AND a.attnum > 0 \
             ORDER BY a.attnum",
            fx.schema
        ))
        .await?;
    assert_eq!(
        types,
        cells(&[
            &[Some("id"), Some("bigint"), Some("true")],
            &[Some("s"), Some("text"), Some("false")],
            &[Some("sv"), Some("text"), Some("false")],
            &[Some("sl"), Some("text"), Some("false")],
            &[Some("i"), Some("integer"), Some("false")],
            &[Some("f"), Some("double precision"), Some("false")],
            &[Some("b"), Some("boolean"), Some("false")],
            &[Some("d"), Some("date"), Some("false")],
            &[Some("ts"), Some("timestamp with time zone"), Some("false")],
            &[
                Some("tn"),
                Some("timestamp without time zone"),
                Some("false")
            ],
            &[Some("dec"), Some("numeric(38,4)"), Some("false")],
            &[Some("dec2"), Some("numeric(10,2)"), Some("false")],
        ])
    );

    let select = format!(
        "SELECT id::text, s, sv, sl, i::text, f::text, b::text, d::text, ts::text, tn::text, \
         dec::text, dec2::text FROM \"{}\".all_types ORDER BY id",
        fx.schema
    );
    assert_eq!(
        fx.rows(&select).await?,
        cells(&[
            &[
                Some("1"),
                Some("héllo"),
                Some("a view string longer than twelve bytes ストリング"),
                Some("large"),
                Some("-2147483648"),
                Some("1.5"),
                Some("true"),
                Some("1970-01-01"),
                Some("1970-01-01 00:00:00+00"),
                Some("2023-11-14 22:13:20.123456"),
                Some("12345678901234.5678"),
                Some("-0.01"),
            ],
            &[
                Some("2"),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ],
            &[
                Some("3"),
                Some(""),
                Some("short"),
                Some("quote\"'\\"),
                Some("2147483647"),
                Some("1e+300"),
                Some("false"),
                Some("1969-12-31"),
                Some("1969-12-31 23:59:59.999999+00"),
                Some("1969-12-31 00:00:00"),
                Some("9999999999999999999999999999999999.9999"),
                Some("0.00"),
            ],
            &[
                Some("4"),
                Some("x"),
                Some("y"),
                Some("z"),
                Some("0"),
                Some("-0.25"),
                Some("true"),
                Some("2000-01-01"),
                Some("2000-01-01 00:00:00+00"),
                Some("1970-01-01 00:00:00"),
                Some("-9999999999999999999999999999999999.9999"),
                Some("0.01"),
            ],
        ])
    );

    // Replacing again leaves exactly the new rows.
    let third = all_types_batch(
        &schema,
        vec![10],
        vec![Some("only")],
        vec![None],
        vec![None],
        vec![None],
        vec![None],
        vec![None],
        vec![None],
        vec![None],
        vec![None],
        vec![Some(1)],
        vec![None],
    )?;
    let report = fx
        .sink
        .load(&target, &schema, ok_stream(vec![third]), LoadMode::Replace)
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 1,
            inserted: 1,
            updated: 0,
            deleted: 4
        }
    );
    assert_eq!(
        fx.rows(&format!(
            "SELECT id::text, s, dec::text FROM \"{}\".all_types",
            fx.schema
        ))
        .await?,
        cells(&[&[Some("10"), Some("only"), Some("0.0001")]])
    );

    fx.drop_schema().await
}

fn merge_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("region", DataType::Utf8, true),
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(12, 2), true),
    ]))
}

/// (region, id, name, amount in cents)
type MergeRow<'a> = (Option<&'a str>, Option<i64>, Option<&'a str>, Option<i128>);

fn merge_batch(rows: &[MergeRow<'_>]) -> Result<RecordBatch, ArrowError> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
        Arc::new(
            Decimal128Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())
                .with_precision_and_scale(12, 2)?,
        ),
    ];
    RecordBatch::try_new(merge_schema(), columns)
}

/// Runs the same merge scenario; `precreate` optionally creates the table first (e.g. without
/// a unique constraint, to exercise the UPDATE + INSERT fallback).
async fn merge_scenario(precreate: Option<&str>) -> TestResult {
    let mut fx = Fixture::new().await?;
    let target = fx.table("Merged");
    if let Some(ddl) = precreate {
        fx.admin
            .batch_execute(&format!(
                "CREATE SCHEMA \"{0}\"; CREATE TABLE \"{0}\".\"Merged\" ({ddl})",
                fx.schema
            ))
            .await?;
    }
    let keys = LoadMode::Merge {
        keys: vec!["region".to_owned(), "id".to_owned()],
    };
    let schema = merge_schema();

    let first = merge_batch(&[
        (Some("eu"), Some(1), Some("a"), Some(100)),
        (Some("eu"), Some(2), Some("b"), Some(200)),
        (Some("us"), Some(1), Some("c"), None),
    ])?;
    let report = fx
        .sink
        .load(&target, &schema, ok_stream(vec![first]), keys.clone())
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 3,
            inserted: 3,
            updated: 0,
            deleted: 0
        }
    );

    let second = merge_batch(&[
        (Some("eu"), Some(2), Some("b2"), Some(-250)), // changed
        (Some("us"), Some(1), Some("c"), None),        // unchanged
        (Some("us"), Some(2), None, Some(1)),          // new
    ])?;
    let report = fx
        .sink
        .load(&target, &schema, ok_stream(vec![second]), keys)
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 3,
            inserted: 1,
            updated: 1,
            deleted: 0
        }
    );

    assert_eq!(
        fx.rows(&format!(
            "SELECT region, id::text, name, amount::text FROM \"{}\".\"Merged\" ORDER BY region, id",
            fx.schema
        ))
        .await?,
        cells(&[
            &[Some("eu"), Some("1"), Some("a"), Some("1.00")],
            &[Some("eu"), Some("2"), Some("b2"), Some("-2.50")],
            &[Some("us"), Some("1"), Some("c"), None],
            &[Some("us"), Some("2"), None, Some("0.01")],
        ])
    );
    fx.drop_schema().await
}

#[tokio::test]
async fn merge_updates_existing_keys_and_inserts_new_ones() -> TestResult {
    merge_scenario(None).await
}

#[tokio::test]
async fn merge_without_unique_constraint_falls_back_to_update_and_insert() -> TestResult {
    merge_scenario(Some(
        "region text, id bigint, name text, amount numeric(12,2)",
    ))
    .await
}

#[tokio::test]
async fn merge_with_unique_index_in_other_key_order() -> TestResult {
    merge_scenario(Some(
        "region text, id bigint, name text, amount numeric(12,2), UNIQUE (id, region)",
    ))
    .await
}

#[tokio::test]
async fn failed_loads_leave_old_rows_intact() -> TestResult {
    let mut fx = Fixture::new().await?;
    let target = fx.table("kept");
    let schema = merge_schema();
    let merge = LoadMode::Merge {
        keys: vec!["region".to_owned(), "id".to_owned()],
    };
    let original = merge_batch(&[(Some("eu"), Some(1), Some("a"), Some(100))])?;
    fx.sink
        .load(&target, &schema, ok_stream(vec![original]), merge.clone())
        .await?;
    let select = format!(
        "SELECT region, id::text, name, amount::text FROM \"{}\".kept ORDER BY id",
        fx.schema
    );
    let before = fx.rows(&select).await?;
    let good = || merge_batch(&[(Some("eu"), Some(5), Some("new"), Some(1))]);

    // 1. The stream fails after one good batch.
    for mode in [LoadMode::Replace, merge.clone()] {
        let error = fx
            .sink
            .load(&target, &schema, good_then_error()?, mode)
            .await;
        match error {
            Err(error @ Error::Input { .. }) => {
                let source = std::error::Error::source(&error).map(ToString::to_string);
                assert!(
                    source.is_some_and(|s| s.contains("upstream broke")),
                    "{error:?}"
                );
            }
            other => panic!("expected an input error, got {other:?}"),
        }
        assert_eq!(fx.rows(&select).await?, before);
    }

    // 2. A NULL in a key column (NOT NULL via the primary key) after a good batch.
    let null_key = merge_batch(&[(Some("eu"), None, Some("bad"), None)])?;
    for mode in [LoadMode::Replace, merge.clone()] {
        let error = fx
            .sink
            .load(
                &target,
                &schema,
                ok_stream(vec![good()?, null_key.clone()]),
                mode,
            )
            .await;
        match error {
            Err(Error::Postgres { message, .. }) => {
                assert!(message.contains("null value"), "{message}");
                assert!(message.contains("id"), "{message}");
            }
            other => panic!("expected a postgres error, got {other:?}"),
        }
        assert_eq!(fx.rows(&select).await?, before);
    }

    // 3. A batch that does not match the declared schema.
    let wrong = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, true)])),
        vec![Arc::new(Int32Array::from(vec![1])) as ArrayRef],
    )?;
    let error = fx
        .sink
        .load(
            &target,
            &schema,
            ok_stream(vec![good()?, wrong]),
            LoadMode::Replace,
        )
        .await;
    assert!(matches!(error, Err(Error::BatchSchema { .. })), "{error:?}");
    assert_eq!(fx.rows(&select).await?, before);

    // 4. Duplicate keys in one merge input.
    let dup = merge_batch(&[
        (Some("eu"), Some(1), Some("x"), None),
        (Some("eu"), Some(1), Some("y"), None),
    ])?;
    let error = fx
        .sink
        .load(&target, &schema, ok_stream(vec![dup]), merge.clone())
        .await;
    assert!(matches!(error, Err(Error::Postgres { .. })), "{error:?}");
    assert_eq!(fx.rows(&select).await?, before);

    // The sink is still usable after all those rollbacks.
    let report = fx
        .sink
        .load(&target, &schema, ok_stream(vec![good()?]), merge)
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 1,
            inserted: 1,
            updated: 0,
            deleted: 0
        }
    );
    assert_eq!(fx.rows(&select).await?.len(), 2);

    fx.drop_schema().await
}

/// One good batch, then an error, as a failing upstream would produce.
fn good_then_error()
-> Result<impl futures::Stream<Item = Result<RecordBatch, ArrowError>>, ArrowError> {
    let good = merge_batch(&[(Some("eu"), Some(5), Some("new"), Some(1))])?;
    Ok(stream::iter(vec![
        Ok(good),
        Err(ArrowError::ComputeError("upstream broke".to_owned())),
    ]))
}

#[tokio::test]
async fn identifiers_with_quotes_and_upper_case_are_quoted() -> TestResult {
    let mut fx = Fixture::new().await?;
    let target: QualifiedName = format!("\"{}\".\"My\"\"Table\"", fx.schema).parse()?;
    assert_eq!(target.table, "My\"Table");
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("Key\"Col", DataType::Int32, false),
        Field::new("Value", DataType::Utf8, true),
        Field::new("select", DataType::Utf8, true),
    ]));
    let batch = |key: i32, value: &str| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int32Array::from(vec![key])) as ArrayRef,
                Arc::new(StringArray::from(vec![value])),
                Arc::new(StringArray::from(vec![Some("kw")])),
            ],
        )
    };
    let merge = LoadMode::Merge {
        keys: vec!["Key\"Col".to_owned()],
    };
    fx.sink
        .load(
            &target,
            &schema,
            ok_stream(vec![batch(1, "one")?]),
            merge.clone(),
        )
        .await?;
    let report = fx
        .sink
        .load(
            &target,
            &schema,
            ok_stream(vec![batch(1, "uno")?, batch(2, "two")?]),
            merge,
        )
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 2,
            inserted: 1,
            updated: 1,
            deleted: 0
        }
    );
    let report = fx
        .sink
        .load(
            &target,
            &schema,
            ok_stream(vec![batch(3, "three")?]),
            LoadMode::Replace,
        )
        .await?;
    assert_eq!(
        report,
        LoadReport {
            rows: 1,
            inserted: 1,
            updated: 0,
            deleted: 2
        }
    );
    assert_eq!(
        fx.rows(&format!(
            "SELECT \"Key\"\"Col\"::text, \"Value\", \"select\" FROM \"{}\".\"My\"\"Table\"",
            fx.schema
        ))
        .await?,
        cells(&[&[Some("3"), Some("three"), Some("kw")]])
    );
    // Case is preserved: no lower-case twin was created.
    assert_eq!(
        fx.rows(&format!(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = '{}' AND c.relkind = 'r'",
            fx.schema
        ))
        .await?,
        cells(&[&[Some("My\"Table")]])
    );
    fx.drop_schema().await
}

#[tokio::test]
async fn schema_mismatch_names_table_and_column() -> TestResult {
    let mut fx = Fixture::new().await?;
    let target = fx.table("fixed");
    let original: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        original.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1])) as ArrayRef,
            Arc::new(StringArray::from(vec!["a"])),
        ],
    )?;
    fx.sink
        .load(
            &target,
            &original,
            ok_stream(vec![batch]),
            LoadMode::Replace,
        )
        .await?;

    let empty = || ok_stream(Vec::new());
    let cases: [(Vec<Field>, &str); 3] = [
        (
            vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Int32, true),
            ],
            "name",
        ),
        (
            vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("extra", DataType::Boolean, true),
            ],
            "extra",
        ),
        (vec![Field::new("id", DataType::Int64, false)], "name"),
    ];
    for (fields, bad_column) in cases {
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let error = fx
            .sink
            .load(&target, &schema, empty(), LoadMode::Replace)
            .await;
        match error {
            Err(error @ Error::SchemaMismatch { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains(&format!("\"{}\".\"fixed\"", fx.schema)),
                    "{text}"
                );
                assert!(text.contains(&format!("\"{bad_column}\"")), "{text}");
            }
            other => panic!("expected a schema mismatch, got {other:?}"),
        }
    }
    assert_eq!(
        fx.rows(&format!(
            "SELECT id::text, name FROM \"{}\".fixed",
            fx.schema
        ))
        .await?,
        cells(&[&[Some("1"), Some("a")]])
    );

    // Types with no PostgreSQL mapping fail before touching the database.
    let unsupported: SchemaRef =
        Arc::new(Schema::new(vec![Field::new("raw", DataType::Binary, true)]));
    let error = fx
        .sink
        .load(&target, &unsupported, empty(), LoadMode::Replace)
        .await;
    assert!(
        matches!(error, Err(Error::UnsupportedType { .. })),
        "{error:?}"
    );

    // Merge keys must be columns of the input.
    let error = fx
        .sink
        .load(
            &target,
            &original,
            empty(),
            LoadMode::Merge {
                keys: vec!["nope".to_owned()],
            },
        )
        .await;
    assert!(matches!(error, Err(Error::InvalidKeys { .. })), "{error:?}");

    fx.drop_schema().await
}

#[tokio::test]
async fn connect_errors_never_show_the_password() {
    let error = PostgresSink::connect("postgres://postgres:s3cr3t-pw@127.0.0.1:1/test").await;
    let Err(error) = error else {
        panic!("connecting to port 1 should fail");
    };
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    let mut text = format!("{error} {error:?}");
    let mut source = std::error::Error::source(&error);
    while let Some(inner) = source {
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    assert!(!text.contains("s3cr3t-pw"), "{text}");
    assert!(text.contains("postgres@127.0.0.1:1/test"), "{text}");

    let error = PostgresSink::connect("postgres://u:s3cr3t-pw@host:notaport/db").await;
    let Err(error) = error else {
        panic!("a bad port should not parse");
    };
    assert!(
        !format!("{error} {error:?}").contains("s3cr3t-pw"),
        "{error:?}"
    );
}

/// The key columns (region, id) of `rows`, for deletes.
fn key_batch(rows: &[(Option<&str>, Option<i64>)]) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("region", DataType::Utf8, true),
            Field::new("id", DataType::Int64, true),
        ])),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ],
    )
}

#[tokio::test]
async fn versioned_loads_upsert_delete_and_refuse_a_stale_base() -> TestResult {
    let mut fx = Fixture::new().await?;
    let target = fx.table("by_key");
    let schema = merge_schema();
    let keys = vec!["region".to_owned(), "id".to_owned()];
    // Without a primary key, so a null key can be stored and deleted.
    fx.admin
        .batch_execute(&format!(
            "CREATE SCHEMA \"{0}\"; CREATE TABLE \"{0}\".by_key \
             (region text, id bigint, name text, amount numeric(12,2))",
            fx.schema
        ))
        .await?;
    assert_eq!(fx.sink.loaded_version(&target).await?, None);
    let first = merge_batch(&[
        (Some("eu"), Some(1), Some("a"), Some(100)),
        (Some("us"), Some(2), Some("b"), Some(200)),
        (None, Some(3), Some("c"), Some(300)),
    ])?;
    let report = fx
        .sink
        .load_changes(
            &target,
            &schema,
            ok_stream(vec![first]),
            key_batch(&[])?,
            &keys,
            None,
            4,
        )
        .await?;
    assert_eq!(report.map(|r| r.inserted), Some(3));
    assert_eq!(fx.sink.loaded_version(&target).await?, Some(4));

    // From version 4 to 6: one row updated, one new, the null-region key deleted.
    let changes = merge_batch(&[
        (Some("eu"), Some(1), Some("a2"), Some(150)),
        (Some("eu"), Some(9), Some("z"), Some(900)),
    ])?;
    let report = fx
        .sink
        .load_changes(
            &target,
            &schema,
            ok_stream(vec![changes.clone()]),
            key_batch(&[(None, Some(3))])?,
            &keys,
            Some(4),
            6,
        )
        .await?
        .expect("the target holds version 4");
    assert_eq!((report.inserted, report.updated, report.deleted), (1, 1, 1));
    let select = format!(
        "SELECT region, id::text, name, amount::text FROM \"{}\".by_key ORDER BY id",
        fx.schema
    );
    let expected = vec![
        vec![
            Some("eu".into()),
            Some("1".into()),
            Some("a2".into()),
            Some("1.50".into()),
        ],
        vec![
            Some("us".into()),
            Some("2".into()),
            Some("b".into()),
            Some("2.00".into()),
        ],
        vec![
            Some("eu".into()),
            Some("9".into()),
            Some("z".into()),
            Some("9.00".into()),
        ],
    ];
    assert_eq!(fx.rows(&select).await?, expected);
    assert_eq!(fx.sink.loaded_version(&target).await?, Some(6));

    // Changes over a version the target does not hold change nothing.
    let stale = fx
        .sink
        .load_changes(
            &target,
            &schema,
            ok_stream(vec![changes]),
            key_batch(&[(Some("us"), Some(2))])?,
            &keys,
            Some(5),
            7,
        )
        .await?;
    assert_eq!(stale, None);
    assert_eq!(fx.rows(&select).await?, expected);
    assert_eq!(fx.sink.loaded_version(&target).await?, Some(6));
    fx.drop_schema().await
}
