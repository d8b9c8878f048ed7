use crate::{Layer, Pipeline, TableRef};

const BASE: &str = r#"
name: shop
sources:
  - name: orders
    format: csv
    path: data/orders.csv
    columns: [id, customer, amount, day]
silver:
  - name: orders
    from: bronze.orders
    columns:
      - { name: id, type: int64 }
      - { name: amount, type: "decimal(12,2)" }
      - { name: day, type: date }
    expectations:
      - { name: positive, expr: "amount > 0", action: drop }
    dedupe: { keys: [id] }
  - name: big_orders
    from: silver.orders
    filter: "amount > 100"
gold:
  - name: daily
    from: silver.orders
    group_by: [day]
    aggregations:
      - { name: total, expr: "sum(amount)" }
  - name: big
    sql: SELECT count(*) AS n FROM big_orders
"#;

fn err(yaml: &str) -> crate::SpecError {
    match Pipeline::parse(yaml) {
        Ok(_) => panic!("spec should be rejected"),
        Err(e) => e,
    }
}

#[test]
fn dag_is_in_dependency_order() {
    let p = Pipeline::parse(BASE).expect("valid spec");
    let names: Vec<String> = p.dag.nodes.iter().map(|n| n.table.to_string()).collect();
    assert_eq!(
        names,
        [
            "bronze.orders",
            "silver.orders",
            "silver.big_orders",
            "gold.daily",
            "gold.big"
        ]
    );
    let big = p
        .dag
        .node(&TableRef::new(Layer::Gold, "big"))
        .expect("node");
    assert_eq!(
        big.depends_on,
        vec![TableRef::new(Layer::Silver, "big_orders")]
    );
    let upstream = p.dag.with_upstream(&[TableRef::new(Layer::Gold, "daily")]);
    assert_eq!(upstream.len(), 3);
}

#[test]
fn unknown_column_names_the_field_path() {
    let e = err(&BASE.replace("expr: \"amount > 0\"", "expr: \"amont > 0\""));
    assert_eq!(e.path, "silver[0].expectations[0].expr");
    assert!(e.message.contains("amont"), "{e}");
}

#[test]
fn unknown_table_is_rejected() {
    let e = err(&BASE.replace("FROM big_orders", "FROM nowhere"));
    assert_eq!(e.path, "gold[1].sql");
    assert!(e.message.contains("nowhere"), "{e}");
    let e = err(&BASE.replace(
        "from: silver.orders\n    filter",
        "from: silver.missing\n    filter",
    ));
    assert_eq!(e.path, "silver[1].from");
}

#[test]
fn cycles_are_rejected() {
    let yaml = BASE
        .replace("from: bronze.orders", "from: silver.big_orders")
        .replace("dedupe: { keys: [id] }", "");
    let e = err(&yaml);
    assert!(e.message.contains("cycle"), "{e}");
}

#[test]
fn yaml_type_errors_carry_the_path() {
    let e = err(&BASE.replace("type: \"decimal(12,2)\"", "type: \"decimal(50,2)\""));
    assert_eq!(e.path, "silver[0].columns[1].type");
    let e = err(&BASE.replace("action: drop", "action: explode"));
    assert_eq!(e.path, "silver[0].expectations[0].action");
}

#[test]
fn group_by_form_becomes_sql() {
    let p = Pipeline::parse(BASE).expect("valid spec");
    let q = p.gold("daily").expect("gold").query();
    assert_eq!(
        q,
        "SELECT \"day\", sum(amount) AS \"total\" FROM \"orders\" GROUP BY \"day\" ORDER BY \"day\""
    );
}

#[test]
fn columns_read_are_what_a_table_uses() {
    let p = Pipeline::parse(BASE).expect("valid spec");
    let silver = TableRef::new(Layer::Silver, "orders");
    let bronze = TableRef::new(Layer::Bronze, "orders");
    assert_eq!(
        p.columns_read(&silver, &bronze),
        Some(vec!["amount".into(), "day".into(), "id".into()])
    );
    let big = TableRef::new(Layer::Silver, "big_orders");
    assert_eq!(
        p.columns_read(&big, &silver),
        None,
        "no `columns`: reads everything"
    );
    let daily = TableRef::new(Layer::Gold, "daily");
    assert_eq!(
        p.columns_read(&daily, &silver),
        Some(vec!["amount".into(), "day".into()])
    );
    assert_eq!(
        crate::sql_column_references("SELECT * FROM t").expect("sql"),
        None
    );
    let used = crate::sql_column_references(
        "WITH x AS (SELECT a, b * 2 AS c FROM t) SELECT count(*), sum(c) FROM x",
    )
    .expect("sql")
    .expect("columns");
    assert!(used.contains("a") && used.contains("b"), "{used:?}");
}

#[test]
fn row_local_expressions_are_told_apart() {
    for expr in [
        "l_quantity > 0",
        "substr(o_orderdate, 1, 7)",
        "CASE WHEN a IS NULL THEN 0 ELSE CAST(a AS INT) END",
        "upper(trim(name)) || '-' || coalesce(code, '?')",
    ] {
        assert!(crate::is_row_local(expr), "{expr} is row-local");
    }
    for expr in [
        "sum(x)",
        "x - avg(x) OVER ()",
        "row_number() OVER (ORDER BY x)",
        "x IN (SELECT y FROM t)",
        "my_udf(x)",
        "not sql at all (",
    ] {
        assert!(!crate::is_row_local(expr), "{expr} is not row-local");
    }
}

const HTTP: &str = r#"
name: api
sources:
  - name: tickets
    format: http-json
    http:
      url: https://api.example.com/tickets
      records: data
      pagination: { cursor_param: after, cursor_path: meta.next }
      incremental: { field: updated_at, param: since }
"#;

#[test]
fn http_sources_are_checked_with_their_field_paths() {
    let p = Pipeline::parse(HTTP).expect("valid http source");
    let http = p.spec.sources[0].http.as_ref().expect("http block");
    assert_eq!(
        (http.method.as_str(), http.retries, http.timeout_secs),
        ("GET", 5, 30)
    );
    let e = err(&HTTP.replace("    http:\n", "    path: x\n    http:\n"));
    assert_eq!(e.path, "sources[0].path");
    let e = err(&HTTP.replace("https://api", "ftp://api"));
    assert_eq!(e.path, "sources[0].http.url");
    let e = err(&HTTP.replace(
        "cursor_param: after, cursor_path: meta.next",
        "page_param: p, next_link: next",
    ));
    assert_eq!(e.path, "sources[0].http.pagination");
    let e = err(&HTTP.replace("cursor_path: meta.next", "cursor_path: \"\""));
    assert_eq!(e.path, "sources[0].http.pagination");
    let e = err(&HTTP.replace(
        "records: data",
        "records: data\n      rate_limit_per_sec: 0",
    ));
    assert_eq!(e.path, "sources[0].http.rate_limit_per_sec");
    let e = err("name: a\nsources:\n  - { name: t, format: http-json }\n");
    assert_eq!(e.path, "sources[0].http");
    let e = err(
        "name: a\nsources:\n  - { name: t, format: csv, path: x, http: { url: \"https://x\" } }\n",
    );
    assert_eq!(e.path, "sources[0].http");
}

#[test]
fn redshift_warehouses_need_a_target_and_an_s3_staging_prefix() {
    let with = |redshift: &str| {
        format!(
            "{BASE}warehouse:\n  redshift: {{ database: dev, iam_role: arn:aws:iam::1:role/r, {redshift} }}\n"
        )
    };
    let ok = Pipeline::parse(&with("cluster_id: c, db_user: u, staging: \"s3://b/p/\""));
    assert!(ok.is_ok(), "{:?}", ok.err());
    assert!(Pipeline::parse(&with("workgroup: wg, staging: \"s3://b/p/\"")).is_ok());
    let e = err(&with(
        "cluster_id: c, workgroup: w, db_user: u, staging: \"s3://b/p/\"",
    ));
    assert_eq!(e.path, "warehouse.redshift");
    let e = err(&with("cluster_id: c, staging: \"s3://b/p/\""));
    assert!(e.message.contains("db_user"), "{e}");
    let e = err(&with("workgroup: wg, db_user: u, staging: \"s3://b/p/\""));
    assert_eq!(e.path, "warehouse.redshift.db_user");
    let e = err(&with("cluster_id: c, db_user: u, staging: /tmp/x"));
    assert_eq!(e.path, "warehouse.redshift.staging");
    let e = err(&format!(
        "{BASE}warehouse:\n  postgres: {{ url: \"postgres://x\" }}\n  redshift: {{ database: dev, iam_role: r, cluster_id: c, db_user: u, staging: \"s3://b/\" }}\n"
    ));
    assert_eq!(e.path, "warehouse");
}

#[test]
fn kafka_sources_need_brokers_and_topics() {
    let yaml = |kafka: &str| {
        format!(
            "name: cdc\nsources:\n  - name: c\n    format: kafka-debezium\n    kafka: {kafka}\n"
        )
    };
    let ok = Pipeline::parse(&yaml("{ brokers: \"127.0.0.1:9092\", topics: [a.b.c] }"))
        .expect("valid kafka source");
    let kafka = ok.spec.sources[0].kafka.as_ref().expect("kafka block");
    assert_eq!((kafka.max_batch_rows, kafka.idle_ms), (100_000, 1_000));
    let e = err(&yaml("{ brokers: \"127.0.0.1:9092\", topics: [] }"));
    assert_eq!(e.path, "sources[0].kafka.topics");
    let e = err(&yaml("{ brokers: \" \", topics: [t] }"));
    assert_eq!(e.path, "sources[0].kafka.brokers");
    let e = err("name: cdc\nsources:\n  - { name: c, format: kafka-debezium }\n");
    assert_eq!(e.path, "sources[0].kafka");
}

#[test]
fn apply_changes_tables_read_change_sources_with_columns_from_the_images() {
    let yaml = |silver: &str| {
        format!(
            "name: cdc\nsources:\n  - {{ name: c, format: kafka-debezium, kafka: {{ brokers: b, topics: [t] }} }}\n  - {{ name: f, format: csv, path: x.csv }}\nsilver:\n{silver}\ngold:\n  - {{ name: g, sql: \"SELECT count(*) AS n, max(__sequence) AS s FROM cur\" }}\n"
        )
    };
    let ok = Pipeline::parse(&yaml(
        "  - { name: cur, from: bronze.c, apply_changes: { stored_as: scd2, track_history_on: [email] }, columns: [{ name: id, type: int64 }, { name: email, type: string }] }",
    ))
    .expect("valid apply_changes table");
    let apply = ok.spec.silver[0].apply_changes.as_ref().expect("apply");
    assert_eq!((apply.stored_as, apply.buckets), (crate::ScdType::Scd2, 16));
    // Bronze is read as its change columns, whatever the silver columns are named.
    let read = ok
        .columns_read(
            &TableRef::new(Layer::Silver, "cur"),
            &TableRef::new(Layer::Bronze, "c"),
        )
        .expect("columns");
    assert!(read.contains(&"after".to_string()) && !read.contains(&"email".to_string()));
    // A column without a type takes it from the Debezium schema of the events.
    Pipeline::parse(&yaml(
        "  - { name: cur, from: bronze.c, apply_changes: {}, columns: [{ name: id }, { name: email, type: string }] }",
    ))
    .expect("untyped apply_changes column");

    for (silver, path) in [
        (
            "  - { name: cur, from: bronze.f, apply_changes: {}, columns: [{ name: id, type: int64 }] }",
            "silver[0].from",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: {}, columns: [{ name: __id, type: int64 }] }",
            "silver[0].columns[0].name",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: {}, filter: 'id > 0', columns: [{ name: id, type: int64 }] }",
            "silver[0].filter",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: { track_history_on: [id] }, columns: [{ name: id, type: int64 }] }",
            "silver[0].apply_changes.track_history_on",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: { stored_as: scd2, track_history_on: [nope] }, columns: [{ name: id, type: int64 }] }",
            "silver[0].apply_changes.track_history_on[0]",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: { buckets: 0 }, columns: [{ name: id, type: int64 }] }",
            "silver[0].apply_changes.buckets",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: {} }",
            "silver[0].columns",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: {}, columns: [] }",
            "silver[0].columns",
        ),
        (
            "  - { name: cur, from: bronze.c, apply_changes: { stored_as: scd2, track_history_on: [] }, columns: [{ name: id, type: int64 }] }",
            "silver[0].apply_changes.track_history_on",
        ),
    ] {
        assert_eq!(err(&yaml(silver)).path, path, "{silver}");
    }
}

#[test]
fn streaming_pipelines_take_no_schedule() {
    let base =
        "sources:\n  - { name: c, format: kafka-debezium, kafka: { brokers: b, topics: [t] } }\n";
    let ok = Pipeline::parse(&format!("name: s\nmode: streaming\n{base}")).expect("streaming");
    assert_eq!(ok.spec.mode, crate::PipelineMode::Streaming);
    let e = err(&format!(
        "name: s\nmode: streaming\nschedule: '0 * * * * *'\n{base}"
    ));
    assert_eq!(e.path, "schedule");
}

#[test]
fn time_formats_are_checked_where_declared() {
    let with_format = |column: &str, format: &str| {
        BASE.replace(
            &format!("{{ name: {column}, type:"),
            &format!("{{ name: {column}, format: \"{format}\", type:"),
        )
    };
    let p = Pipeline::parse(&with_format("day", "%d/%m/%Y")).expect("a date format");
    let day = &p
        .silver("orders")
        .expect("silver.orders")
        .columns
        .as_ref()
        .expect("columns")[2];
    assert_eq!(day.format.as_deref(), Some("%d/%m/%Y"));

    let e = err(&with_format("id", "%Y"));
    assert_eq!(e.path, "silver[0].columns[0].format");
    assert!(e.message.contains("`date` or `timestamp`"), "{e}");
    let e = err(&with_format("day", "%Y-%Q"));
    assert_eq!(e.path, "silver[0].columns[2].format");
    assert!(e.message.contains("%Y-%Q"), "{e}");
    for bad in [" ", "%m/%d", "%Y-%m-%d %H", "%Y-%m-%d %H:%M %Z", "%Y %I:%M"] {
        let e = err(&with_format("day", bad));
        assert_eq!(e.path, "silver[0].columns[2].format", "{bad}: {e}");
    }
    Pipeline::parse(&with_format("day", "%Y-%m-%d %I:%M %p %z")).expect("a timestamp format");
}

#[test]
fn columns_without_a_format_serialise_as_before() {
    // A table's definition fingerprint is its serialised spec: tables without `format`
    // must not change theirs.
    let p = Pipeline::parse(BASE).expect("valid spec");
    let json = serde_json::to_string(p.silver("orders").expect("silver.orders")).expect("json");
    assert!(!json.contains("format"), "{json}");
}
