//! A local endpoint speaking the Redshift Data API's JSON protocol (`ExecuteStatement`,
//! `BatchExecuteStatement`, `DescribeStatement`, `GetStatementResult`) that runs the statements
//! on a PostgreSQL database. `COPY <table> FROM 's3://…' IAM_ROLE … FORMAT AS PARQUET` is
//! carried out here: the Parquet objects under the prefix are read from the configured S3 store
//! and inserted into the table, inside the statement's transaction.
//!
//! A development aid: it lets Medallion's real Redshift path (aws-sdk-redshiftdata, Parquet
//! staged on S3, COPY, MERGE) run against a laptop's PostgreSQL and an S3-compatible store. It
//! is not Redshift: SQL is PostgreSQL's, and requests are not authenticated. The
//! `redshift-data-local` binary serves it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use medallion_objects::ObjectStore;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// One submitted statement (or batch) and what became of it.
#[derive(Clone)]
struct Statement {
    id: String,
    request: Value,
    sqls: Vec<String>,
    created_at: f64,
    updated_at: f64,
    status: &'static str,
    error: Option<String>,
    /// Per sub-statement: status, error, rows affected or returned.
    subs: Vec<(&'static str, Option<String>, i64)>,
    columns: Vec<String>,
    records: Vec<Vec<Option<String>>>,
}

struct State {
    pg_url: String,
    objects: ObjectStore,
    statements: Mutex<HashMap<String, Statement>>,
}

/// Serves the endpoint on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, pg_url: String, objects: ObjectStore) {
    let state = Arc::new(State {
        pg_url,
        objects,
        statements: Mutex::new(HashMap::new()),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn reply(status: u16, body: Value) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    if let Some(kind) = body.get("__type").and_then(Value::as_str)
        && let Ok(value) = hyper::header::HeaderValue::from_str(kind)
    {
        response.headers_mut().insert("x-amzn-errortype", value);
    }
    response
}

fn client_error(kind: &str, message: impl Into<String>) -> hyper::Response<Full<Bytes>> {
    reply(400, json!({"__type": kind, "message": message.into()}))
}

async fn handle(
    state: Arc<State>,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let action = request
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("RedshiftData."))
        .unwrap_or_default()
        .to_string();
    let Ok(body) = request.into_body().collect().await else {
        return client_error("ValidationException", "unreadable request body");
    };
    let Ok(input) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return client_error("ValidationException", "the request body is not JSON");
    };
    match action.as_str() {
        "ExecuteStatement" => {
            let Some(sql) = input.get("Sql").and_then(Value::as_str) else {
                return client_error("ValidationException", "Sql is required");
            };
            submit(state, input.clone(), vec![sql.to_string()])
        }
        "BatchExecuteStatement" => {
            let sqls: Vec<String> = input
                .get("Sqls")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            if sqls.is_empty() {
                return client_error(
                    "ValidationException",
                    "Sqls must hold at least one statement",
                );
            }
            submit(state, input.clone(), sqls)
        }
        "DescribeStatement" => with_statement(&state, &input, describe),
        "GetStatementResult" => with_statement(&state, &input, result),
        "CancelStatement" => client_error(
            "ValidationException",
            "CancelStatement is not supported by this development endpoint",
        ),
        other => client_error(
            "UnknownOperationException",
            format!("unknown operation `{other}`"),
        ),
    }
}

/// Checks the target fields as Redshift does, records the statement and runs it in the background.
fn submit(state: Arc<State>, input: Value, sqls: Vec<String>) -> hyper::Response<Full<Bytes>> {
    let text = |k: &str| input.get(k).and_then(Value::as_str).map(str::to_string);
    if text("Database").is_none() {
        return client_error("ValidationException", "Database is required");
    }
    if text("ClusterIdentifier").is_none() == text("WorkgroupName").is_none() {
        return client_error(
            "ValidationException",
            "give exactly one of ClusterIdentifier or WorkgroupName",
        );
    }
    let id = uuid_like();
    let created_at = now();
    let statement = Statement {
        id: id.clone(),
        request: input.clone(),
        subs: sqls.iter().map(|_| ("SUBMITTED", None, 0)).collect(),
        sqls,
        created_at,
        updated_at: created_at,
        status: "SUBMITTED",
        error: None,
        columns: Vec::new(),
        records: Vec::new(),
    };
    if let Ok(mut all) = state.statements.lock() {
        all.insert(id.clone(), statement);
    }
    tokio::spawn(execute(state, id.clone()));
    let mut out = json!({"Id": id, "CreatedAt": created_at});
    copy_target(&input, &mut out);
    reply(200, out)
}

/// The fields naming where a statement ran, echoed back as the Data API does.
fn copy_target(request: &Value, out: &mut Value) {
    for key in [
        "Database",
        "ClusterIdentifier",
        "WorkgroupName",
        "DbUser",
        "SecretArn",
    ] {
        if let Some(v) = request.get(key) {
            out[key] = v.clone();
        }
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n)
}

fn with_statement(
    state: &State,
    input: &Value,
    render: fn(&Statement) -> hyper::Response<Full<Bytes>>,
) -> hyper::Response<Full<Bytes>> {
    let id = input.get("Id").and_then(Value::as_str).unwrap_or_default();
    let found = state
        .statements
        .lock()
        .ok()
        .and_then(|all| all.get(id).cloned());
    match found {
        Some(statement) => render(&statement),
        None => client_error("ResourceNotFoundException", format!("no statement `{id}`")),
    }
}

fn describe(s: &Statement) -> hyper::Response<Full<Bytes>> {
    let mut out = json!({
        "Id": s.id,
        "Status": s.status,
        "CreatedAt": s.created_at,
        "UpdatedAt": s.updated_at,
        "Duration": ((s.updated_at - s.created_at) * 1e9) as i64,
        "HasResultSet": !s.columns.is_empty(),
        "ResultRows": s.subs.last().map_or(0, |sub| sub.2),
    });
    copy_target(&s.request, &mut out);
    if let Some(error) = &s.error {
        out["Error"] = json!(error);
    }
    if s.sqls.len() == 1 {
        out["QueryString"] = json!(s.sqls[0]);
    } else {
        out["SubStatements"] = s
            .subs
            .iter()
            .zip(&s.sqls)
            .enumerate()
            .map(|(i, ((status, error, rows), sql))| {
                let mut sub = json!({
                    "Id": format!("{}:{}", s.id, i + 1),
                    "Status": status,
                    "QueryString": sql,
                    "ResultRows": rows,
                    "CreatedAt": s.created_at,
                    "UpdatedAt": s.updated_at,
                });
                if let Some(error) = error {
                    sub["Error"] = json!(error);
                }
                sub
            })
            .collect();
    }
    reply(200, out)
}

fn result(s: &Statement) -> hyper::Response<Full<Bytes>> {
    if s.status != "FINISHED" || s.columns.is_empty() {
        return client_error(
            "ValidationException",
            format!(
                "statement `{}` has no result set (status {})",
                s.id, s.status
            ),
        );
    }
    let records: Vec<Value> = s
        .records
        .iter()
        .map(|row| {
            row.iter()
                .map(|v| match v {
                    Some(v) => json!({"stringValue": v}),
                    None => json!({"isNull": true}),
                })
                .collect()
        })
        .collect();
    let columns: Vec<Value> = s
        .columns
        .iter()
        .map(|c| json!({"name": c, "label": c, "typeName": "varchar"}))
        .collect();
    reply(
        200,
        json!({"Records": records, "ColumnMetadata": columns, "TotalNumRows": s.records.len()}),
    )
}

/// Changes a recorded statement.
fn update(state: &State, id: &str, change: impl FnOnce(&mut Statement)) {
    if let Ok(mut all) = state.statements.lock()
        && let Some(s) = all.get_mut(id)
    {
        change(s);
        s.updated_at = now();
    }
}

/// Runs a statement's SQL in one PostgreSQL transaction and records the outcome.
async fn execute(state: Arc<State>, id: String) {
    update(&state, &id, |s| s.status = "STARTED");
    let sqls = state
        .statements
        .lock()
        .ok()
        .and_then(|all| all.get(&id).map(|s| s.sqls.clone()))
        .unwrap_or_default();
    match run_sqls(&state, &id, &sqls).await {
        Ok(()) => update(&state, &id, |s| s.status = "FINISHED"),
        Err((index, message)) => update(&state, &id, |s| {
            s.status = "FAILED";
            s.error = Some(message.clone());
            if let Some(sub) = s.subs.get_mut(index) {
                sub.0 = "FAILED";
                sub.1 = Some(message);
            }
            for sub in s.subs.iter_mut().skip(index + 1) {
                sub.0 = "ABORTED";
            }
        }),
    }
}

async fn run_sqls(state: &State, id: &str, sqls: &[String]) -> Result<(), (usize, String)> {
    let (client, connection) = tokio_postgres::connect(&state.pg_url, NoTls)
        .await
        .map_err(|e| (0, format!("ERROR: cannot connect to the database: {e}")))?;
    tokio::spawn(connection);
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| (0, pg_message(&e)))?;
    for (i, sql) in sqls.iter().enumerate() {
        update(state, id, |s| s.subs[i].0 = "STARTED");
        let done = match parse_copy(sql) {
            Some(copy) => copy_from_s3(state, &client, copy).await.map(|n| (n, None)),
            None => query(&client, sql).await,
        };
        match done {
            Ok((rows, result)) => update(state, id, |s| {
                s.subs[i] = ("FINISHED", None, rows);
                if let Some((columns, records)) = result {
                    s.columns = columns;
                    s.records = records;
                }
            }),
            Err(message) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err((i, message));
            }
        }
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| (sqls.len().saturating_sub(1), pg_message(&e)))
}

type ResultSet = (Vec<String>, Vec<Vec<Option<String>>>);

async fn query(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<(i64, Option<ResultSet>), String> {
    let messages = client.simple_query(sql).await.map_err(|e| pg_message(&e))?;
    let (mut columns, mut records, mut affected) = (Vec::new(), Vec::new(), 0i64);
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                records.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                );
            }
            SimpleQueryMessage::CommandComplete(n) => affected = i64::try_from(n).unwrap_or(0),
            _ => {}
        }
    }
    if columns.is_empty() {
        Ok((affected, None))
    } else {
        Ok((records.len() as i64, Some((columns, records))))
    }
}

/// Redshift reports errors as `ERROR: message`; PostgreSQL's server message fits that form.
fn pg_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" Detail: {detail}"));
            }
            text
        }
        None => format!("ERROR: {error}"),
    }
}

struct Copy<'a> {
    table: &'a str,
    url: &'a str,
    options: String,
}

/// Recognises `COPY <table> FROM 's3://…' <options>`.
fn parse_copy(sql: &str) -> Option<Copy<'_>> {
    let trimmed = sql.trim();
    let head = trimmed.get(..5)?;
    if !head.eq_ignore_ascii_case("copy ") {
        return None;
    }
    let rest = &trimmed[5..];
    let upper = rest.to_ascii_uppercase();
    let from = upper.find(" FROM 'S3://")?;
    let table = rest[..from].trim();
    let url_start = from + " FROM '".len();
    let url_len = rest[url_start..].find('\'')?;
    let url = &rest[url_start..url_start + url_len];
    let options = rest[url_start + url_len + 1..]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_uppercase();
    Some(Copy {
        table,
        url,
        options,
    })
}

/// Loads every Parquet object under the COPY's prefix into its table.
async fn copy_from_s3(
    state: &State,
    client: &tokio_postgres::Client,
    copy: Copy<'_>,
) -> Result<i64, String> {
    if !copy.options.contains("FORMAT AS PARQUET") {
        return Err("ERROR: this development endpoint loads only COPY … FORMAT AS PARQUET".into());
    }
    if !copy.options.contains("IAM_ROLE") {
        return Err("ERROR: COPY from S3 needs IAM_ROLE (or other credentials)".into());
    }
    let objects = state
        .objects
        .list(copy.url)
        .await
        .map_err(|e| format!("ERROR: S3ServiceException: {e}"))?;
    if objects.is_empty() {
        return Err(format!(
            "ERROR: The specified S3 prefix '{}' does not exist",
            copy.url
        ));
    }
    let insert = format!(
        "INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, $1::text::json)",
        table = copy.table
    );
    let mut loaded = 0i64;
    for object in objects {
        let spool = tempfile::NamedTempFile::new().map_err(|e| format!("ERROR: {e}"))?;
        state
            .objects
            .download(&object, spool.path())
            .await
            .map_err(|e| format!("ERROR: S3ServiceException: {e}"))?;
        let batches = read_parquet(spool.path())
            .map_err(|e| format!("ERROR: Spectrum Scan Error: {}: {e:#}", object.url))?;
        for batch in batches {
            let mut writer = arrow::json::ArrayWriter::new(Vec::new());
            writer
                .write(&batch)
                .and_then(|()| writer.finish())
                .map_err(|e| format!("ERROR: {e}"))?;
            let text = String::from_utf8(writer.into_inner()).map_err(|e| format!("ERROR: {e}"))?;
            let text = if text.is_empty() {
                "[]".to_string()
            } else {
                text
            };
            loaded += i64::try_from(
                client
                    .execute(&insert, &[&text])
                    .await
                    .map_err(|e| pg_message(&e))?,
            )
            .unwrap_or(0);
        }
    }
    Ok(loaded)
}

fn read_parquet(path: &std::path::Path) -> anyhow::Result<Vec<arrow::record_batch::RecordBatch>> {
    let file = std::fs::File::open(path)?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .context("decoding parquet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_copy_from_s3() {
        let copy = parse_copy(
            "COPY \"st\" FROM 's3://stage/a/b/' IAM_ROLE 'arn:aws:iam::1:role/r' FORMAT AS PARQUET",
        )
        .unwrap();
        assert_eq!(copy.table, "\"st\"");
        assert_eq!(copy.url, "s3://stage/a/b/");
        assert!(copy.options.contains("FORMAT AS PARQUET"));
        assert!(parse_copy("SELECT 1").is_none());
        assert!(parse_copy("COPY t FROM STDIN").is_none());
    }
}
