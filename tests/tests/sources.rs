//! Source formats land in bronze as read, and a source file delivered again with new content
//! replaces its old rows instead of adding to them.

use std::sync::Arc;

use arrow::{
    array::{Array, AsArray, Int64Array, StringArray},
    datatypes::{DataType, Field, Schema},
    record_batch::RecordBatch,
};
use medallion_tests::{Cluster, succeeded, task, values};

const SPEC: &str = r#"
name: formats
sources:
  - { name: a_csv, format: csv, path: a }
  - { name: b_ndjson, format: ndjson, path: b.ndjson }
  - { name: c_json, format: json, path: c.json }
  - { name: d_parquet, format: parquet, path: "d/*.parquet" }
"#;

fn write_parquet(path: &std::path::Path) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(StringArray::from(vec![Some("x"), None, Some("z")])),
        ],
    )
    .expect("batch");
    let file = std::fs::File::create(path).expect("create parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn formats_land_and_changed_files_replace_their_rows() {
    let cluster = Cluster::start(None).await.expect("cluster");
    let dir = cluster.data_dir();
    std::fs::create_dir_all(dir.join("a")).expect("mkdir");
    std::fs::create_dir_all(dir.join("d")).expect("mkdir");
    std::fs::write(dir.join("a/x.csv"), "id,name\n1,one\n2,two\n").expect("csv");
    std::fs::write(
        dir.join("b.ndjson"),
        "{\"id\": 1, \"tags\": \"a\"}\n{\"id\": 2, \"tags\": null}\n",
    )
    .expect("ndjson");
    std::fs::write(
        dir.join("c.json"),
        "[{\"id\": 1, \"ok\": true}, {\"id\": 2, \"ok\": false}]",
    )
    .expect("json");
    write_parquet(&dir.join("d/part.parquet"));
    cluster.apply(SPEC).await.expect("apply");

    let (run, _) = cluster.run("formats", false).await.expect("run 1");
    assert!(succeeded(&run), "{run:?}");
    for (table, rows) in [
        ("bronze.a_csv", 2),
        ("bronze.b_ndjson", 2),
        ("bronze.c_json", 2),
        ("bronze.d_parquet", 3),
    ] {
        let batches = cluster.read(table).await.expect("read");
        assert_eq!(values::rows(&batches), rows, "{table}");
        let schema = batches[0].schema();
        for lineage in [
            "_source_file",
            "_source_modified",
            "_ingested_at",
            "_run_id",
        ] {
            assert!(
                schema.field_with_name(lineage).is_ok(),
                "{table} lacks {lineage}"
            );
        }
    }
    let csv = cluster.read("bronze.a_csv").await.expect("read");
    assert_eq!(
        csv[0]
            .schema()
            .field_with_name("id")
            .expect("id")
            .data_type(),
        &DataType::Utf8,
        "CSV columns are strings"
    );
    let parquet = cluster.read("bronze.d_parquet").await.expect("read");
    assert_eq!(
        parquet[0]
            .schema()
            .field_with_name("id")
            .expect("id")
            .data_type(),
        &DataType::Int64,
        "parquet keeps its types"
    );
    assert_eq!(values::string(&parquet[0], "name", 1), None);

    // x.csv is delivered again with other rows; y.csv is new.
    std::fs::write(dir.join("a/x.csv"), "id,name\n1,uno\n2,dos\n3,tres\n").expect("csv");
    std::fs::write(dir.join("a/y.csv"), "id,name\n9,nine\n").expect("csv");
    let (run, _) = cluster.run("formats", false).await.expect("run 2");
    assert!(succeeded(&run), "{run:?}");
    let a = task(&run, "bronze.a_csv")
        .manifest
        .as_ref()
        .expect("manifest");
    assert_eq!(a.source_files.len(), 2, "{:?}", a.source_files);
    assert_eq!(
        a.table_rows, 4,
        "the old rows of x.csv are replaced, not kept"
    );
    assert!(
        !task(&run, "bronze.b_ndjson")
            .manifest
            .as_ref()
            .expect("m")
            .committed
    );
    let batches = cluster.read("bronze.a_csv").await.expect("read");
    let mut names: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| values::string(b, "name", r).unwrap_or_default())
        })
        .collect();
    names.sort();
    assert_eq!(names, ["dos", "nine", "tres", "uno"]);
}

/// Text dates and times in a declared `format` are read in that format: `03/02/2024` is the
/// 2nd of March when the spec says month first (inference would read it day first).
#[tokio::test(flavor = "multi_thread")]
async fn text_dates_and_times_are_read_in_the_declared_format() {
    const DATES: &str = r#"
name: dates
sources:
  - { name: visits, format: csv, path: visits.csv }
silver:
  - name: visits
    from: bronze.visits
    columns:
      - { name: id, type: int64 }
      - { name: day, type: date, format: "%m/%d/%Y" }
      - { name: at, type: timestamp, format: "%m/%d/%Y %H:%M" }
"#;
    let cluster = Cluster::start(None).await.expect("cluster");
    std::fs::create_dir_all(cluster.data_dir()).expect("mkdir");
    std::fs::write(
        cluster.data_dir().join("visits.csv"),
        "id,day,at\n1,01/31/2024,01/31/2024 23:05\n2,03/02/2024,03/02/2024 07:00\n3,,\n",
    )
    .expect("csv");
    cluster.apply(DATES).await.expect("apply");
    let (run, _) = cluster.run("dates", false).await.expect("run");
    assert!(succeeded(&run), "{run:?}");

    let batches = cluster.read("silver.visits").await.expect("read");
    let mut rows = Vec::new();
    for batch in &batches {
        let text = |name: &str| {
            let column = batch.column_by_name(name).expect("column");
            arrow::compute::cast(column, &DataType::Utf8).expect("as text")
        };
        let (day, at) = (text("day"), text("at"));
        let (day, at) = (day.as_string::<i32>(), at.as_string::<i32>());
        for row in 0..batch.num_rows() {
            let value =
                |a: &arrow::array::StringArray| a.is_valid(row).then(|| a.value(row).to_string());
            rows.push((values::int(batch, "id", row), value(day), value(at)));
        }
    }
    rows.sort();
    assert_eq!(
        rows,
        [
            (
                1,
                Some("2024-01-31".into()),
                Some("2024-01-31T23:05:00Z".into())
            ),
            (
                2,
                Some("2024-03-02".into()),
                Some("2024-03-02T07:00:00Z".into())
            ),
            (3, None, None),
        ]
    );
}
