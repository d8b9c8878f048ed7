//! Clients outside the project: pyarrow.flight reads a gold table from the aggregator, and a
//! generic gRPC client uses server reflection to call health and ListPipelines.

use medallion_tests::{Cluster, Service, succeeded, values};

const SPEC: &str = r#"
name: sales
sources:
  - { name: sales, format: csv, path: sales.csv }
silver:
  - name: sales
    from: bronze.sales
    columns:
      - { name: region }
      - { name: amount, type: "decimal(12,2)" }
gold:
  - name: sales_by_region
    from: silver.sales
    group_by: [region]
    aggregations:
      - { name: total, expr: "SUM(amount)" }
"#;

/// The Python interpreter with the packages of tests/python/requirements.txt.
fn python() -> String {
    std::env::var("MEDALLION_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn pyarrow_flight_and_grpc_reflection_clients() {
    let cluster = Cluster::start(None).await.expect("cluster");
    std::fs::create_dir_all(cluster.data_dir()).expect("mkdir");
    std::fs::write(
        cluster.data_dir().join("sales.csv"),
        "region,amount\neu,10.50\nus,3.25\neu,1.25\n",
    )
    .expect("fixture");
    cluster.apply(SPEC).await.expect("apply");
    let (run, _) = cluster.run("sales", false).await.expect("run");
    assert!(succeeded(&run), "{run:?}");
    let gold = cluster
        .read("gold.sales_by_region")
        .await
        .expect("read gold");

    let host = |s: Service| cluster.url(s).trim_start_matches("http://").to_string();
    let script = medallion_tests::workspace_root().join("tests/python/external_clients.py");
    let output = tokio::process::Command::new(python())
        .arg(&script)
        .args(["--coordinator", &host(Service::Coordinator), "--aggregator", &host(Service::Aggregator)])
        .args(["--table", "gold.sales_by_region"])
        .output()
        .await
        .expect("run python (set MEDALLION_TEST_PYTHON to an interpreter with tests/python/requirements.txt)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    assert_eq!(report["rows"].as_u64(), Some(values::rows(&gold) as u64));
    assert_eq!(report["columns"], serde_json::json!(["region", "total"]));
    assert_eq!(report["first"]["region"], "eu");
    assert_eq!(report["first"]["total"], "11.75");
    assert_eq!(
        report["listed"],
        serde_json::json!(["gold.sales_by_region"]),
        "ListFlights"
    );
    assert_eq!(report["health"].as_i64(), Some(1), "health status SERVING");
    assert_eq!(report["pipelines"], serde_json::json!(["sales"]));
}
