//! The `http-json` source: fetches an API's pages, politely (rate limit; retries with
//! exponential backoff and jitter on 429, 5xx and lost connections, honouring Retry-After;
//! a timeout per request), and spools the records as NDJSON on local disk, so memory stays
//! bounded by one page. Every top-level field becomes a string column, as read (nested values
//! as their JSON text), like CSV columns, in name order.
//!
//! Incremental: with `incremental`, the highest value of the field seen is returned, and the
//! previous one is sent as a query parameter; the caller stores it in the bronze commit.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use medallion_spec::{HttpSourceSpec, PaginationSpec};
use serde_json::Value;

/// What one fetch brought in.
pub struct Fetched {
    /// The records, one JSON object per line, every value a string or null.
    pub spool: tempfile::NamedTempFile,
    pub records: u64,
    pub pages: u64,
    /// Top-level fields of every record, sorted by name.
    pub fields: Vec<String>,
    /// The new high-water mark of the incremental field (the old one if nothing exceeded it).
    pub cursor: Option<String>,
}

/// Longest backoff between two attempts, whatever the attempt count or Retry-After says.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Safety stop for pagination that never ends (a server returning the same link forever).
const MAX_PAGES: u64 = 1_000_000;

/// Fetches every page, starting after `since` (the stored cursor) when the source is
/// incremental. `report` is called after each page with (pages, records). Errors name the URL
/// and the page.
pub async fn fetch(
    http: &HttpSourceSpec,
    since: Option<&str>,
    spool_dir: &Path,
    mut report: impl FnMut(u64, u64),
) -> Result<Fetched, String> {
    let headers = resolve_headers(&http.headers)?;
    // No redirects: a redirect would carry the headers (secrets included) to another host.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(http.timeout_secs))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let method = reqwest::Method::from_bytes(http.method.to_ascii_uppercase().as_bytes())
        .map_err(|e| format!("http.method: {e}"))?;
    let spool = tempfile::NamedTempFile::new_in(spool_dir)
        .map_err(|e| format!("spool folder {}: {e}", spool_dir.display()))?;
    let mut out = std::io::BufWriter::new(spool.reopen().map_err(|e| e.to_string())?);
    let mut fields: Vec<String> = Vec::new();
    let mut cursor: Option<Value> = since.map(|s| Value::String(s.to_string()));
    let mut limiter = RateLimiter::new(http.rate_limit_per_sec);

    let base = reqwest::Url::parse(&http.url).map_err(|e| format!("http.url: {e}"))?;
    let mut next = Some(Page::first(&base, http.pagination.as_ref()));
    let (mut pages, mut records) = (0u64, 0u64);
    while let Some(page) = next.take() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(format!(
                "{}: more than {MAX_PAGES} pages; is pagination looping?",
                base
            ));
        }
        let mut url = page.url.clone();
        {
            let mut query = url.query_pairs_mut();
            // A next link carries its own query, the cursor parameter included.
            let followed_link = pages > 1
                && http
                    .pagination
                    .as_ref()
                    .is_some_and(|p| p.next_link.is_some());
            if let (Some(inc), Some(since), false) = (&http.incremental, since, followed_link) {
                query.append_pair(&inc.param, since);
            }
            for (k, v) in &page.params {
                query.append_pair(k, v);
            }
        }
        let where_ = format!("{} {url} (page {pages})", method);
        let body = get(&client, &method, &url, &headers, http.retries, &mut limiter)
            .await
            .map_err(|e| format!("{where_}: {e}"))?;
        let document: Value = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "{where_}: the response is not JSON ({e}); it starts with {:?}",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            )
        })?;
        let items = lookup(&document, &http.records)
            .and_then(Value::as_array)
            .ok_or_else(|| {
                format!(
                    "{where_}: no records array at `{}`",
                    if http.records.is_empty() {
                        "(the response itself)"
                    } else {
                        &http.records
                    }
                )
            })?;
        for (i, item) in items.iter().enumerate() {
            let Value::Object(object) = item else {
                return Err(format!("{where_}: record {i} is not a JSON object"));
            };
            let mut line = serde_json::Map::with_capacity(object.len());
            for (key, value) in object {
                if !fields.iter().any(|f| f == key) {
                    fields.push(key.clone());
                }
                line.insert(key.clone(), as_text(value));
            }
            if let Some(inc) = &http.incremental
                && let Some(value) = object.get(&inc.field).filter(|v| !v.is_null())
                && cursor.as_ref().is_none_or(|c| later(value, c))
            {
                cursor = Some(value.clone());
            }
            serde_json::to_writer(&mut out, &Value::Object(line)).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        records += items.len() as u64;
        report(pages, records);
        next = page
            .next(&document, items.len() as u64, http.pagination.as_ref())
            .map_err(|e| format!("{where_}: {e}"))?;
        if let Some(following) = &next
            && following.url == page.url
            && following.params == page.params
        {
            return Err(format!(
                "{where_}: the next page is this page again; pagination would never end"
            ));
        }
        if let Some(following) = &next
            && following.url.origin() != base.origin()
        {
            return Err(format!(
                "{where_}: the next link leads to another site ({}); the source's headers are not sent there",
                following.url.origin().ascii_serialization()
            ));
        }
    }
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    // Columns in name order: JSON objects have no reliable field order.
    fields.sort();
    Ok(Fetched {
        spool,
        records,
        pages,
        fields,
        cursor: cursor.map(|c| match c {
            Value::String(s) => s,
            other => other.to_string(),
        }),
    })
}

/// A value as bronze keeps it: strings as they are, everything else as its JSON text.
fn as_text(value: &Value) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::String(_) => value.clone(),
        other => Value::String(other.to_string()),
    }
}

/// Whether `a` comes after `b`: numerically when both are numbers, else as text (ISO-8601
/// timestamps order correctly as text).
fn later(a: &Value, b: &Value) -> bool {
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return x > y;
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text(a) > text(b)
}

/// The value at a dotted path (`data.items`); the whole document for an empty path.
fn lookup<'a>(document: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(document);
    }
    path.split('.').try_fold(document, |v, key| v.get(key))
}

/// `${VAR}` in header values, from the ingestor's environment.
fn resolve_headers(
    headers: &BTreeMap<String, String>,
) -> Result<reqwest::header::HeaderMap, String> {
    let mut map = reqwest::header::HeaderMap::new();
    for (name, template) in headers {
        let value = crate::env::expand(&format!("http.headers.{name}"), template)?;
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("http.headers: `{name}`: {e}"))?;
        // The value may be a secret: never echo it.
        let mut value = reqwest::header::HeaderValue::from_str(&value)
            .map_err(|_| format!("http.headers.{name}: not a valid header value"))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

/// One page request: its URL and pagination parameters.
struct Page {
    url: reqwest::Url,
    params: Vec<(String, String)>,
    number: u64,
    offset: u64,
}

impl Page {
    fn first(base: &reqwest::Url, pagination: Option<&PaginationSpec>) -> Page {
        let mut page = Page {
            url: base.clone(),
            params: Vec::new(),
            number: pagination.map_or(1, |p| p.start),
            offset: 0,
        };
        page.params = page.params_for(pagination, None);
        page
    }

    fn params_for(
        &self,
        p: Option<&PaginationSpec>,
        cursor: Option<String>,
    ) -> Vec<(String, String)> {
        let Some(p) = p else { return Vec::new() };
        let mut params = Vec::new();
        if let Some(param) = &p.page_param {
            params.push((param.clone(), self.number.to_string()));
        }
        if let Some(param) = &p.offset_param {
            params.push((param.clone(), self.offset.to_string()));
        }
        if let (Some(param), Some(limit)) = (&p.limit_param, p.limit) {
            params.push((param.clone(), limit.to_string()));
        }
        if let (Some(param), Some(cursor)) = (&p.cursor_param, cursor) {
            params.push((param.clone(), cursor));
        }
        params
    }

    /// The page after this one, or `None` at the end.
    fn next(
        &self,
        document: &Value,
        count: u64,
        pagination: Option<&PaginationSpec>,
    ) -> Result<Option<Page>, String> {
        let Some(p) = pagination else { return Ok(None) };
        if let Some(path) = &p.next_link {
            return match lookup(document, path) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(link)) if link.is_empty() => Ok(None),
                Some(Value::String(link)) => {
                    let url = self
                        .url
                        .join(link)
                        .map_err(|e| format!("next link {link:?}: {e}"))?;
                    Ok(Some(Page {
                        url,
                        params: Vec::new(),
                        number: self.number + 1,
                        offset: 0,
                    }))
                }
                Some(other) => Err(format!("next link at `{path}` is not a string: {other}")),
            };
        }
        if p.cursor_param.is_some() {
            let path = p.cursor_path.as_deref().unwrap_or_default();
            let cursor = match lookup(document, path) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) if s.is_empty() => return Ok(None),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            let mut page = Page {
                url: self.url.clone(),
                params: Vec::new(),
                number: self.number + 1,
                offset: 0,
            };
            page.params = page.params_for(pagination, Some(cursor));
            return Ok(Some(page));
        }
        // Page and offset styles end on an empty page, or a short one when the size is known.
        let short = p.limit.is_some_and(|limit| count < limit);
        if count == 0 || short {
            return Ok(None);
        }
        let mut page = Page {
            url: self.url.clone(),
            params: Vec::new(),
            number: self.number + 1,
            offset: self.offset + count,
        };
        page.params = page.params_for(pagination, None);
        Ok(Some(page))
    }
}

/// Spaces requests at least 1/rate seconds apart.
struct RateLimiter {
    interval: Option<Duration>,
    last: Option<Instant>,
}

impl RateLimiter {
    fn new(per_sec: Option<f64>) -> RateLimiter {
        RateLimiter {
            interval: per_sec.map(|r| Duration::from_secs_f64(1.0 / r)),
            last: None,
        }
    }

    async fn wait(&mut self) {
        if let (Some(interval), Some(last)) = (self.interval, self.last) {
            let due = last + interval;
            tokio::time::sleep_until(due.into()).await;
        }
        self.last = Some(Instant::now());
    }
}

/// One request with retries: 429, 5xx and transport errors are retried up to `retries` times.
async fn get(
    client: &reqwest::Client,
    method: &reqwest::Method,
    url: &reqwest::Url,
    headers: &reqwest::header::HeaderMap,
    retries: u32,
    limiter: &mut RateLimiter,
) -> Result<bytes::Bytes, String> {
    let mut attempt = 0u32;
    loop {
        limiter.wait().await;
        let sent = client
            .request(method.clone(), url.clone())
            .headers(headers.clone())
            .send()
            .await;
        let (failure, retry_after) = match sent {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    return response
                        .bytes()
                        .await
                        .map_err(|e| format!("reading the response: {e}"));
                }
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = response.text().await.unwrap_or_default();
                let failure = format!(
                    "HTTP {status}: {}",
                    text.chars().take(200).collect::<String>()
                );
                if !(status.as_u16() == 429 || status.is_server_error()) {
                    return Err(failure);
                }
                (failure, retry_after)
            }
            Err(e) => (format!("request failed: {e}"), None),
        };
        if attempt >= retries {
            return Err(format!("{failure} (after {attempt} retries)"));
        }
        let backoff =
            retry_after.unwrap_or_else(|| jittered(FIRST_BACKOFF * 2u32.saturating_pow(attempt)));
        tracing::warn!(%url, attempt, wait_ms = backoff.as_millis() as u64, %failure, "retrying");
        tokio::time::sleep(backoff.min(MAX_BACKOFF)).await;
        attempt += 1;
    }
}

/// `base` plus up to half of it again, at random, so retrying clients spread out.
fn jittered(base: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = (random % 1000) as f64 / 2000.0;
    base.mul_f64(1.0 + fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_dotted_paths_and_orders_cursors() {
        let doc: Value = serde_json::json!({"data": {"items": [1]}, "next": null});
        assert!(lookup(&doc, "data.items").is_some_and(Value::is_array));
        assert!(lookup(&doc, "data.missing").is_none());
        assert!(later(&serde_json::json!(10), &serde_json::json!("9")));
        assert!(later(
            &serde_json::json!("2024-02-01T00:00:00Z"),
            &serde_json::json!("2024-01-31T23:59:59Z")
        ));
        assert_eq!(
            as_text(&serde_json::json!({"a": 1})),
            serde_json::json!("{\"a\":1}")
        );
    }
}
