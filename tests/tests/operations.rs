//! Operations through the public faces: one trace per run across the four processes (a real
//! OTLP receiver), Prometheus metrics, the coordinator's bearer token, and (mutual) TLS.

use std::{collections::BTreeSet, time::Duration};

use medallion_proto::v1 as pb;
use medallion_tests::{
    Cluster, ClusterOptions, Service, certs, metric_value, otlp::TraceCollector, postgres_url,
    scrape_metrics, succeeded, unique_name,
};

/// bronze.sales -> silver.sales (typed, one expectation) -> gold.revenue (loaded into PostgreSQL).
fn spec(name: &str, schema: &str) -> String {
    format!(
        r#"
name: {name}
defaults: {{ retries: 0 }}
sources:
  - name: sales
    format: csv
    path: sales/*.csv
silver:
  - name: sales
    from: bronze.sales
    columns:
      - {{ name: id, type: int64 }}
      - {{ name: region }}
      - {{ name: amount, type: "decimal(10,2)" }}
    expectations:
      - {{ name: positive_amount, expr: "amount > 0", action: drop }}
gold:
  - name: revenue
    from: silver.sales
    group_by: [region]
    aggregations:
      - {{ name: total, expr: "SUM(amount)" }}
    warehouse: {{ table: {schema}.revenue, mode: replace }}
warehouse:
  postgres: {{ url_env: MEDALLION_WAREHOUSE_URL, optional: true }}
"#
    )
}

const SALES: &str = "id,region,amount\n1,north,10.50\n2,south,4.00\n3,north,-1.00\n4,east,7.25\n";

async fn run_sales(cluster: &Cluster) -> pb::Run {
    let dir = cluster.data_dir().join("sales");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("sales.csv"), SALES).expect("fixture");
    let name = unique_name("ops");
    cluster.apply(&spec(&name, &name)).await.expect("apply");
    let (run, _) = cluster.run(&name, false).await.expect("run");
    assert!(succeeded(&run), "{run:?}");
    run
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_run_is_one_trace_across_the_four_services() {
    let collector = TraceCollector::start().await.expect("OTLP receiver");
    let cluster = Cluster::start_with(ClusterOptions {
        warehouse: Some(postgres_url()),
        env: collector.exporter_env(),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let run = run_sales(&cluster).await;

    // The run's root span names the run; its trace must hold the whole run.
    let is_root = |s: &medallion_tests::otlp::ExportedSpan| {
        s.attributes.get("medallion.run_id") == Some(&run.id) && s.parent_span_id.is_empty()
    };
    let wanted_services: BTreeSet<&str> = [
        "medallion-coordinator",
        "medallion-ingestor",
        "medallion-refiner",
        "medallion-aggregator",
    ]
    .into();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let spans = collector.spans();
        if let Some(root) = spans.iter().find(|s| is_root(s)) {
            let trace: Vec<_> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect();
            let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
            let loaded = trace.iter().any(|s| s.name == "warehouse.load");
            if services == wanted_services && loaded {
                break trace;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no complete trace for run {}; spans: {:#?}",
            run.id,
            spans
                .iter()
                .map(|s| format!(
                    "{} {} {} parent={}",
                    hex(&s.trace_id),
                    s.service,
                    s.name,
                    hex(&s.parent_span_id)
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Exactly one root, and every other span's parent is in the same trace.
    let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    let roots: Vec<_> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {roots:#?}");
    assert_eq!(roots[0].service, "medallion-coordinator");
    for s in &trace {
        assert!(
            s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_slice()),
            "span {} of {} has a parent outside the trace",
            s.name,
            s.service
        );
    }
    let find = |service: &str, name: &str| {
        trace
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .collect::<Vec<_>>()
    };
    let parent_of = |s: &medallion_tests::otlp::ExportedSpan| {
        trace
            .iter()
            .find(|p| p.span_id == s.parent_span_id)
            .cloned()
            .unwrap_or_else(|| panic!("{} has no parent", s.name))
    };

    // Coordinator: run -> task -> stage.run_task, which is the parent of the layer service's
    // RunTask server span.
    for table in ["bronze.sales", "silver.sales", "gold.revenue"] {
        let task = find("medallion-coordinator", &format!("task {table}"));
        assert_eq!(task.len(), 1, "task span of {table}");
        assert!(is_root(&parent_of(task[0])));
    }
    for (service, layer_task) in [
        ("medallion-ingestor", "bronze.sales"),
        ("medallion-refiner", "silver.sales"),
        ("medallion-aggregator", "gold.revenue"),
    ] {
        let rpc = find(service, "medallion.v1.StageService/RunTask");
        assert_eq!(rpc.len(), 1, "{service} RunTask span");
        let caller = parent_of(rpc[0]);
        assert_eq!(
            (caller.service.as_str(), caller.name.as_str()),
            ("medallion-coordinator", "stage.run_task")
        );
        assert_eq!(
            caller.attributes.get("table").map(String::as_str),
            Some(layer_task)
        );
        // The task inside the service, with its rows, and its Delta commit below it.
        let task = find(service, "task");
        assert_eq!(task.len(), 1, "{service} task span");
        assert_eq!(parent_of(task[0]).span_id, rpc[0].span_id);
        assert_eq!(task[0].attributes.get("medallion.run_id"), Some(&run.id));
        assert!(
            task[0].attributes.contains_key("rows"),
            "{:?}",
            task[0].attributes
        );
        let commit = find(service, "delta.commit");
        assert!(!commit.is_empty(), "{service} commit span");
    }
    // Flight reads on both ends: the reader's client span is the parent of the server's DoGet.
    for (reader, server) in [
        ("medallion-refiner", "medallion-ingestor"),
        ("medallion-aggregator", "medallion-refiner"),
    ] {
        let client = find(reader, "flight.do_get");
        assert!(!client.is_empty(), "{reader} flight.do_get");
        let served = find(server, "arrow.flight.protocol.FlightService/DoGet");
        assert!(!served.is_empty(), "{server} DoGet");
        for s in &served {
            let parent = parent_of(s);
            assert_eq!(
                (parent.service.as_str(), parent.name.as_str()),
                (reader, "flight.do_get")
            );
        }
    }
    let load = find("medallion-aggregator", "warehouse.load");
    assert_eq!(load.len(), 1);
    assert_eq!(
        load[0].attributes.get("rows").map(String::as_str),
        Some("3")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_serves_prometheus_metrics() {
    let cluster = Cluster::start_with(ClusterOptions {
        warehouse: Some(postgres_url()),
        metrics: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let run = run_sales(&cluster).await;
    let pipeline = run.pipeline.clone();

    let runs_label = format!("pipeline=\"{pipeline}\"");
    // (service, metric, label parts, expected value; None: any value above zero)
    let expected: Vec<(Service, &str, Vec<&str>, Option<f64>)> = vec![
        (
            Service::Ingestor,
            "medallion_rows_written_total",
            vec!["layer=\"bronze\"", "table=\"sales\""],
            Some(4.0),
        ),
        (
            Service::Ingestor,
            "medallion_flight_sent_bytes_total",
            vec!["table=\"sales\""],
            None,
        ),
        (
            Service::Refiner,
            "medallion_rows_written_total",
            vec!["layer=\"silver\""],
            Some(3.0),
        ),
        (
            Service::Refiner,
            "medallion_expectation_failed_rows_total",
            vec!["expectation=\"positive_amount\"", "action=\"drop\""],
            Some(1.0),
        ),
        (
            Service::Refiner,
            "medallion_task_duration_seconds_count",
            vec!["layer=\"silver\"", "outcome=\"succeeded\""],
            Some(1.0),
        ),
        (
            Service::Refiner,
            "medallion_flight_received_bytes_total",
            vec!["layer=\"bronze\""],
            None,
        ),
        (
            Service::Aggregator,
            "medallion_warehouse_rows_total",
            vec!["table=\"gold.revenue\""],
            Some(3.0),
        ),
        (
            Service::Aggregator,
            "medallion_warehouse_load_seconds_count",
            vec![],
            Some(1.0),
        ),
        (
            Service::Coordinator,
            "medallion_runs_total",
            vec![runs_label.as_str(), "outcome=\"succeeded\""],
            Some(1.0),
        ),
    ];
    for (service, metric, labels, want) in expected {
        let text = scrape_metrics(&cluster.metrics_addr(service))
            .await
            .unwrap_or_else(|e| panic!("{service:?} metrics: {e}"));
        let got = metric_value(&text, metric, &labels);
        match want {
            Some(v) => assert_eq!(got, Some(v), "{service:?} {metric} {labels:?}:\n{text}"),
            None => assert!(
                got.is_some_and(|b| b > 0.0),
                "{service:?} {metric} {labels:?}:\n{text}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_api_requires_the_bearer_token() {
    let token = "s3cret-token-value";
    let cluster = Cluster::start_with(ClusterOptions {
        api_token: Some(token.into()),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let channel = cluster
        .channel(Service::Coordinator)
        .await
        .expect("channel");
    let mut anonymous = pb::pipeline_service_client::PipelineServiceClient::new(channel.clone());
    let denied = anonymous
        .list_pipelines(pb::ListPipelinesRequest {})
        .await
        .expect_err("a call without a token is refused");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{denied:?}");

    let mut wrong = tonic::Request::new(pb::ListPipelinesRequest {});
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-the-token".parse().expect("ascii"),
    );
    let denied = anonymous
        .list_pipelines(wrong)
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{denied:?}");

    // Health stays open for probes; the right token works.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token");
    let run = run_sales(&cluster).await;
    assert!(succeeded(&run));

    for s in [
        Service::Coordinator,
        Service::Ingestor,
        Service::Refiner,
        Service::Aggregator,
    ] {
        assert!(!cluster.log(s).contains(token), "{s:?} logged the token");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_between_every_service() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tls = certs::generate(tmp.path(), true).expect("certificates");
    let cluster = Cluster::start_with(ClusterOptions {
        tls: Some(tls.clone()),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    // The whole pipeline runs over TLS, every service presenting its certificate.
    let dir = cluster.data_dir().join("sales");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("sales.csv"), SALES).expect("fixture");
    let name = unique_name("tls");
    cluster
        .apply(&spec(&name, &name))
        .await
        .expect("apply over TLS");
    let (run, _) = cluster.run(&name, false).await.expect("run over TLS");
    assert!(succeeded(&run), "{run:?}");
    let gold = cluster
        .read("gold.revenue")
        .await
        .expect("read gold over TLS");
    assert_eq!(medallion_tests::values::rows(&gold), 3);

    // A client that trusts the CA but has no certificate cannot reach a layer service.
    medallion_server::install_crypto_provider();
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&tls.ca).expect("ca"));
    let no_cert = tonic::transport::Channel::from_shared(cluster.url(Service::Refiner))
        .expect("url")
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))
        .expect("tls config");
    let refused = async {
        let channel = no_cert.connect().await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through"
    );

    // Plain HTTP/2 is refused too.
    let plain = cluster.url(Service::Refiner).replace("https://", "http://");
    let refused = async {
        let channel = tonic::transport::Channel::from_shared(plain)?
            .connect()
            .await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(refused.is_err(), "a plaintext client got through");
}

async fn revision(cluster: &Cluster, name: &str) -> u64 {
    let mut client = cluster.client().await.expect("client");
    client
        .get_pipeline(pb::GetPipelineRequest { name: name.into() })
        .await
        .expect("the folder's pipeline is applied")
        .into_inner()
        .revision
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_applies_its_pipelines_folder_at_start() {
    // Specs as a mounted ConfigMap gives them: one folder, sources relative to it.
    let specs = tempfile::tempdir().expect("tmp");
    let name = unique_name("folder");
    std::fs::write(
        specs.path().join(format!("{name}.yaml")),
        spec(&name, &name),
    )
    .expect("spec");
    std::fs::create_dir_all(specs.path().join("sales")).expect("mkdir");
    std::fs::write(specs.path().join("sales").join("sales.csv"), SALES).expect("fixture");
    let mut cluster = Cluster::start_with(ClusterOptions {
        env: vec![(
            "MEDALLION_PIPELINES_DIR".into(),
            specs.path().display().to_string(),
        )],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    assert_eq!(revision(&cluster, &name).await, 1);
    let (run, _) = cluster.run(&name, false).await.expect("run");
    assert!(succeeded(&run), "{run:?}");

    // A restart with the same folder keeps the revision.
    cluster.kill(Service::Coordinator).await;
    cluster
        .restart(Service::Coordinator)
        .await
        .expect("restart");
    assert_eq!(revision(&cluster, &name).await, 1);

    // A bad spec in the folder stops the start, naming the file.
    let bad = tempfile::tempdir().expect("tmp");
    std::fs::write(bad.path().join("broken.yaml"), "name: broken\nsilver: 3\n").expect("spec");
    let output =
        tokio::process::Command::new(medallion_tests::bin_dir().join("medallion-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--pipelines-dir"])
            .arg(bad.path())
            .arg("--state-dir")
            .arg(bad.path().join("state"))
            .output()
            .await
            .expect("coordinator");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.yaml"), "{stderr}");
}
