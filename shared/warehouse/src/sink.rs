//! The PostgreSQL sink: connection handling and the load transaction.

use std::pin::pin;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, Stream, StreamExt};
use postgres_types::ToSql;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls, Transaction};
use tracing::Instrument;

use crate::copy::{self, encode_batch};
use crate::error::{Error, Result, postgres};
use crate::name::{QualifiedName, quote_ident};
use crate::types::pg_type;

/// Largest `CopyData` message we send; an encoded batch is split into chunks of this size.
const COPY_CHUNK: usize = 1 << 20;

/// The staging table, in the session's temporary schema.
const STAGING: &str = "pg_temp.\"medallion_staging\"";

/// How loaded rows combine with the rows already in the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadMode {
    /// The target ends up holding exactly the loaded rows.
    Replace,
    /// Rows whose keys exist are updated (only when a non-key value changed), others inserted;
    /// target rows absent from the input are kept. The input must not repeat a key.
    Merge { keys: Vec<String> },
}

/// What a load did. `rows` counts the input rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub rows: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
}

impl LoadReport {
    fn log(&self, what: &str) {
        tracing::info!(
            rows = self.rows,
            inserted = self.inserted,
            updated = self.updated,
            deleted = self.deleted,
            "{what}"
        );
    }
}

/// A connection to the warehouse that loads Arrow tables.
#[derive(Debug)]
pub struct PostgresSink {
    client: Client,
    /// `user@host:port/db`, for errors and logs; never contains the password.
    endpoint: String,
}

impl PostgresSink {
    /// Connects to `url` (`postgres://user[:password]@host:port/db` or a key=value string,
    /// without TLS) and drives the connection on a spawned task.
    pub async fn connect(url: &str) -> Result<Self> {
        let config: Config = url.parse().map_err(|source| Error::InvalidUrl { source })?;
        let endpoint = endpoint(&config);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| Error::Connect {
                    endpoint: endpoint.clone(),
                    source,
                })?;
        let task_endpoint = endpoint.clone();
        // The task ends when the client is dropped (or the server goes away).
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(endpoint = %task_endpoint, %error, "postgres connection failed");
            }
        });
        tracing::debug!(%endpoint, "connected to postgres");
        Ok(Self { client, endpoint })
    }

    /// The server this sink is connected to, as `user@host:port/db`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Loads `batches` (each matching `schema`) into `target` in one transaction.
    ///
    /// On any error, including an error from the stream, nothing is committed.
    pub async fn load<S, E>(
        &mut self,
        target: &QualifiedName,
        schema: &SchemaRef,
        batches: S,
        mode: LoadMode,
    ) -> Result<LoadReport>
    where
        S: Stream<Item = Result<RecordBatch, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let span = tracing::info_span!(
            "warehouse_load",
            table = %target,
            mode = match &mode { LoadMode::Replace => "replace", LoadMode::Merge { .. } => "merge" },
        );
        async move {
            let report = self.load_inner(target, schema, batches, mode).await?;
            report.log("load committed");
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// The version of its source table `target` holds, as the last [`PostgresSink::load_changes`]
    /// recorded it (`None` if none did).
    pub async fn loaded_version(&mut self, target: &QualifiedName) -> Result<Option<i64>> {
        target.validate()?;
        let tx = self
            .client
            .transaction()
            .await
            .map_err(postgres(target, "BEGIN"))?;
        loaded_version(&tx, target).await
    }

    /// Merges `rows` (of `schema`) into `target` on `keys`, deletes the target rows whose
    /// keys equal a row of `deletes` (the key columns, in `keys` order; nulls match nulls),
    /// and records `version` as what the target holds, in one transaction. Returns `None`,
    /// changing nothing, unless the target still records `base`.
    #[allow(clippy::too_many_arguments)]
    pub async fn load_changes<S, E>(
        &mut self,
        target: &QualifiedName,
        schema: &SchemaRef,
        upserts: S,
        deletes: RecordBatch,
        keys: &[String],
        base: Option<i64>,
        version: i64,
    ) -> Result<Option<LoadReport>>
    where
        S: Stream<Item = Result<RecordBatch, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let span = tracing::info_span!("warehouse_load_changes", table = %target, ?base, version);
        async move {
            target.validate()?;
            let columns = plan_columns(target, schema)?;
            let keys = plan_keys(target, &columns, keys)?;
            let tx = self
                .client
                .transaction()
                .await
                .map_err(postgres(target, "BEGIN"))?;
            // Loads of one target take turns, so the version read stays true until COMMIT.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1::text))",
                &[&format!("medallion load {target}")],
            )
            .await
            .map_err(postgres(target, "locking the target"))?;
            let loaded = loaded_version(&tx, target).await?;
            if loaded != base {
                tracing::info!(?loaded, ?base, "the target's loaded version changed");
                return Ok(None);
            }
            ensure_table(&tx, target, &columns, &keys).await?;
            let rows = stage(&tx, target, schema, &columns, upserts).await?;
            let (inserted, updated) = merge(&tx, target, &columns, &keys).await?;
            let mut report = LoadReport {
                rows,
                inserted,
                updated,
                deleted: 0,
            };
            if deletes.num_rows() > 0 {
                report.deleted = delete_keys(&tx, target, &columns, &keys, deletes).await?;
            }
            record_version(&tx, target, version).await?;
            tx.commit().await.map_err(postgres(target, "COMMIT"))?;
            report.log("changes loaded");
            Ok(Some(report))
        }
        .instrument(span)
        .await
    }

    async fn load_inner<S, E>(
        &mut self,
        target: &QualifiedName,
        schema: &SchemaRef,
        batches: S,
        mode: LoadMode,
    ) -> Result<LoadReport>
    where
        S: Stream<Item = Result<RecordBatch, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        target.validate()?;
        let columns = plan_columns(target, schema)?;
        let keys = match &mode {
            LoadMode::Replace => Vec::new(),
            LoadMode::Merge { keys } => plan_keys(target, &columns, keys)?,
        };

        let tx = self
            .client
            .transaction()
            .await
            .map_err(postgres(target, "BEGIN"))?;
        ensure_table(&tx, target, &columns, &keys).await?;
        let rows = stage(&tx, target, schema, &columns, batches).await?;

        let column_list = join(columns.iter().map(|c| quote_ident(&c.name)));
        let mut report = LoadReport {
            rows,
            ..LoadReport::default()
        };
        match mode {
            LoadMode::Replace => {
                report.deleted = tx
                    .execute(&format!("DELETE FROM {target}"), &[])
                    .await
                    .map_err(postgres(target, "deleting the old rows"))?;
                report.inserted = tx
                    .execute(
                        &format!("INSERT INTO {target} ({column_list}) SELECT {column_list} FROM {STAGING}"),
                        &[],
                    )
                    .await
                    .map_err(postgres(target, "inserting the staged rows"))?;
            }
            LoadMode::Merge { .. } => {
                let (inserted, updated) = merge(&tx, target, &columns, &keys).await?;
                report.inserted = inserted;
                report.updated = updated;
            }
        }
        tx.commit().await.map_err(postgres(target, "COMMIT"))?;
        Ok(report)
    }
}

/// `user@host:port/db` — everything useful for diagnosis except the password.
fn endpoint(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

/// One target column: its name, PostgreSQL type and whether it may be null.
pub(crate) struct PgColumn {
    pub(crate) name: String,
    pub(crate) pg_type: String,
    pub(crate) nullable: bool,
}

pub(crate) fn plan_columns(target: &QualifiedName, schema: &SchemaRef) -> Result<Vec<PgColumn>> {
    if schema.fields().is_empty() {
        return Err(Error::SchemaMismatch {
            table: target.clone(),
            column: String::new(),
            detail: "the input schema has no columns".to_owned(),
        });
    }
    schema
        .fields()
        .iter()
        .map(|field| {
            if field.name().is_empty() || field.name().contains('\0') {
                return Err(Error::SchemaMismatch {
                    table: target.clone(),
                    column: field.name().clone(),
                    detail: "column names must be non-empty and free of NUL".to_owned(),
                });
            }
            let pg_type = pg_type(field.data_type()).ok_or_else(|| Error::UnsupportedType {
                table: target.clone(),
                column: field.name().clone(),
                data_type: field.data_type().clone(),
            })?;
            Ok(PgColumn {
                name: field.name().clone(),
                pg_type,
                nullable: field.is_nullable(),
            })
        })
        .collect()
}

/// Checks the merge keys name distinct columns of the schema.
pub(crate) fn plan_keys(
    target: &QualifiedName,
    columns: &[PgColumn],
    keys: &[String],
) -> Result<Vec<String>> {
    let invalid = |detail: String| Error::InvalidKeys {
        table: target.clone(),
        detail,
    };
    if keys.is_empty() {
        return Err(invalid("merge needs at least one key column".to_owned()));
    }
    for (i, key) in keys.iter().enumerate() {
        if !columns.iter().any(|c| &c.name == key) {
            return Err(invalid(format!("key {key:?} is not a column of the input")));
        }
        if keys[..i].contains(key) {
            return Err(invalid(format!("key {key:?} is listed twice")));
        }
    }
    Ok(keys.to_vec())
}

/// Creates the schema and table if needed, or checks the existing table's columns.
async fn ensure_table(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    columns: &[PgColumn],
    keys: &[String],
) -> Result<()> {
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        quote_ident(&target.schema)
    ))
    .await
    .map_err(postgres(target, "creating the schema"))?;

    let Some(oid) = relation_oid(tx, target).await? else {
        let mut defs: Vec<String> = columns
            .iter()
            .map(|c| {
                let not_null = if c.nullable { "" } else { " NOT NULL" };
                format!("{} {}{not_null}", quote_ident(&c.name), c.pg_type)
            })
            .collect();
        if !keys.is_empty() {
            defs.push(format!(
                "PRIMARY KEY ({})",
                join(keys.iter().map(|k| quote_ident(k)))
            ));
        }
        // IF NOT EXISTS guards against a concurrent creator; the columns are checked below.
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {target} ({})",
            defs.join(", ")
        ))
        .await
        .map_err(postgres(target, "creating the table"))?;
        tracing::info!(table = %target, "created table");
        return match relation_oid(tx, target).await? {
            Some(oid) => check_columns(tx, target, oid, columns).await,
            None => Err(Error::SchemaMismatch {
                table: target.clone(),
                column: String::new(),
                detail: "table not found after CREATE TABLE".to_owned(),
            }),
        };
    };
    check_columns(tx, target, oid, columns).await
}

/// The oid of the target table, or `None` if there is no relation of that name.
async fn relation_oid(tx: &Transaction<'_>, target: &QualifiedName) -> Result<Option<u32>> {
    let row = tx
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1::text AND c.relname = $2::text",
            &[&target.schema, &target.table],
        )
        .await
        .map_err(postgres(target, "looking up the table"))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row
        .try_get(0)
        .map_err(postgres(target, "looking up the table"))?;
    let kind: String = row
        .try_get(1)
        .map_err(postgres(target, "looking up the table"))?;
    if kind != "r" && kind != "p" {
        return Err(Error::SchemaMismatch {
            table: target.clone(),
            column: String::new(),
            detail: format!("relation exists but is not a table (relkind {kind:?})"),
        });
    }
    Ok(Some(oid))
}

/// Fails unless the table has exactly the input's columns with the mapped types.
async fn check_columns(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    oid: u32,
    columns: &[PgColumn],
) -> Result<()> {
    let rows = tx
        .query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) \
             FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(postgres(target, "reading the table's columns"))?;
    let mut existing = Vec::with_capacity(rows.len());
    for row in &rows {
        let name: String = row
            .try_get(0)
            .map_err(postgres(target, "reading the table's columns"))?;
        let pg_type: String = row
            .try_get(1)
            .map_err(postgres(target, "reading the table's columns"))?;
        existing.push((name, pg_type));
    }
    let mismatch = |column: &str, detail: String| Error::SchemaMismatch {
        table: target.clone(),
        column: column.to_owned(),
        detail,
    };
    for column in columns {
        match existing.iter().find(|(name, _)| name == &column.name) {
            None => {
                return Err(mismatch(
                    &column.name,
                    "the table has no such column".to_owned(),
                ));
            }
            Some((_, pg_type)) if pg_type != &column.pg_type => {
                return Err(mismatch(
                    &column.name,
                    format!(
                        "the table has type {pg_type}, the input needs {}",
                        column.pg_type
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if let Some((name, _)) = existing
        .iter()
        .find(|(name, _)| !columns.iter().any(|c| &c.name == name))
    {
        return Err(mismatch(
            name,
            "the table has a column the input lacks".to_owned(),
        ));
    }
    Ok(())
}

/// Creates the staging table (dropped at COMMIT) and copies `batches` into it with binary COPY;
/// returns the rows copied.
async fn stage<S, E>(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    schema: &SchemaRef,
    columns: &[PgColumn],
    batches: S,
) -> Result<u64>
where
    S: Stream<Item = Result<RecordBatch, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {STAGING} (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DROP"
    ))
    .await
    .map_err(postgres(target, "creating the staging table"))?;
    copy_into(tx, target, STAGING, schema, columns, batches).await
}

/// Copies `batches` into the temporary table `into` (holding `columns` of `target`).
async fn copy_into<S, E>(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    into: &str,
    schema: &SchemaRef,
    columns: &[PgColumn],
    batches: S,
) -> Result<u64>
where
    S: Stream<Item = Result<RecordBatch, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let column_list = join(columns.iter().map(|c| quote_ident(&c.name)));
    let sink = tx
        .copy_in::<_, Bytes>(&format!(
            "COPY {into} ({column_list}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(postgres(target, "starting COPY"))?;
    let mut sink = pin!(sink);
    let mut batches = pin!(batches);

    // If we return early, dropping the sink aborts the COPY (CopyFail) and dropping the
    // transaction rolls it back.
    sink.send(Bytes::from_static(copy::HEADER))
        .await
        .map_err(postgres(target, "COPY"))?;
    while let Some(batch) = batches.next().await {
        let batch = batch.map_err(|source| Error::Input {
            table: target.clone(),
            source: Box::new(source),
        })?;
        if batch.num_rows() == 0 {
            continue;
        }
        // Encoding is CPU work: keep it off the async workers.
        let (task_target, task_schema) = (target.clone(), schema.clone());
        let encoded = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::new();
            encode_batch(&task_target, &task_schema, &batch, &mut buf).map(|()| buf.freeze())
        })
        .await
        .map_err(|source| Error::EncodeTask {
            table: target.clone(),
            source,
        })??;
        let mut encoded = encoded;
        while !encoded.is_empty() {
            let chunk = encoded.split_to(encoded.len().min(COPY_CHUNK));
            if let Err(error) = sink.send(chunk).await {
                // A send fails once the server has rejected the COPY; its reason comes back
                // from `finish`.
                return Err(finish_error(
                    sink.as_mut().finish().await.err().unwrap_or(error),
                    target,
                ));
            }
        }
    }
    sink.send(Bytes::from_static(copy::TRAILER))
        .await
        .map_err(postgres(target, "COPY"))?;
    sink.as_mut()
        .finish()
        .await
        .map_err(postgres(target, "COPY into the staging table"))
}

fn finish_error(error: tokio_postgres::Error, target: &QualifiedName) -> Error {
    postgres(target, "COPY into the staging table")(error)
}

/// The temporary table of the keys [`PostgresSink::load_changes`] deletes.
const DELETED_KEYS: &str = "pg_temp.\"medallion_deleted_keys\"";

/// The table, in each target's schema, recording the table version each target holds.
const LOADS_TABLE: &str = "medallion_loads";

fn loads_table(target: &QualifiedName) -> QualifiedName {
    QualifiedName::new(target.schema.clone(), LOADS_TABLE)
}

/// The version [`record_version`] last recorded for `target`, if any and the table still
/// exists (a table dropped since then holds nothing).
async fn loaded_version(tx: &Transaction<'_>, target: &QualifiedName) -> Result<Option<i64>> {
    let loads = loads_table(target);
    if relation_oid(tx, &loads).await?.is_none() || relation_oid(tx, target).await?.is_none() {
        return Ok(None);
    }
    let row = tx
        .query_opt(
            &format!("SELECT version FROM {loads} WHERE target = $1::text"),
            &[&target.table],
        )
        .await
        .map_err(postgres(target, "reading the loaded version"))?;
    row.map(|r| r.try_get(0))
        .transpose()
        .map_err(postgres(target, "reading the loaded version"))
}

/// Records that `target` now holds `version` of its source table.
async fn record_version(tx: &Transaction<'_>, target: &QualifiedName, version: i64) -> Result<()> {
    let loads = loads_table(target);
    if relation_oid(tx, &loads).await?.is_none() {
        // Two first loads into one schema would race on CREATE TABLE; the lock (held to the
        // end of this transaction) makes the second see the first's table.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1::text))",
            &[&loads.to_string()],
        )
        .await
        .map_err(postgres(target, "locking the loads table"))?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {loads} (target text PRIMARY KEY, version bigint NOT NULL, \
             loaded_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(postgres(target, "creating the loads table"))?;
    }
    tx.execute(
        &format!(
            "INSERT INTO {loads} (target, version) VALUES ($1::text, $2::bigint) \
             ON CONFLICT (target) DO UPDATE SET version = EXCLUDED.version, loaded_at = now()"
        ),
        &[&target.table, &version],
    )
    .await
    .map_err(postgres(target, "recording the loaded version"))?;
    Ok(())
}

/// Deletes the target rows whose keys equal a row of `deletes` (nulls match nulls, as in a
/// group-by); returns how many.
async fn delete_keys(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    columns: &[PgColumn],
    keys: &[String],
    deletes: RecordBatch,
) -> Result<u64> {
    let key_columns: Vec<PgColumn> = keys
        .iter()
        .filter_map(|k| columns.iter().find(|c| &c.name == k))
        .map(|c| PgColumn {
            name: c.name.clone(),
            pg_type: c.pg_type.clone(),
            nullable: true,
        })
        .collect();
    let key_list = join(keys.iter().map(|k| quote_ident(k)));
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {DELETED_KEYS} ON COMMIT DROP AS SELECT {key_list} FROM {target} WITH NO DATA"
    ))
    .await
    .map_err(postgres(target, "creating the deleted keys table"))?;
    let schema = deletes.schema();
    let batches = futures::stream::iter([Ok::<_, std::convert::Infallible>(deletes)]);
    copy_into(tx, target, DELETED_KEYS, &schema, &key_columns, batches).await?;
    let matches = join_with(
        keys.iter().map(|k| {
            let k = quote_ident(k);
            format!("t.{k} IS NOT DISTINCT FROM d.{k}")
        }),
        " AND ",
    );
    tx.execute(
        &format!("DELETE FROM {target} AS t USING {DELETED_KEYS} AS d WHERE {matches}"),
        &[],
    )
    .await
    .map_err(postgres(target, "deleting the rows of deleted keys"))
}

/// Upserts the staged rows; returns (inserted, updated).
async fn merge(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    columns: &[PgColumn],
    keys: &[String],
) -> Result<(u64, u64)> {
    let column_list = join(columns.iter().map(|c| quote_ident(&c.name)));
    let non_keys: Vec<String> = columns
        .iter()
        .filter(|c| !keys.contains(&c.name))
        .map(|c| quote_ident(&c.name))
        .collect();
    let key_match = join_with(
        keys.iter().map(|k| {
            let k = quote_ident(k);
            format!("t.{k} = s.{k}")
        }),
        " AND ",
    );

    if has_unique_index(tx, target, keys).await? {
        let conflict = join(keys.iter().map(|k| quote_ident(k)));
        let action = if non_keys.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!(
                "DO UPDATE SET {} WHERE ROW({}) IS DISTINCT FROM ROW({})",
                join(non_keys.iter().map(|c| format!("{c} = EXCLUDED.{c}"))),
                join(non_keys.iter().map(|c| format!("t.{c}"))),
                join(non_keys.iter().map(|c| format!("EXCLUDED.{c}"))),
            )
        };
        // xmax = 0 marks a freshly inserted row, anything else one updated by ON CONFLICT.
        let sql = format!(
            "WITH merged AS (\
                 INSERT INTO {target} AS t ({column_list}) SELECT {column_list} FROM {STAGING} \
                 ON CONFLICT ({conflict}) {action} RETURNING (t.xmax = 0) AS inserted) \
             SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged"
        );
        let row = tx
            .query_one(&sql, &[])
            .await
            .map_err(postgres(target, "merging the staged rows"))?;
        let inserted: i64 = row
            .try_get(0)
            .map_err(postgres(target, "merging the staged rows"))?;
        let updated: i64 = row
            .try_get(1)
            .map_err(postgres(target, "merging the staged rows"))?;
        return Ok((inserted.unsigned_abs(), updated.unsigned_abs()));
    }

    tracing::debug!(table = %target, "no unique index on the merge keys; using UPDATE + INSERT");
    let updated = if non_keys.is_empty() {
        0
    } else {
        let sql = format!(
            "UPDATE {target} AS t SET {} FROM {STAGING} AS s WHERE {key_match} \
             AND ROW({}) IS DISTINCT FROM ROW({})",
            join(non_keys.iter().map(|c| format!("{c} = s.{c}"))),
            join(non_keys.iter().map(|c| format!("t.{c}"))),
            join(non_keys.iter().map(|c| format!("s.{c}"))),
        );
        tx.execute(&sql, &[])
            .await
            .map_err(postgres(target, "updating matched rows"))?
    };
    let sql = format!(
        "INSERT INTO {target} ({column_list}) SELECT {} FROM {STAGING} AS s \
         WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {key_match})",
        join(
            columns
                .iter()
                .map(|c| format!("s.{}", quote_ident(&c.name)))
        ),
    );
    let inserted = tx
        .execute(&sql, &[])
        .await
        .map_err(postgres(target, "inserting new rows"))?;
    Ok((inserted, updated))
}

/// Whether the target has a valid, immediate, non-partial unique index on exactly `keys`
/// (in any order) — what `ON CONFLICT (keys)` needs as an arbiter.
async fn has_unique_index(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    keys: &[String],
) -> Result<bool> {
    let Some(oid) = relation_oid(tx, target).await? else {
        return Ok(false);
    };
    let mut sorted: Vec<&str> = keys.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let key_count = i16::try_from(keys.len()).unwrap_or(i16::MAX);
    let params: [&(dyn ToSql + Sync); 3] = [&oid, &sorted, &key_count];
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
               WHERE i.indrelid = $1::oid AND i.indisunique AND i.indisvalid AND i.indimmediate \
                 AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts = $3::int2 \
                 AND (SELECT array_agg(a.attname::text COLLATE \"C\" ORDER BY a.attname::text COLLATE \"C\") \
                      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                      WHERE k.ord <= i.indnkeyatts) = $2::text[])",
            &params,
        )
        .await
        .map_err(postgres(target, "looking up unique indexes"))?;
    row.try_get(0)
        .map_err(postgres(target, "looking up unique indexes"))
}

fn join(items: impl Iterator<Item = String>) -> String {
    join_with(items, ", ")
}

fn join_with(items: impl Iterator<Item = String>, separator: &str) -> String {
    items.collect::<Vec<_>>().join(separator)
}
