//! Gold for the groups that changed. A group-by gold table over one silver table is
//! recomputed only for the groups whose silver rows changed since the silver version it was
//! last computed from, while those are few; its other rows are carried over. The commit also
//! holds, as hidden files, the recomputed rows and the keys of the groups that vanished, so the
//! warehouse load can apply just those.

use std::collections::BTreeMap;

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::SchemaRef;
use futures::StreamExt;
use medallion_flight::{KeyFilter, KeySet, TableTicket};
use medallion_lake::{DataFile, Layer, TAG_HIDDEN, TableSnapshot, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{GoldSpec, TableRef};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, recorded_inputs};
use polars::prelude::{IntoLazy, SortMultipleOptions};

use crate::aggregate::{Aggregator, compute};

/// Tag of the hidden files of an incremental gold commit: [`CHANGE_UPSERTS`] or [`CHANGE_DELETES`].
pub(crate) const TAG_CHANGE: &str = "medallion.change";
/// The recomputed rows of the touched groups.
pub(crate) const CHANGE_UPSERTS: &str = "upserts";
/// One row per group that vanished: its keys, other columns null.
pub(crate) const CHANGE_DELETES: &str = "deletes";
/// Tag of every file of such a commit: the gold version the changes apply to.
pub(crate) const TAG_CHANGE_BASE: &str = "medallion.change_base";

/// Touched groups beyond this fraction of the table's make recomputing it whole the cheaper
/// way: the filtered read of silver would carry most of it anyway.
const MAX_TOUCHED_FRACTION: f64 = 0.5;

/// Largest key set sent to the refiner; beyond it the whole table is recomputed.
const MAX_FILTER_BYTES: usize = 4 * 1024 * 1024;

/// Rows per batch read from gold files.
const READ_BATCH_ROWS: usize = 64 * 1024;

/// What an incremental recompute starts from.
pub(crate) struct Incremental {
    from: TableRef,
    /// The silver version the current gold was computed from.
    since: i64,
}

/// Whether `task` may recompute only the touched groups of `current`: a group-by table over
/// one silver table, not refreshing, whose current version was computed under the same
/// definition from an older version of that silver table.
pub(crate) fn plan(
    task: &TaskRequest,
    spec: &GoldSpec,
    current: Option<&TableSnapshot>,
) -> Option<Incremental> {
    if spec.sql.is_some() || spec.group_by.is_empty() || task.full_refresh {
        return None;
    }
    let from = spec.from.clone()?;
    let recorded = recorded_inputs(current?)?;
    let wanted = task.input_versions();
    if recorded.get("spec") != wanted.get("spec") {
        return None;
    }
    let since = *recorded.get(&from.to_string())?;
    let now = *wanted.get(&from.to_string())?;
    (since >= 0 && since < now).then_some(Incremental { from, since })
}

impl Aggregator {
    /// Recomputes the groups changed since `plan.since` and commits the table; `None` when
    /// the changes are too wide for that to pay (the caller recomputes the whole table).
    pub(crate) async fn aggregate_touched(
        &self,
        task: &TaskRequest,
        spec: &GoldSpec,
        current: &TableSnapshot,
        plan: Incremental,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Option<Manifest>, TaskError> {
        let reader = &self.silver_flight;
        let tickets = task.input_tickets(&plan.from)?;
        let Some(first) = tickets.first() else {
            return Ok(None);
        };
        progress.report(
            &format!(
                "finding the groups {} changed since version {}",
                plan.from, plan.since
            ),
            0,
            0,
            true,
        );
        let changed = [first.changed_keys(plan.since, spec.group_by.clone())];
        let read = tokio::select! {
            r = reader.read_all(&changed) => r,
            _ = cancel.cancelled() => return Err(TaskError::Cancelled),
        };
        // Whatever keeps the changed groups from being known (changes too wide, an old
        // version gone), the whole table is the way.
        let keys = match read
            .map_err(|e| e.to_string())
            .and_then(|(schema, batches)| {
                concat_batches(&schema, &batches).map_err(|e| e.to_string())
            }) {
            Ok(keys) => keys,
            Err(reason) => {
                tracing::info!(table = %task.table, %reason, "recomputing the whole table");
                return Ok(None);
            }
        };
        // Floats compare by bits in a key set (0.0 is not -0.0) but group by value.
        if keys
            .schema()
            .fields()
            .iter()
            .any(|f| f.data_type().is_floating())
        {
            return Ok(None);
        }
        let groups = current.total_rows().unwrap_or(0).max(1) as f64;
        if keys.num_rows() as f64 > MAX_TOUCHED_FRACTION * groups {
            tracing::info!(table = %task.table, touched = keys.num_rows(), groups, "most groups changed; recomputing the whole table");
            return Ok(None);
        }
        progress.report(
            &format!(
                "recomputing {} of {} groups",
                keys.num_rows(),
                current.total_rows().unwrap_or(0)
            ),
            0,
            0,
            true,
        );

        // The touched groups' rows of silver, filtered where they are read.
        let (schema, recomputed) = if keys.num_rows() == 0 {
            (current.schema.clone(), Vec::new())
        } else {
            let filter = KeyFilter::new(&keys).map_err(TaskError::internal)?;
            if filter.values.len() > MAX_FILTER_BYTES {
                return Ok(None);
            }
            // One ticket for the whole version: the filtered rows are few, and the key set
            // travels once.
            let filtered = [TableTicket {
                partition: None,
                ..first.rows_in(filter)
            }];
            let (silver_schema, batches) = tokio::select! {
                r = reader.read_all(&filtered) => r.map_err(TaskError::internal)?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            tracing::info!(table = %task.table, touched = keys.num_rows(), silver_rows = rows, "recomputing touched groups");
            let (from, gold_spec) = (plan.from.clone(), spec.clone());
            // Off the async workers, as in a whole-table recompute.
            let gold = tokio::task::spawn_blocking(move || {
                let df = medallion_frames::frame_from_batches(&silver_schema, &batches)
                    .map_err(TaskError::internal)?;
                compute(&gold_spec, &BTreeMap::from([(from, df)]))
            })
            .await
            .map_err(TaskError::internal)??;
            medallion_frames::lake_batches(&gold).map_err(TaskError::internal)?
        };

        // The other groups' rows, carried over from the current version.
        let touched =
            KeySet::of_keys(&keys, &spec.group_by, &current.schema).map_err(TaskError::internal)?;
        let mut rows = Vec::new();
        for file in &current.files {
            for batch in self.read_gold(current, file).await? {
                let kept = touched.filter_out(&batch).map_err(TaskError::internal)?;
                rows.push(conform(&kept, &schema)?);
            }
        }
        rows.extend(recomputed.iter().cloned());
        let sorted = sort_groups(&schema, &rows, &spec.group_by)?;

        // Touched groups the recompute did not return have vanished.
        let recomputed_all = concat_batches(&schema, &recomputed).map_err(TaskError::internal)?;
        let group_columns = project(&recomputed_all, &spec.group_by)?;
        let present = KeySet::of_keys(&group_columns, &spec.group_by, &keys.schema())
            .map_err(TaskError::internal)?;
        let vanished = present.filter_out(&keys).map_err(TaskError::internal)?;
        let deletes = delete_rows(&vanished, &schema)?;

        progress.report(
            "writing",
            sorted.iter().map(|b| b.num_rows() as u64).sum(),
            0,
            true,
        );
        let mut writer = self
            .lake
            .writer(Layer::Gold, &spec.name, schema.clone())
            .await
            .map_err(TaskError::internal)?;
        let mut tags = task.input_tags();
        tags.insert(TAG_CHANGE_BASE.into(), current.version.to_string());
        for batch in sorted {
            writer.write(batch).await.map_err(TaskError::internal)?;
        }
        writer
            .finish_part(tags.clone())
            .await
            .map_err(TaskError::internal)?;
        for (kind, batches) in [
            (CHANGE_UPSERTS, recomputed),
            (CHANGE_DELETES, vec![deletes]),
        ] {
            let mut change = tags.clone();
            change.insert(TAG_HIDDEN.into(), "true".into());
            change.insert(TAG_CHANGE.into(), kind.into());
            change.insert(TAG_CHANGE_BASE.into(), current.version.to_string());
            for batch in batches {
                writer.write(batch).await.map_err(TaskError::internal)?;
            }
            writer
                .finish_part(change)
                .await
                .map_err(TaskError::internal)?;
        }
        let commit = task.commit_spec(&task.table, WriteMode::Overwrite);
        let outcome = writer.commit(commit).await.map_err(TaskError::internal)?;
        Manifest::after_commit(&self.lake, &task.table, &outcome)
            .await
            .map(Some)
    }

    /// Every batch of one gold data file.
    async fn read_gold(
        &self,
        snapshot: &TableSnapshot,
        file: &DataFile,
    ) -> Result<Vec<RecordBatch>, TaskError> {
        let mut batches = Vec::new();
        let mut stream = self.lake.read_file(snapshot, file, READ_BATCH_ROWS);
        while let Some(batch) = stream.next().await {
            batches.push(batch.map_err(TaskError::internal)?);
        }
        Ok(batches)
    }
}

/// `batch` with the columns of `schema`, by name, cast to its types (a table read back from
/// Parquet has plain strings where a fresh computation has string views).
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, TaskError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = batch.column_by_name(field.name()).ok_or_else(|| {
                TaskError::internal(format!("gold column {} is missing", field.name()))
            })?;
            cast(column, field.data_type()).map_err(TaskError::internal)
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(TaskError::internal)
}

/// The `columns` of `batch`, in that order.
pub(crate) fn project(batch: &RecordBatch, columns: &[String]) -> Result<RecordBatch, TaskError> {
    let indices = columns
        .iter()
        .map(|c| {
            batch
                .schema()
                .index_of(c)
                .map_err(|_| TaskError::internal(format!("gold column {c} is missing")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    batch.project(&indices).map_err(TaskError::internal)
}

/// Rows of `schema` holding the vanished groups' keys, every other column null.
fn delete_rows(vanished: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, TaskError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match vanished.column_by_name(field.name()) {
            Some(keys) => cast(keys, field.data_type()).map_err(TaskError::internal),
            None => Ok(new_null_array(field.data_type(), vanished.num_rows())),
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(TaskError::internal)
}

/// The rows ordered by the group columns, as the whole-table query orders them.
fn sort_groups(
    schema: &SchemaRef,
    rows: &[RecordBatch],
    group_by: &[String],
) -> Result<Vec<RecordBatch>, TaskError> {
    let df = medallion_frames::frame_from_batches(schema, rows).map_err(TaskError::internal)?;
    let sorted = df
        .lazy()
        .sort(group_by.to_vec(), SortMultipleOptions::default())
        .collect()
        .map_err(TaskError::internal)?;
    let (_, batches) = medallion_frames::lake_batches(&sorted).map_err(TaskError::internal)?;
    batches.iter().map(|b| conform(b, schema)).collect()
}
