//! The coordinator's guarantees: runs survive a coordinator crash (resumed on restart),
//! cancellation reaches the running task, schedules fire without overlapping, one run at a time.

use std::time::Duration;

use medallion_proto::v1::{self as pb, run_event::Event};
use medallion_tests::{Cluster, Service, reference, succeeded, task, wait_for_event};

/// A cluster with TPC-H data (lineitem and orders) and examples/tpch.yaml applied.
async fn tpch_cluster(scale_factor: f64) -> Cluster {
    let cluster = Cluster::start(None).await.expect("cluster");
    Cluster::gen_tpch(&cluster.data_dir(), scale_factor, 1)
        .await
        .expect("generate");
    let spec =
        std::fs::read_to_string(medallion_tests::workspace_root().join("examples/tpch.yaml"))
            .expect("spec");
    cluster.apply(&spec).await.expect("apply");
    cluster
}

#[tokio::test(flavor = "multi_thread")]
async fn run_interrupted_by_coordinator_crash_is_resumed() {
    let mut cluster = tpch_cluster(0.05).await;
    let (run_id, mut events) = cluster.start_run("tpch").await.expect("start run");
    wait_for_event(&mut events, "silver.lineitem", |e| {
        matches!(e, Event::TaskStarted(_))
    })
    .await;
    cluster.kill(Service::Coordinator).await;
    cluster
        .restart(Service::Coordinator)
        .await
        .expect("restart coordinator");

    let (run, _) = cluster
        .follow(&run_id)
        .await
        .expect("follow the resumed run");
    assert!(succeeded(&run), "resumed run: {run:?}");
    let expected = reference::compute(&cluster.data_dir().join("data")).expect("reference");
    let bronze = task(&run, "bronze.lineitem")
        .manifest
        .as_ref()
        .expect("manifest");
    assert_eq!(
        bronze.table_rows as usize, expected.lineitems,
        "bronze rows after resume (no duplicates)"
    );
    let silver = task(&run, "silver.lineitem")
        .manifest
        .as_ref()
        .expect("manifest");
    assert_eq!(silver.table_rows as usize, expected.lineitems);

    let mut client = cluster.client().await.expect("client");
    let pipelines = client
        .list_pipelines(pb::ListPipelinesRequest {})
        .await
        .expect("list")
        .into_inner()
        .pipelines;
    assert_eq!(
        pipelines
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["tpch"],
        "pipelines survive a restart"
    );
    let runs = client
        .list_runs(pb::ListRunsRequest {
            pipeline: "tpch".into(),
            limit: 10,
        })
        .await
        .expect("runs")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "run history survives a restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_running_task_and_one_run_at_a_time() {
    let cluster = tpch_cluster(0.05).await;
    let (run_id, mut events) = cluster.start_run("tpch").await.expect("start run");
    let second = cluster
        .start_run("tpch")
        .await
        .expect_err("a second run while one is going");
    assert_eq!(second.code(), tonic::Code::FailedPrecondition, "{second:?}");
    wait_for_event(&mut events, "silver.lineitem", |e| {
        matches!(e, Event::TaskStarted(_))
    })
    .await;
    let mut client = cluster.client().await.expect("client");
    client
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .expect("cancel");
    let (run, _) = cluster.follow(&run_id).await.expect("follow");
    assert_eq!(run.state, pb::RunState::Cancelled as i32, "{run:?}");
    let silver = task(&run, "silver.lineitem");
    assert_eq!(
        silver.state,
        pb::TaskState::Cancelled as i32,
        "the running task was not cancelled: {silver:?}"
    );
    assert!(
        silver.manifest.is_none(),
        "a cancelled task reported a commit"
    );
    for gold in ["gold.pricing_summary", "gold.monthly_revenue"] {
        let t = task(&run, gold);
        assert_eq!(
            t.state,
            pb::TaskState::Cancelled as i32,
            "{gold} should not run after a cancel: {:#?}",
            run.tasks
        );
        assert_eq!(t.attempts, 0, "{gold} started after the cancel");
    }
    // The pipeline is free again.
    let (run, _) = cluster.run("tpch", false).await.expect("run after cancel");
    assert!(succeeded(&run), "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_fires_without_overlapping_runs() {
    let cluster = Cluster::start(None).await.expect("cluster");
    std::fs::create_dir_all(cluster.data_dir()).expect("mkdir");
    std::fs::write(cluster.data_dir().join("ticks.csv"), "n\n1\n2\n").expect("fixture");
    let spec = "name: ticker\nschedule: \"*/2 * * * * *\"\nsources:\n  - { name: ticks, format: csv, path: ticks.csv }\n";
    cluster.apply(spec).await.expect("apply");
    let mut client = cluster.client().await.expect("client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let runs = client
            .list_runs(pb::ListRunsRequest {
                pipeline: "ticker".into(),
                limit: 50,
            })
            .await
            .expect("runs")
            .into_inner()
            .runs;
        let finished = runs.iter().filter(|r| r.finished_at_ms > 0).count();
        if finished >= 3 {
            break runs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "schedule did not fire 3 runs in 60s: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Stop the schedule before checking: a re-applied spec without it, then the pipeline deleted.
    cluster
        .apply("name: ticker\nsources:\n  - { name: ticks, format: csv, path: ticks.csv }\n")
        .await
        .expect("unschedule");
    let p = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "ticker".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!((p.revision, p.schedule.as_str()), (2, ""));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client
        .delete_pipeline(pb::DeletePipelineRequest {
            name: "ticker".into(),
        })
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not delete the pipeline"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // a last scheduled run may be finishing
    }
    let gone = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "ticker".into(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let mut finished: Vec<&pb::Run> = runs.iter().filter(|r| r.finished_at_ms > 0).collect();
    finished.sort_by_key(|r| r.created_at_ms);
    for r in &finished {
        assert_eq!(r.trigger, "schedule");
        assert!(succeeded(r), "{r:?}");
    }
    for pair in finished.windows(2) {
        assert!(
            pair[1].created_at_ms >= pair[0].finished_at_ms,
            "scheduled runs overlapped: {pair:?}"
        );
    }
}
