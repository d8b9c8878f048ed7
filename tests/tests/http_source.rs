//! The `http-json` source against a local API: pages, a 429 with Retry-After and a 500 are
//! ridden out; a page that is not JSON fails the run with the URL and page and commits nothing;
//! the incremental cursor, stored with the bronze commit, survives the failed run, so the next
//! run neither skips nor repeats a record.

use medallion_tests::api::{Api, TOKEN, Ticket};
use medallion_tests::{Cluster, ClusterOptions, succeeded, task, values};

fn ticket(id: i64, status: &str, day: u32) -> Ticket {
    Ticket {
        id,
        status: status.into(),
        updated_at: format!("2026-11-{day:02}T10:00:00Z"),
    }
}

fn spec(url: &str) -> String {
    format!(
        r#"
name: api
sources:
  - name: tickets
    format: http-json
    http:
      url: {url}
      headers: {{ Authorization: "Bearer ${{TICKETS_TOKEN}}" }}
      records: data.items
      pagination: {{ page_param: page, limit_param: per_page, limit: 2 }}
      rate_limit_per_sec: 100
      retries: 3
      timeout_secs: 5
      incremental: {{ field: updated_at, param: updated_since }}
"#
    )
}

/// Bronze rows as (id, status, updated_at), sorted.
async fn bronze(cluster: &Cluster) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for b in cluster.read("bronze.tickets").await.expect("read") {
        for r in 0..b.num_rows() {
            rows.push((
                values::string(&b, "id", r).expect("id"),
                values::string(&b, "status", r).expect("status"),
                values::string(&b, "updated_at", r).expect("updated_at"),
            ));
        }
    }
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_pages_retries_and_keeps_its_cursor_across_a_failed_run() {
    let api = Api::start().await.expect("api");
    {
        let mut s = api.state.lock().expect("state");
        s.tickets = (1..=5).map(|i| ticket(i, "open", i as u32)).collect();
        s.throttle_next = 1;
        s.fail_page_once = Some(2);
    }
    let cluster = Cluster::start_with(ClusterOptions {
        env: vec![("TICKETS_TOKEN".into(), TOKEN.into())],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    cluster.apply(&spec(&api.url)).await.expect("apply");

    // Run 1: three pages of 2, 2 and 1 records, after a 429 and a 500.
    let (run, _) = cluster.run("api", false).await.expect("run 1");
    assert!(succeeded(&run), "{run:?}");
    let rows = bronze(&cluster).await;
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].1, "open");
    {
        let s = api.state.lock().expect("state");
        // 429, page 1, 500 on page 2, page 2, page 3.
        assert_eq!(s.requests.len(), 5, "{:?}", s.requests);
        assert!(s.requests.iter().all(|q| !q.contains("updated_since")));
    }
    let version = task(&run, "bronze.tickets")
        .manifest
        .as_ref()
        .expect("m")
        .version;

    // Changes at the source; then run 2 meets a page that is not JSON.
    {
        let mut s = api.state.lock().expect("state");
        s.tickets.push(ticket(6, "open", 6));
        s.tickets.push(ticket(7, "open", 7));
        s.tickets[1] = ticket(2, "closed", 8);
        s.malformed_page = Some(2);
        s.requests.clear();
    }
    let (run, _) = cluster.run("api", false).await.expect("run 2");
    assert!(!succeeded(&run));
    let error = &task(&run, "bronze.tickets").error;
    assert!(
        error.contains(&api.url) && error.contains("page 2") && error.contains("not JSON"),
        "{error}"
    );
    assert_eq!(
        bronze(&cluster).await.len(),
        5,
        "a failed run committed rows"
    );

    // Run 3 starts from the cursor of run 1: exactly the three changed records are added.
    {
        let mut s = api.state.lock().expect("state");
        s.malformed_page = None;
        s.requests.clear();
    }
    let (run, _) = cluster.run("api", false).await.expect("run 3");
    assert!(succeeded(&run), "{run:?}");
    let m = task(&run, "bronze.tickets").manifest.as_ref().expect("m");
    assert!(m.version > version);
    assert_eq!(m.rows_written, 3);
    {
        let s = api.state.lock().expect("state");
        assert!(
            s.requests[0].contains("updated_since=2026-11-05T10%3A00%3A00Z"),
            "{:?}",
            s.requests
        );
    }
    let rows = bronze(&cluster).await;
    let mut keys: Vec<(String, String)> = rows.iter().map(|r| (r.0.clone(), r.2.clone())).collect();
    keys.dedup();
    assert_eq!(keys.len(), 8, "a record was repeated: {rows:?}");
    assert!(rows.contains(&("2".into(), "closed".into(), "2026-11-08T10:00:00Z".into())));
    assert!(rows.contains(&("7".into(), "open".into(), "2026-11-07T10:00:00Z".into())));

    // Nothing changed since: nothing is committed.
    let (run, _) = cluster.run("api", false).await.expect("run 4");
    assert!(succeeded(&run), "{run:?}");
    assert!(
        !task(&run, "bronze.tickets")
            .manifest
            .as_ref()
            .expect("m")
            .committed
    );
}
