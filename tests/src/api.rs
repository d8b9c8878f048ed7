//! A local HTTP JSON API for the `http-json` source tests: records with `updated_at`,
//! page-number pagination, a bearer token, and faults to inject (429 with Retry-After, 500,
//! a page that is not JSON).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::json;
use tokio::net::TcpListener;

/// One record the API serves.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub id: i64,
    pub status: String,
    /// ISO-8601 text; the API's incremental field.
    pub updated_at: String,
}

/// What the API holds and which faults it injects next.
#[derive(Debug, Default)]
pub struct ApiState {
    pub tickets: Vec<Ticket>,
    /// The next this-many requests get 429 with `Retry-After: 1`.
    pub throttle_next: u32,
    /// The next request for this page gets a 500 (once).
    pub fail_page_once: Option<u64>,
    /// Requests for this page get an HTML body with status 200.
    pub malformed_page: Option<u64>,
    /// Every request's query string, in order.
    pub requests: Vec<String>,
}

/// A running API; stops when dropped.
pub struct Api {
    pub url: String,
    pub state: Arc<Mutex<ApiState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The token the API expects as `Authorization: Bearer <token>`.
pub const TOKEN: &str = "t0ken-for-tests";

impl Api {
    pub async fn start() -> anyhow::Result<Api> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/tickets", listener.local_addr()?);
        let state = Arc::new(Mutex::new(ApiState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(respond(&state, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Api { url, state, task })
    }
}

fn response(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r
}

fn respond<B>(
    state: &Mutex<ApiState>,
    request: &hyper::Request<B>,
) -> hyper::Response<Full<Bytes>> {
    let Ok(mut s) = state.lock() else {
        return response(500, "poisoned".into());
    };
    let query = request.uri().query().unwrap_or_default().to_string();
    s.requests.push(query.clone());
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return response(401, r#"{"error":"unauthorized"}"#.into());
    }
    if s.throttle_next > 0 {
        s.throttle_next -= 1;
        let mut r = response(429, r#"{"error":"slow down"}"#.into());
        r.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
        return r;
    }
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.replace("%3A", ":"))
    };
    let page: u64 = param("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let per_page: usize = param("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100);
    if s.fail_page_once == Some(page) {
        s.fail_page_once = None;
        return response(500, "internal error".into());
    }
    if s.malformed_page == Some(page) {
        return response(200, "<html>maintenance</html>".into());
    }
    let since = param("updated_since");
    let mut matching: Vec<&Ticket> = s
        .tickets
        .iter()
        .filter(|t| {
            since
                .as_ref()
                .is_none_or(|since| t.updated_at.as_str() > since.as_str())
        })
        .collect();
    matching.sort_by(|a, b| (&a.updated_at, a.id).cmp(&(&b.updated_at, b.id)));
    let start = (page.saturating_sub(1) as usize) * per_page;
    let items: Vec<serde_json::Value> = matching
        .iter()
        .skip(start)
        .take(per_page)
        .map(|t| json!({"id": t.id, "status": t.status, "updated_at": t.updated_at, "meta": {"source": "api"}}))
        .collect();
    response(200, json!({"data": {"items": items}}).to_string())
}
