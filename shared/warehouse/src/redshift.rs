//! Loads Arrow tables into Amazon Redshift through the Redshift Data API.
//!
//! [`RedshiftSink::load`]:
//!
//! 1. writes the batches as Parquet files (rolling at [`STAGED_FILE_ROWS`] rows) to a fresh
//!    prefix under the staging location, streamed from local spool files;
//! 2. runs one `BatchExecuteStatement`, which Redshift executes as one transaction:
//!    `CREATE SCHEMA/TABLE IF NOT EXISTS` (types mapped from the Arrow schema), a temporary
//!    staging table `LIKE` the target, `COPY … FORMAT AS PARQUET` from the staged prefix, then
//!    `DELETE` + `INSERT` (replace) or `MERGE` on the keys;
//! 3. polls `DescribeStatement` with backoff until it finishes, surfacing Redshift's own error
//!    text when it fails (the transaction is then rolled back, leaving the old rows);
//! 4. removes the staged files.

use std::path::Path;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use aws_sdk_redshiftdata::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_redshiftdata::types::StatusString;
use futures::{Stream, StreamExt};
use medallion_objects::{ObjectStore, S3Url};
use parquet::arrow::ArrowWriter;

use crate::name::quote_ident;
use crate::sink::{LoadMode, LoadReport, plan_columns, plan_keys};
use crate::types::redshift_type;
use crate::{Error, QualifiedName, Result};

/// Rows per staged Parquet file; Redshift's COPY loads the files of a prefix in parallel.
pub const STAGED_FILE_ROWS: usize = 4 * 1024 * 1024;

/// Where and as whom statements run: a provisioned cluster (with a database user or a Secrets
/// Manager secret) or a Serverless workgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedshiftTarget {
    pub cluster_id: Option<String>,
    pub workgroup: Option<String>,
    pub database: String,
    pub db_user: Option<String>,
    pub secret_arn: Option<String>,
    /// The IAM role Redshift assumes to read the staged files (`COPY … IAM_ROLE`).
    pub iam_role: String,
    /// `s3://bucket/prefix/` the staged Parquet files go under.
    pub staging: S3Url,
}

/// A Redshift Data API client plus the S3 store for staging.
#[derive(Debug, Clone)]
pub struct RedshiftSink {
    client: aws_sdk_redshiftdata::Client,
    objects: ObjectStore,
    target: RedshiftTarget,
    spool_dir: std::path::PathBuf,
}

/// First and longest wait between two `DescribeStatement` polls.
const POLL_FIRST: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(5);
/// Consecutive failed polls tolerated.
const POLL_RETRIES: u32 = 5;

impl RedshiftSink {
    /// Builds the Data API client from aws-config's chain, in `objects`' region;
    /// `endpoint` overrides the Data API endpoint (e.g. a local development endpoint).
    pub async fn connect(
        target: RedshiftTarget,
        objects: ObjectStore,
        endpoint: Option<&str>,
        spool_dir: &Path,
    ) -> RedshiftSink {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(objects.region().to_string()))
            .load()
            .await;
        let mut config = aws_sdk_redshiftdata::config::Builder::from(&sdk);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        RedshiftSink {
            client: aws_sdk_redshiftdata::Client::from_conf(config.build()),
            objects,
            target,
            spool_dir: spool_dir.to_path_buf(),
        }
    }

    /// Loads `batches` (each matching `schema`) into `table`; on any error nothing changes in
    /// the warehouse.
    pub async fn load<S, E>(
        &self,
        table: &QualifiedName,
        schema: &SchemaRef,
        batches: S,
        mode: LoadMode,
    ) -> Result<LoadReport>
    where
        S: Stream<Item = Result<RecordBatch, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        table.validate()?;
        let columns = plan_columns(table, schema)?;
        let mut redshift_columns = Vec::with_capacity(columns.len());
        for (column, field) in columns.iter().zip(schema.fields()) {
            let ty = redshift_type(field.data_type()).ok_or_else(|| Error::UnsupportedType {
                table: table.clone(),
                column: column.name.clone(),
                data_type: field.data_type().clone(),
            })?;
            redshift_columns.push((column.name.clone(), ty, column.nullable));
        }
        let keys = match &mode {
            LoadMode::Replace => Vec::new(),
            LoadMode::Merge { keys } => plan_keys(table, &columns, keys)?,
        };

        let load_id = uuid::Uuid::new_v4().simple().to_string();
        let table_prefix = self
            .target
            .staging
            .join(&format!("{}.{}/", table.schema, table.table));
        // Files of an earlier load of this table that was interrupted (its process killed
        // mid-load) are removed first; one load per table runs at a time.
        if let Err(error) = self.objects.delete_prefix(&table_prefix).await {
            tracing::warn!(prefix = %table_prefix, %error, "could not remove stale staged files");
        }
        let prefix = table_prefix.join(&format!("{load_id}/"));
        let result = async {
            let rows = self.stage(table, schema, batches, &prefix).await?;
            let sqls = statements(
                table,
                &redshift_columns,
                &keys,
                &prefix,
                &self.target.iam_role,
                &load_id,
            );
            let counts = self.execute_batch(table, sqls).await?;
            // Sub-statement row counts: the last one or two are the delete/insert or merge.
            let mut report = LoadReport {
                rows,
                ..LoadReport::default()
            };
            match mode {
                LoadMode::Replace => {
                    let n = counts.len();
                    if n >= 2 {
                        report.deleted = counts[n - 2];
                        report.inserted = counts[n - 1];
                    }
                }
                LoadMode::Merge { .. } => {
                    // Redshift reports a MERGE's affected rows as one count.
                    report.inserted = counts.last().copied().unwrap_or(0);
                }
            }
            Ok(report)
        }
        .await;
        // Staged files are useless after the load, whether it committed or not.
        if let Err(error) = self.objects.delete_prefix(&prefix).await {
            tracing::warn!(%prefix, %error, "could not remove staged files");
        }
        result
    }

    /// Writes the batches as Parquet files under `prefix`; returns the row count. An empty
    /// input still stages one (empty) file so COPY has a prefix to read.
    async fn stage<S, E>(
        &self,
        table: &QualifiedName,
        schema: &SchemaRef,
        batches: S,
        prefix: &S3Url,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<RecordBatch, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let staging_error = |detail: String| Error::Staging {
            table: table.clone(),
            detail,
        };
        let mut batches = std::pin::pin!(batches);
        let (mut rows, mut part, mut in_part) = (0u64, 0usize, 0usize);
        let mut writer: Option<(tempfile::NamedTempFile, ArrowWriter<std::fs::File>)> = None;
        loop {
            let next = batches.next().await;
            let roll = match &next {
                None => writer.is_some() || part == 0,
                Some(_) => in_part >= STAGED_FILE_ROWS,
            };
            if roll {
                let (file, w) = match writer.take() {
                    Some(open) => open,
                    None => self.open_part(schema).map_err(staging_error)?,
                };
                w.close().map_err(|e| staging_error(e.to_string()))?;
                let url = prefix.join(&format!("part-{part:05}.parquet"));
                self.objects
                    .upload(file.path(), &url)
                    .await
                    .map_err(|e| staging_error(e.to_string()))?;
                part += 1;
                in_part = 0;
            }
            let Some(batch) = next else { break };
            let batch = batch.map_err(|e| Error::Input {
                table: table.clone(),
                source: Box::new(e),
            })?;
            if batch.schema().fields() != schema.fields() {
                return Err(Error::BatchSchema {
                    table: table.clone(),
                    column: String::new(),
                    detail: "the batch's fields differ from the declared schema".to_owned(),
                });
            }
            if writer.is_none() {
                writer = Some(self.open_part(schema).map_err(staging_error)?);
            }
            if let Some((_, w)) = writer.as_mut() {
                w.write(&batch).map_err(|e| staging_error(e.to_string()))?;
            }
            rows += batch.num_rows() as u64;
            in_part += batch.num_rows();
        }
        Ok(rows)
    }

    fn open_part(
        &self,
        schema: &SchemaRef,
    ) -> Result<(tempfile::NamedTempFile, ArrowWriter<std::fs::File>), String> {
        let file = tempfile::NamedTempFile::new_in(&self.spool_dir)
            .map_err(|e| format!("spool folder {}: {e}", self.spool_dir.display()))?;
        let handle = file.reopen().map_err(|e| e.to_string())?;
        let writer =
            ArrowWriter::try_new(handle, schema.clone(), None).map_err(|e| e.to_string())?;
        Ok((file, writer))
    }

    /// Runs `sqls` as one transaction and waits for it; returns each statement's row count.
    async fn execute_batch(&self, table: &QualifiedName, sqls: Vec<String>) -> Result<Vec<u64>> {
        let t = &self.target;
        let submitted = self
            .client
            .batch_execute_statement()
            .set_sqls(Some(sqls))
            .database(&t.database)
            .set_cluster_identifier(t.cluster_id.clone())
            .set_workgroup_name(t.workgroup.clone())
            .set_db_user(t.db_user.clone())
            .set_secret_arn(t.secret_arn.clone())
            .statement_name(format!("medallion load {table}"))
            .send()
            .await
            .map_err(|e| redshift_error(table, "BatchExecuteStatement", e))?;
        let id = submitted.id().unwrap_or_default().to_string();
        let mut wait = POLL_FIRST;
        let mut poll_failures = 0;
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(POLL_MAX);
            // A failed poll says nothing about the statement: ask again a few times before
            // giving up (the retried task then reloads; replace and merge are idempotent).
            let status = match self.client.describe_statement().id(&id).send().await {
                Ok(status) => status,
                Err(e) if poll_failures < POLL_RETRIES => {
                    poll_failures += 1;
                    tracing::warn!(%table, statement = %id, error = %DisplayErrorContext(&e), "DescribeStatement failed; polling again");
                    continue;
                }
                Err(e) => return Err(redshift_error(table, "DescribeStatement", e)),
            };
            poll_failures = 0;
            match status.status() {
                Some(StatusString::Finished) => {
                    return Ok(status
                        .sub_statements()
                        .iter()
                        .map(|s| u64::try_from(s.result_rows()).unwrap_or(0))
                        .collect());
                }
                Some(StatusString::Failed) | Some(StatusString::Aborted) => {
                    // The failing sub-statement carries the most specific message.
                    let failed = status
                        .sub_statements()
                        .iter()
                        .find(|s| s.error().is_some_and(|e| !e.is_empty()));
                    let message = failed
                        .and_then(|s| s.error())
                        .or(status.error())
                        .unwrap_or("the statement was aborted")
                        .to_string();
                    return Err(Error::Redshift {
                        table: table.clone(),
                        statement: failed
                            .and_then(|s| s.query_string())
                            .map(|q| q.chars().take(200).collect())
                            .unwrap_or_default(),
                        message,
                    });
                }
                _ => {}
            }
        }
    }
}

/// The load's statements, in order, for one Redshift transaction.
fn statements(
    table: &QualifiedName,
    columns: &[(String, String, bool)],
    keys: &[String],
    prefix: &S3Url,
    iam_role: &str,
    load_id: &str,
) -> Vec<String> {
    let mut defs: Vec<String> = columns
        .iter()
        .map(|(name, ty, nullable)| {
            let not_null = if *nullable { "" } else { " NOT NULL" };
            format!("{} {ty}{not_null}", quote_ident(name))
        })
        .collect();
    if !keys.is_empty() {
        defs.push(format!(
            "PRIMARY KEY ({})",
            keys.iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let staging = quote_ident(&format!("medallion_staging_{load_id}"));
    let column_list = columns
        .iter()
        .map(|(name, ..)| quote_ident(name))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sqls = vec![
        format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&table.schema)),
        format!("CREATE TABLE IF NOT EXISTS {table} ({})", defs.join(", ")),
        // The staging table has the input's columns in the input's order: COPY from Parquet
        // fills columns by position, and the target may order its columns differently.
        format!(
            "CREATE TEMP TABLE {staging} ({})",
            columns
                .iter()
                .map(|(name, ty, _)| format!("{} {ty}", quote_ident(name)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "COPY {staging} FROM {} IAM_ROLE {} FORMAT AS PARQUET",
            quote_literal(&prefix.to_string()),
            quote_literal(iam_role)
        ),
    ];
    if keys.is_empty() {
        sqls.push(format!("DELETE FROM {table}"));
        sqls.push(format!(
            "INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {staging}"
        ));
    } else {
        let on = keys
            .iter()
            .map(|k| format!("{table}.{k} = {staging}.{k}", k = quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let updates: Vec<String> = columns
            .iter()
            .filter(|(name, ..)| !keys.contains(name))
            .map(|(name, ..)| format!("{c} = {staging}.{c}", c = quote_ident(name)))
            .collect();
        let values = columns
            .iter()
            .map(|(name, ..)| format!("{staging}.{}", quote_ident(name)))
            .collect::<Vec<_>>()
            .join(", ");
        // Redshift's MERGE needs both clauses; with only key columns, "update" a key to itself.
        let updates = if updates.is_empty() {
            vec![format!("{k} = {staging}.{k}", k = quote_ident(&keys[0]))]
        } else {
            updates
        };
        let matched = format!(" WHEN MATCHED THEN UPDATE SET {}", updates.join(", "));
        // Redshift does not enforce primary keys: fail the batch (and so the transaction) when
        // the input repeats a key or has a null key, as PostgreSQL's key would. The CAST of a
        // non-number fails only for a returned row; its text is the error message.
        let key_list = keys
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let null_key = keys
            .iter()
            .map(|k| format!("{} IS NULL", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" OR ");
        sqls.push(format!(
            "SELECT CAST(CASE WHEN n > 1 THEN 'medallion: the input repeats a merge key' \
             ELSE 'medallion: the input has a null merge key' END AS INTEGER) \
             FROM (SELECT COUNT(*) AS n FROM {staging} GROUP BY {key_list} HAVING COUNT(*) > 1 OR {null_key}) AS bad"
        ));
        sqls.push(format!(
            "MERGE INTO {table} USING {staging} ON {on}{matched} WHEN NOT MATCHED THEN INSERT ({column_list}) VALUES ({values})"
        ));
    }
    sqls
}

/// A SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn redshift_error<E, R>(
    table: &QualifiedName,
    call: &'static str,
    error: aws_sdk_redshiftdata::error::SdkError<E, R>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let message = match error.as_service_error() {
        Some(service) if service.code().is_some() => format!(
            "{}: {}",
            service.code().unwrap_or_default(),
            service.message().unwrap_or("no message")
        ),
        _ => DisplayErrorContext(&error).to_string(),
    };
    Error::Redshift {
        table: table.clone(),
        statement: call.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_statements_update_non_keys_and_insert_the_rest() {
        let table = QualifiedName::new("mart", "revenue");
        let columns = vec![
            ("k".to_string(), "BIGINT".to_string(), false),
            ("v".to_string(), "DECIMAL(18,2)".to_string(), true),
        ];
        let prefix = S3Url::parse("s3://stage/x/").unwrap();
        let sqls = statements(&table, &columns, &["k".into()], &prefix, "arn:role", "id1");
        assert_eq!(sqls.len(), 6);
        assert!(
            sqls[1].contains("\"k\" BIGINT NOT NULL, \"v\" DECIMAL(18,2), PRIMARY KEY (\"k\")")
        );
        assert_eq!(
            sqls[3],
            "COPY \"medallion_staging_id1\" FROM 's3://stage/x/' IAM_ROLE 'arn:role' FORMAT AS PARQUET"
        );
        assert!(sqls[4].contains("GROUP BY \"k\" HAVING COUNT(*) > 1 OR \"k\" IS NULL"));
        assert!(sqls[5].starts_with("MERGE INTO \"mart\".\"revenue\" USING \"medallion_staging_id1\" ON \"mart\".\"revenue\".\"k\" = \"medallion_staging_id1\".\"k\" WHEN MATCHED THEN UPDATE SET \"v\" = \"medallion_staging_id1\".\"v\""));
    }
}
