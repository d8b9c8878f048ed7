//! Change data capture into silver: the new change events of a `kafka-debezium` source's bronze
//! table are applied to an `apply_changes` table by key, in sequence order, as SCD type 1
//! (current state) or type 2 (history).
//!
//! Keys are spread over hash buckets and every data file holds one bucket (tag
//! [`TAG_BUCKET`]): an apply reads and rewrites only the buckets its changes touch, so a
//! one-row change reads a `1/buckets` share of the table, however large. Deletes stay as
//! hidden tombstone rows carrying their sequence, so a late change older than the delete never
//! brings the key back. Applying a change twice is harmless: per key, the highest sequence wins.
//!
//! The bronze version applied is an application transaction of the silver commit, so the next
//! apply reads only the bronze files added after it, and a crash between the two commits
//! re-applies the same changes with the same result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, RecordBatch, StringArray, UInt32Array, new_null_array,
};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use medallion_lake::{CommitSpec, DataFile, Lake, TAG_HIDDEN, TableSnapshot, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{
    ApplyChangesSpec, CHANGE_END, CHANGE_KEY, CHANGE_SEQUENCE, CHANGE_START, ColumnType, Layer,
    ScdType, SilverSpec, TableRef,
};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest};

use crate::refine::Refiner;
use crate::row_schema::{self, Decode, RowSchema};

/// Data-file tag naming the key bucket a file holds.
pub const TAG_BUCKET: &str = "medallion.bucket";

/// Event column: `u` (the row holds from this sequence) or `d` (the key is deleted from it).
const EVENT_OP: &str = "__op";
/// Event column: the change's sequence.
const EVENT_SEQUENCE: &str = "__seq";
/// Event column: the change's Kafka offset, ordering changes of one key with equal sequences
/// (one key's changes share a partition); stored rows are older than any offset (-1).
const EVENT_OFFSET: &str = "__offset";
/// Key of the hidden rows that remember truncates (no change key is empty).
const TRUNCATE_KEY: &str = "";

/// Applies the bronze changes of this run to one `apply_changes` table.
pub async fn run(
    refiner: &Refiner,
    task: &TaskRequest,
    spec: &SilverSpec,
    apply: &ApplyChangesSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest, TaskError> {
    let lake = &refiner.lake;
    let name = &spec.name;
    let from = spec.from.clone().ok_or_else(|| {
        TaskError::Invalid(format!("silver.{name}: `apply_changes` needs `from`"))
    })?;
    let current = lake
        .snapshot(Layer::Silver, name, None)
        .await
        .map_err(TaskError::internal)?;
    if let Some(snapshot) = &current
        && task.is_done(snapshot, false).await?
    {
        return Ok(Manifest::of_snapshot(snapshot, false));
    }
    // Column types not declared come from the table as it is, or from the Debezium schema
    // of the changes (known once the first change rows are read).
    let existing = current.as_ref().map(|c| c.schema.clone());
    let table_of = |row_schema: Option<&str>| -> Result<ChangeTable, TaskError> {
        let row_schema = row_schema
            .map(RowSchema::parse)
            .transpose()
            .map_err(|e| TaskError::Invalid(format!("silver.{name}: {e}")))?;
        ChangeTable::new(spec, apply, existing.as_deref(), row_schema.as_ref())
    };

    // Which bronze version this table has applied, under this very definition.
    let bronze_version =
        task.inputs.get(&from).map(|m| m.version).ok_or_else(|| {
            TaskError::internal(format!("no manifest for input {from} in this run"))
        })?;
    let applied_id = format!(
        "medallion/changes/{}/{}",
        task.table,
        task.input_versions()
            .get("spec")
            .copied()
            .unwrap_or_default()
    );
    let applied = match (&current, task.full_refresh) {
        (Some(snapshot), false) => snapshot
            .app_version(&applied_id)
            .await
            .map_err(TaskError::internal)?,
        _ => None,
    };
    if let (Some(snapshot), Some(applied)) = (&current, applied)
        && applied >= bronze_version
    {
        return Ok(Manifest::of_snapshot(snapshot, false));
    }
    // Without a record under this definition the table is rebuilt from every change.
    let rebuild = applied.is_none();

    let tickets: Vec<_> = match applied {
        Some(since) => task
            .input_tickets(&from)?
            .first()
            .map(|t| vec![t.added_since(since)])
            .unwrap_or_default(),
        None => task.input_tickets(&from)?,
    };
    let phase = format!("reading changes of {from}");
    // Parsed chunk by chunk as they stream in: only the typed events are kept, not the
    // change rows' JSON text.
    let mut stream = refiner.bronze_flight.stream(&tickets);
    let (mut parsed, mut pending) = (Vec::new(), Vec::new());
    let (mut rows, mut bytes, mut pending_rows) = (0u64, 0u64, 0usize);
    // The table is set up on the first change rows: with their Debezium schema if they carry
    // one (it tells how values are encoded), else from the declared and existing types; rows
    // wait unparsed while neither gives every column a type.
    let mut table: Option<ChangeTable> = None;
    let mut last_schema: Option<String> = None;
    let mut held = HeldEvents::default();
    loop {
        let next = tokio::select! {
            next = stream.next_batch() => next?,
            _ = cancel.cancelled() => return Err(TaskError::Cancelled),
        };
        let Some(batch) = next else { break };
        rows += batch.num_rows() as u64;
        bytes += medallion_flight::batch_bytes(&batch);
        progress.report(&phase, rows, bytes, false);
        pending_rows += batch.num_rows();
        // The newest row schema seen decides how the rows parsed next are read.
        let found = row_schema::find_last(&batch).map(str::to_string);
        pending.push(batch);
        if let Some(text) = found.filter(|t| last_schema.as_deref() != Some(t)) {
            let parsed_schema = RowSchema::parse(&text)
                .map_err(|e| TaskError::Invalid(format!("silver.{name}: {e}")))?;
            table = match table {
                Some(t) => Some(t.decoding(&parsed_schema)),
                None => Some(table_of(Some(&text))?),
            };
            last_schema = Some(text);
        }
        if table.is_none() {
            table = table_of(None).ok();
        }
        if let Some(table) = &table
            && pending_rows >= PARSE_CHUNK_ROWS
        {
            parsed.push(parse_chunk(table, std::mem::take(&mut pending)).await?);
            pending_rows = 0;
            held.compact_if_due(table, &mut parsed).await?;
        }
    }
    progress.report(&phase, rows, bytes, true);
    if rows == 0 && !rebuild {
        // Bronze moved without new change files (e.g. a commit of skipped tombstones only).
        if let Some(snapshot) = &current {
            return Ok(Manifest::of_snapshot(snapshot, false));
        }
    }
    let table = match table {
        Some(table) => table,
        None => table_of(None)?,
    };
    if !pending.is_empty() {
        parsed.push(parse_chunk(&table, pending).await?);
    }
    let changes = table.combine(parsed)?;

    // The dead letters first, recorded under the bronze version. A rebuild rewrites them all;
    // otherwise messages an earlier, failed apply already wrote are left out.
    let dead = TableRef::new(Layer::Quarantine, name);
    let dead_app = format!("{applied_id}/dead-letters");
    let mut dead_letters = changes.dead_letters;
    if !rebuild && dead_letters.num_rows() > 0 {
        dead_letters = without_recorded(lake, &dead, &dead_app, applied, dead_letters).await?;
    }
    let quarantined_rows = dead_letters.num_rows() as u64;
    if quarantined_rows > 0 || rebuild {
        progress.report("writing dead letters", quarantined_rows, 0, true);
        let mut writer = lake
            .writer(dead.layer, &dead.name, dead_letters.schema())
            .await
            .map_err(TaskError::internal)?;
        writer
            .write(dead_letters)
            .await
            .map_err(TaskError::internal)?;
        let mode = if rebuild {
            WriteMode::Overwrite
        } else {
            WriteMode::Append
        };
        let mut commit = task.commit_spec(&dead, mode);
        commit.app_id = dead_app;
        commit.txn_version = bronze_version;
        writer.commit(commit).await.map_err(TaskError::internal)?;
    }

    // The current rows of every touched bucket, as events.
    let touched: BTreeSet<u32> = if changes.truncates.is_empty() {
        changes.buckets.clone()
    } else {
        (0..table.buckets).collect()
    };
    let mut replaced = BTreeSet::new();
    let mut existing = Vec::new();
    // Truncates stored earlier hold for the changes applied now.
    let mut stored_truncates = BTreeSet::new();
    let marker_bucket = bucket_of_key(TRUNCATE_KEY, table.buckets);
    if let (Some(snapshot), false) = (&current, rebuild)
        && !touched.contains(&marker_bucket)
    {
        let markers = snapshot
            .hidden
            .iter()
            .filter(|f| bucket_of_file(f) == Some(marker_bucket));
        for file in markers {
            for events in read_events(lake, snapshot, file, true, &table).await? {
                stored_truncates.extend(truncates_in(&events)?);
            }
        }
    }
    if let (Some(snapshot), false) = (&current, rebuild) {
        progress.report("reading touched buckets", 0, 0, true);
        let files = snapshot
            .files
            .iter()
            .map(|f| (f, false))
            .chain(snapshot.hidden.iter().map(|f| (f, true)))
            .filter(|(f, _)| bucket_of_file(f).is_none_or(|b| touched.contains(&b)));
        for (file, hidden) in files {
            replaced.insert(file.path.clone());
            let read = read_events(lake, snapshot, file, hidden, &table);
            let events = tokio::select! {
                events = read => events?,
                _ = cancel.cancelled() => return Err(TaskError::Cancelled),
            };
            existing.extend(events);
        }
    }
    if changes.events.num_rows() == 0 && !rebuild {
        // Only dead letters: the table keeps its rows; record the applied version.
        let mut commit = task.commit_spec(&task.table, WriteMode::Replace(BTreeSet::new()));
        commit.more_transactions.push((applied_id, bronze_version));
        let writer = lake
            .writer(Layer::Silver, name, table.table_schema.clone())
            .await
            .map_err(TaskError::internal)?;
        let outcome = writer.commit(commit).await.map_err(TaskError::internal)?;
        let mut manifest = Manifest::after_commit(lake, &task.table, &outcome).await?;
        manifest.quarantined_rows = quarantined_rows;
        return Ok(manifest);
    }

    progress.report("applying", changes.events.num_rows() as u64, 0, true);
    let merge_table = table.clone();
    let merged = tokio::task::spawn_blocking(move || {
        merge_table.merge(existing, changes.events, stored_truncates, &touched)
    })
    .await
    .map_err(TaskError::internal)??;
    if cancel.is_cancelled() {
        return Err(TaskError::Cancelled);
    }

    progress.report("writing", merged.rows() as u64, 0, true);
    let mut writer = lake
        .writer(Layer::Silver, name, table.table_schema.clone())
        .await
        .map_err(TaskError::internal)?;
    for (bucket, (visible, hidden)) in merged.buckets {
        let mut tags = task.input_tags();
        tags.insert(TAG_BUCKET.into(), bucket.to_string());
        writer.write(visible).await.map_err(TaskError::internal)?;
        writer
            .finish_part(tags.clone())
            .await
            .map_err(TaskError::internal)?;
        tags.insert(TAG_HIDDEN.into(), "true".into());
        writer.write(hidden).await.map_err(TaskError::internal)?;
        writer
            .finish_part(tags)
            .await
            .map_err(TaskError::internal)?;
    }
    let mode = if rebuild {
        WriteMode::Overwrite
    } else {
        WriteMode::Replace(replaced)
    };
    let mut commit: CommitSpec = task.commit_spec(&task.table, mode);
    commit.more_transactions.push((applied_id, bronze_version));
    let outcome = writer.commit(commit).await.map_err(TaskError::internal)?;
    let mut manifest = Manifest::after_commit(lake, &task.table, &outcome).await?;
    manifest.quarantined_rows = quarantined_rows;
    tracing::info!(table = %task.table, bronze_version, rebuild, "changes applied");
    Ok(manifest)
}

/// Change rows parsed at a time.
const PARSE_CHUNK_ROWS: usize = 64 * 1024;

/// Events held before an SCD1 table first keeps only each key's newest.
const COMPACT_EVENTS: usize = 4 * PARSE_CHUNK_ROWS;

/// The parsed events an apply holds until its merge. For SCD1 only each key's newest event
/// decides the key's row (a truncate deletes what is older than it, and only the newest
/// truncate can), so a backlog of many changes to the same keys is cut down to one event per
/// key whenever the held events double: memory follows the keys changed, not the changes.
#[derive(Default)]
struct HeldEvents {
    /// Events held after the last compaction.
    after_compaction: usize,
}

impl HeldEvents {
    async fn compact_if_due(
        &mut self,
        table: &ChangeTable,
        parsed: &mut Vec<Changes>,
    ) -> Result<(), TaskError> {
        if table.scd != ScdType::Scd1 {
            return Ok(());
        }
        let held: usize = parsed.iter().map(|c| c.events.num_rows()).sum();
        if held < COMPACT_EVENTS.max(2 * self.after_compaction) {
            return Ok(());
        }
        let table = table.clone();
        let parts = std::mem::take(parsed);
        let compacted = tokio::task::spawn_blocking(move || {
            let mut all = table.combine(parts)?;
            all.events = table.newest_per_key(&all.events)?;
            Ok::<_, TaskError>(all)
        })
        .await
        .map_err(TaskError::internal)??;
        self.after_compaction = compacted.events.num_rows();
        tracing::debug!(
            held,
            kept = self.after_compaction,
            "kept the newest change per key"
        );
        parsed.push(compacted);
        Ok(())
    }
}

/// Parses one chunk of change rows off the async threads.
async fn parse_chunk(table: &ChangeTable, batches: Vec<RecordBatch>) -> Result<Changes, TaskError> {
    let table = table.clone();
    tokio::task::spawn_blocking(move || table.parse_changes(&batches))
        .await
        .map_err(TaskError::internal)?
}

/// `dead_letters` without the messages the dead-letter table already holds: an apply that
/// failed after writing its dead letters recorded a bronze version beyond `applied`.
async fn without_recorded(
    lake: &Lake,
    table: &TableRef,
    app_id: &str,
    applied: Option<i64>,
    dead_letters: RecordBatch,
) -> Result<RecordBatch, TaskError> {
    use futures::StreamExt as _;
    let Some(snapshot) = lake
        .snapshot(table.layer, &table.name, None)
        .await
        .map_err(TaskError::internal)?
    else {
        return Ok(dead_letters);
    };
    let written = snapshot
        .app_version(app_id)
        .await
        .map_err(TaskError::internal)?;
    if written <= applied {
        return Ok(dead_letters);
    }
    let position = |batch: &RecordBatch| -> Result<Vec<(String, i32, i64)>, TaskError> {
        let (topics, partitions, offsets) = origin(batch)?;
        Ok((0..batch.num_rows())
            .map(|i| {
                (
                    topics.value(i).to_string(),
                    partitions.value(i),
                    offsets.value(i),
                )
            })
            .collect())
    };
    let mut recorded = std::collections::HashSet::new();
    for file in &snapshot.files {
        let mut stream = lake.read_file(&snapshot, file, 64 * 1024);
        while let Some(batch) = stream.next().await {
            recorded.extend(position(&batch.map_err(TaskError::internal)?)?);
        }
    }
    let keep: arrow::array::BooleanArray = position(&dead_letters)?
        .into_iter()
        .map(|p| Some(!recorded.contains(&p)))
        .collect();
    arrow::compute::filter_record_batch(&dead_letters, &keep).map_err(TaskError::internal)
}

/// The sequences of the truncates among `events` (deletes of [`TRUNCATE_KEY`]).
fn truncates_in(events: &RecordBatch) -> Result<Vec<String>, TaskError> {
    let keys = strings(events, CHANGE_KEY)?;
    let seqs = strings(events, EVENT_SEQUENCE)?;
    Ok((0..events.num_rows())
        .filter(|&i| keys.is_valid(i) && keys.value(i) == TRUNCATE_KEY && seqs.is_valid(i))
        .map(|i| seqs.value(i).to_string())
        .collect())
}

/// The bucket a data file holds, from its tag.
fn bucket_of_file(file: &DataFile) -> Option<u32> {
    file.tags.get(TAG_BUCKET).and_then(|b| b.parse().ok())
}

/// The bucket of a key: FNV-1a of its text, stable across versions and machines.
fn bucket_of_key(key: &str, buckets: u32) -> u32 {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % u64::from(buckets)) as u32
}

/// Reads one data file of the table as events: its rows hold from their sequence (`u`), its
/// tombstones delete from theirs (`d`).
async fn read_events(
    lake: &Lake,
    snapshot: &TableSnapshot,
    file: &DataFile,
    hidden: bool,
    table: &ChangeTable,
) -> Result<Vec<RecordBatch>, TaskError> {
    use futures::StreamExt as _;
    let mut stream = lake.read_file(snapshot, file, 64 * 1024);
    let mut events = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(TaskError::internal)?;
        events.extend(table.rows_as_events(&batch, hidden)?);
    }
    Ok(events)
}

/// What one `apply_changes` table looks like, and the pure steps of applying changes to it.
#[derive(Clone)]
struct ChangeTable {
    name: String,
    scd: ScdType,
    buckets: u32,
    /// Declared columns, as stored.
    columns: Vec<Field>,
    /// Field of the row image each declared column comes from.
    image_fields: Vec<String>,
    /// How each declared column's image field is read.
    decode: Vec<Decode>,
    /// Positions (in `columns`) of the columns whose change starts a new SCD2 version.
    tracked: Vec<usize>,
    /// Declared columns, `__key`, `__seq`, `__op`, `__offset`.
    event_schema: SchemaRef,
    /// Declared columns, `__key`, (SCD2: `__start_at`, `__end_at`,) `__sequence`.
    table_schema: SchemaRef,
}

/// The parsed new changes of one apply.
struct Changes {
    /// Upserts and deletes, as events.
    events: RecordBatch,
    /// Buckets of the keys they touch.
    buckets: BTreeSet<u32>,
    /// Sequences of the truncates among them.
    truncates: Vec<String>,
    /// Changes that could not be applied, with why.
    dead_letters: RecordBatch,
}

/// The new content of the touched buckets: visible rows and hidden tombstones per bucket.
struct Merged {
    buckets: BTreeMap<u32, (RecordBatch, RecordBatch)>,
}

impl Merged {
    fn rows(&self) -> usize {
        self.buckets
            .values()
            .map(|(v, h)| v.num_rows() + h.num_rows())
            .sum()
    }
}

/// How a field described by a row schema is read into a column stored as `stored`: as the
/// schema says when that produces the stored type (declared types may differ), else as is.
fn decode_for(stored: &DataType, described: Option<&row_schema::FieldType>) -> Decode {
    let read = described.map_or(Decode::AsIs, |d| d.decode);
    let fits = matches!(
        (read, stored),
        (Decode::Timestamp(_), DataType::Timestamp(..))
            | (Decode::DecimalBytes { .. }, DataType::Decimal128(..))
            | (Decode::AsIs, _)
    );
    if fits { read } else { Decode::AsIs }
}

fn arrow_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::String => DataType::Utf8,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Date => DataType::Date32,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnType::Decimal { precision, scale } => DataType::Decimal128(precision, scale as i8),
    }
}

/// Schema of the dead-letter table.
fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("_topic", DataType::Utf8, true),
        Field::new("_partition", DataType::Int32, true),
        Field::new("_offset", DataType::Int64, true),
        Field::new("_error", DataType::Utf8, true),
        Field::new("_value", DataType::Binary, true),
    ]))
}

/// Column `name` of `rows` (rows of several change batches, batch by batch) as one array of
/// type `empty` when there are none; the column is looked up once per batch, not per row.
fn gather(
    rows: &[(&RecordBatch, usize)],
    name: &str,
    empty: &DataType,
) -> Result<ArrayRef, TaskError> {
    let mut sources: Vec<&dyn Array> = Vec::new();
    let mut indices = Vec::with_capacity(rows.len());
    let mut current: Option<&RecordBatch> = None;
    for &(batch, row) in rows {
        if !current.is_some_and(|c| std::ptr::eq(c, batch)) {
            sources.push(column(batch, name)?.as_ref());
            current = Some(batch);
        }
        indices.push((sources.len() - 1, row));
    }
    if sources.is_empty() {
        return Ok(arrow::array::new_empty_array(empty));
    }
    arrow::compute::interleave(&sources, &indices).map_err(TaskError::internal)
}

/// A text column of `n` times `value`.
fn repeated(value: &str, n: usize) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(value, n)))
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, TaskError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| TaskError::internal(format!("change batch has no `{name}` column")))
}

/// The Kafka topic, partition and offset columns a change row came from.
fn origin(
    batch: &RecordBatch,
) -> Result<
    (
        &StringArray,
        &arrow::array::Int32Array,
        &arrow::array::Int64Array,
    ),
    TaskError,
> {
    let partitions = column(batch, "_partition")?
        .as_any()
        .downcast_ref::<arrow::array::Int32Array>()
        .ok_or_else(|| TaskError::internal("`_partition` is not int32"))?;
    let offsets = column(batch, "_offset")?
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .ok_or_else(|| TaskError::internal("`_offset` is not int64"))?;
    Ok((strings(batch, "_topic")?, partitions, offsets))
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, TaskError> {
    column(batch, name)?
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| TaskError::internal(format!("`{name}` is not a string column")))
}

fn arrow_error(table: &str, what: &str) -> impl FnOnce(arrow::error::ArrowError) -> TaskError {
    let context = format!("silver.{table}: {what}");
    move |e| TaskError::internal(format!("{context}: {e}"))
}

impl ChangeTable {
    /// The table of `spec`. A column's type is its declared one, else its type in the
    /// `existing` table, else the one the Debezium `row_schema` gives its image field; how the
    /// field's values are read comes from `row_schema` when there is one.
    fn new(
        spec: &SilverSpec,
        apply: &ApplyChangesSpec,
        existing: Option<&Schema>,
        row_schema: Option<&RowSchema>,
    ) -> Result<ChangeTable, TaskError> {
        let declared = spec.columns.as_deref().unwrap_or_default();
        let mut columns = Vec::new();
        let mut image_fields = Vec::new();
        let mut decode = Vec::new();
        let mut unknown = Vec::new();
        for c in declared {
            let image_field = c.from.clone().unwrap_or_else(|| c.name.clone());
            let described = row_schema.and_then(|r| r.get(&image_field));
            let stored = match (
                c.data_type,
                existing.and_then(|e| e.field_with_name(&c.name).ok()),
            ) {
                (Some(t), _) => Some(arrow_type(t)),
                (None, Some(field)) => Some(field.data_type().clone()),
                (None, None) => match described.map(|d| &d.column) {
                    Some(Ok(t)) => Some(arrow_type(*t)),
                    Some(Err(why)) => {
                        unknown.push(format!("`{}`: {why}", c.name));
                        None
                    }
                    None => {
                        unknown.push(format!("`{}`", c.name));
                        None
                    }
                },
            };
            let Some(stored) = stored else { continue };
            decode.push(decode_for(&stored, described));
            columns.push(Field::new(&c.name, stored, true));
            image_fields.push(image_field);
        }
        if !unknown.is_empty() {
            let why = if row_schema.is_some() {
                "the Debezium schema of the changes does not give"
            } else {
                "no change read so far carries a Debezium schema (none has arrived yet, or the JsonConverter's schemas are off) to give"
            };
            return Err(TaskError::Invalid(format!(
                "silver.{}: {why} the type of {}; declare it with `type`",
                spec.name,
                unknown.join(", ")
            )));
        }
        let tracked = match &apply.track_history_on {
            Some(names) => names
                .iter()
                .filter_map(|n| columns.iter().position(|f| f.name() == n))
                .collect(),
            None => (0..columns.len()).collect(),
        };
        let key = Field::new(CHANGE_KEY, DataType::Utf8, true);
        let text = |name: &str| Field::new(name, DataType::Utf8, true);
        let mut event_fields = columns.clone();
        event_fields.extend([
            key.clone(),
            text(EVENT_SEQUENCE),
            text(EVENT_OP),
            Field::new(EVENT_OFFSET, DataType::Int64, false),
        ]);
        let mut table_fields = columns.clone();
        table_fields.push(key);
        if apply.stored_as == ScdType::Scd2 {
            table_fields.extend([text(CHANGE_START), text(CHANGE_END)]);
        }
        table_fields.push(text(CHANGE_SEQUENCE));
        Ok(ChangeTable {
            name: spec.name.clone(),
            scd: apply.stored_as,
            buckets: apply.buckets.max(1),
            columns,
            image_fields,
            decode,
            tracked,
            event_schema: Arc::new(Schema::new(event_fields)),
            table_schema: Arc::new(Schema::new(table_fields)),
        })
    }

    /// Turns bronze change rows into events (typed from their row images), truncates and dead
    /// letters. A truncate becomes a delete of the reserved key [`TRUNCATE_KEY`], so it is
    /// stored (hidden) and holds for changes that arrive later.
    fn parse_changes(&self, batches: &[RecordBatch]) -> Result<Changes, TaskError> {
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        let mut dead = DeadLetters::default();
        let mut truncates = Vec::new();
        for batch in batches {
            let op = strings(batch, "op")?;
            let key = strings(batch, "key")?;
            let seq = strings(batch, "sequence")?;
            let error = strings(batch, "_error")?;
            let after = strings(batch, "after")?;
            for row in 0..batch.num_rows() {
                if error.is_valid(row) {
                    dead.push_raw(batch, row, error.value(row))?;
                    continue;
                }
                if !op.is_valid(row) || !seq.is_valid(row) {
                    dead.push_raw(batch, row, "change without `op` or sequence")?;
                    continue;
                }
                match op.value(row) {
                    "c" | "u" | "r" if after.is_valid(row) && key.is_valid(row) => {
                        upserts.push((batch, row))
                    }
                    "d" if key.is_valid(row) => deletes.push((batch, row)),
                    "t" => truncates.push(seq.value(row).to_string()),
                    "c" | "u" | "r" | "d" => {
                        dead.push_raw(batch, row, "change without its row image or key")?;
                    }
                    other => {
                        dead.push_raw(batch, row, &format!("cannot apply op `{other}`"))?;
                    }
                }
            }
        }
        let (images, upserts) = self.decode_images(&upserts, &mut dead)?;
        let mut parts = Vec::new();
        if !upserts.is_empty() {
            parts.push(self.events_from_changes(Some(images), &upserts, "u")?);
        }
        if !deletes.is_empty() {
            parts.push(self.events_from_changes(None, &deletes, "d")?);
        }
        for at in &truncates {
            parts.push(self.deletes_at(std::iter::once(TRUNCATE_KEY), at)?);
        }
        let events = concat_batches(&self.event_schema, &parts)
            .map_err(arrow_error(&self.name, "collecting changes"))?;
        let keys = strings(&events, CHANGE_KEY)?;
        let buckets = keys
            .iter()
            .flatten()
            .map(|k| bucket_of_key(k, self.buckets))
            .collect();
        Ok(Changes {
            events,
            buckets,
            truncates,
            dead_letters: dead.finish()?,
        })
    }

    /// The changes of several chunks as one.
    fn combine(&self, parts: Vec<Changes>) -> Result<Changes, TaskError> {
        let mut events = Vec::with_capacity(parts.len());
        let mut dead_letters = Vec::with_capacity(parts.len());
        let mut buckets = BTreeSet::new();
        let mut truncates = Vec::new();
        for part in parts {
            events.push(part.events);
            dead_letters.push(part.dead_letters);
            buckets.extend(part.buckets);
            truncates.extend(part.truncates);
        }
        Ok(Changes {
            events: concat_batches(&self.event_schema, &events)
                .map_err(arrow_error(&self.name, "collecting changes"))?,
            buckets,
            truncates,
            dead_letters: concat_batches(&dead_letter_schema(), &dead_letters)
                .map_err(arrow_error(&self.name, "collecting dead letters"))?,
        })
    }

    /// The same table, its fields read as `row_schema` says they are encoded (a later schema
    /// of the same source; the column types stay).
    fn decoding(&self, row_schema: &RowSchema) -> ChangeTable {
        let mut table = self.clone();
        table.decode = self
            .columns
            .iter()
            .zip(&self.image_fields)
            .map(|(column, field)| decode_for(column.data_type(), row_schema.get(field)))
            .collect();
        table
    }

    /// The newest event of each key in `events`, by (sequence, offset) as the merge orders them.
    fn newest_per_key(&self, events: &RecordBatch) -> Result<RecordBatch, TaskError> {
        let order = lexsort_to_indices(
            &[CHANGE_KEY, EVENT_SEQUENCE, EVENT_OFFSET]
                .iter()
                .map(|name| {
                    Ok(SortColumn {
                        values: column(events, name)?.clone(),
                        options: None,
                    })
                })
                .collect::<Result<Vec<_>, TaskError>>()?,
            None,
        )
        .map_err(arrow_error(&self.name, "ordering changes"))?;
        let keys = strings(events, CHANGE_KEY)?;
        let sorted = order.values();
        let newest: UInt32Array = sorted
            .iter()
            .enumerate()
            .filter(|&(i, &row)| {
                sorted
                    .get(i + 1)
                    .is_none_or(|&next| keys.value(next as usize) != keys.value(row as usize))
            })
            .map(|(_, &row)| row)
            .collect();
        let columns = events
            .columns()
            .iter()
            .map(|c| take(c, &newest, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_error(&self.name, "keeping the newest changes"))?;
        RecordBatch::try_new(events.schema(), columns)
            .map_err(arrow_error(&self.name, "keeping the newest changes"))
    }

    /// Decodes the `after` images of `rows` into the declared columns. Rows whose image does not
    /// fit the declared types become dead letters; the rest are returned with their images.
    fn decode_images<'a>(
        &self,
        rows: &[(&'a RecordBatch, usize)],
        dead: &mut DeadLetters,
    ) -> Result<(RecordBatch, Vec<(&'a RecordBatch, usize)>), TaskError> {
        // Reads the image fields of the columns at `positions` and converts them to the
        // stored types.
        // `plain` reads every field as its stored type, numbers coerced to text where text is
        // wanted; otherwise decimal bytes are read as JSON strings only (a number coerced to
        // text could pass for base64).
        let decode_pass = |positions: &[usize],
                           rows: &[(&RecordBatch, usize)],
                           plain: bool|
         -> Result<RecordBatch, arrow::error::ArrowError> {
            let stored: Vec<Field> = positions.iter().map(|&i| self.columns[i].clone()).collect();
            let decode: Vec<Decode> = positions
                .iter()
                .map(|&i| if plain { Decode::AsIs } else { self.decode[i] })
                .collect();
            let schema = Arc::new(Schema::new(
                positions
                    .iter()
                    .zip(&decode)
                    .map(|(&i, d)| {
                        Field::new(
                            &self.image_fields[i],
                            d.read_type(self.columns[i].data_type()),
                            true,
                        )
                    })
                    .collect::<Vec<_>>(),
            ));
            let bytes = decode
                .iter()
                .any(|d| matches!(d, Decode::DecimalBytes { .. }));
            let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
                .with_batch_size(rows.len().max(1))
                .with_coerce_primitive(!bytes)
                .build_decoder()?;
            for (batch, row) in rows {
                // Checked by the caller: the column exists and the value is set.
                let after = batch
                    .column_by_name("after")
                    .and_then(|a| a.as_any().downcast_ref::<StringArray>())
                    .map_or("{}", |a| a.value(*row));
                let mut text = after.as_bytes();
                while !text.is_empty() {
                    let read = decoder.decode(text)?;
                    if read == 0 {
                        return Err(arrow::error::ArrowError::JsonError(
                            "row image is not one JSON object".into(),
                        ));
                    }
                    text = &text[read..];
                }
            }
            let read = decoder
                .flush()?
                .unwrap_or_else(|| RecordBatch::new_empty(schema.clone()));
            row_schema::convert_batch(read, &stored, &decode)
        };
        // Decodes the columns at `positions`; a JSON reader takes each field once, so columns
        // taken from the same field are read in further passes.
        let decode_as = |positions: &[usize],
                         rows: &[(&RecordBatch, usize)]|
         -> Result<RecordBatch, arrow::error::ArrowError> {
            // Decimal bytes get passes of their own (read without coercion); if their values
            // turn out to be numbers (the converter's `decimal.format=NUMERIC`), they are read
            // as plain decimals.
            let is_bytes = |p: usize| matches!(self.decode[p], Decode::DecimalBytes { .. });
            let mut passes: Vec<Vec<usize>> = Vec::new();
            for &p in positions {
                let field = &self.image_fields[p];
                let pass = if is_bytes(p) {
                    None
                } else {
                    passes.iter_mut().find(|pass| {
                        pass.iter()
                            .all(|&q| &self.image_fields[q] != field && !is_bytes(q))
                    })
                };
                match pass {
                    Some(pass) => pass.push(p),
                    None => passes.push(vec![p]),
                }
            }
            let read_pass = |pass: &[usize]| match decode_pass(pass, rows, false) {
                Err(_) if pass.iter().all(|&p| is_bytes(p)) => decode_pass(pass, rows, true),
                read => read,
            };
            if let [only] = passes.as_slice() {
                return read_pass(only);
            }
            let mut columns: BTreeMap<usize, ArrayRef> = BTreeMap::new();
            for pass in &passes {
                let read = read_pass(pass)?;
                columns.extend(pass.iter().copied().zip(read.columns().iter().cloned()));
            }
            let fields: Vec<Field> = positions
                .iter()
                .map(|&p| {
                    Field::new(
                        &self.image_fields[p],
                        self.columns[p].data_type().clone(),
                        true,
                    )
                })
                .collect();
            let arrays = positions
                .iter()
                .map(|p| {
                    columns.remove(p).ok_or_else(|| {
                        arrow::error::ArrowError::JsonError("a column was not read".into())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new_with_options(
                Arc::new(Schema::new(fields)),
                arrays,
                &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.len())),
            )
        };
        let all: Vec<usize> = (0..self.columns.len()).collect();
        let decode = |rows: &[(&RecordBatch, usize)]| decode_as(&all, rows);
        // The first field of one row's image that does not fit its declared type.
        let field_at_fault = |row: (&RecordBatch, usize)| {
            (0..self.columns.len()).find_map(|i| {
                decode_as(&[i], &[row]).err().map(|e| {
                    format!(
                        "field `{}` does not fit {}: {e}",
                        self.image_fields[i],
                        self.columns[i].data_type()
                    )
                })
            })
        };
        let (images, kept) = match decode(rows) {
            Ok(images) => (images, rows.to_vec()),
            Err(_) => {
                // Find the rows at fault one by one (only on this error path).
                let mut kept = Vec::new();
                for &(batch, row) in rows {
                    match decode(&[(batch, row)]) {
                        Ok(_) => kept.push((batch, row)),
                        Err(e) => dead.push_image(
                            batch,
                            row,
                            &format!(
                                "row image does not fit the declared columns: {}",
                                field_at_fault((batch, row)).unwrap_or_else(|| e.to_string())
                            ),
                        )?,
                    }
                }
                let images =
                    decode(&kept).map_err(arrow_error(&self.name, "decoding row images"))?;
                (images, kept)
            }
        };
        if images.num_rows() != kept.len() {
            return Err(TaskError::internal(format!(
                "silver.{}: {} row images decoded into {} rows",
                self.name,
                kept.len(),
                images.num_rows()
            )));
        }
        Ok((images, kept))
    }

    /// Events of `op` for `rows`, with the declared columns from `images` (null without).
    fn events_from_changes(
        &self,
        images: Option<RecordBatch>,
        rows: &[(&RecordBatch, usize)],
        op: &str,
    ) -> Result<RecordBatch, TaskError> {
        let n = rows.len();
        let mut arrays: Vec<ArrayRef> = match images {
            Some(images) => images.columns().to_vec(),
            None => self
                .columns
                .iter()
                .map(|f| new_null_array(f.data_type(), n))
                .collect(),
        };
        arrays.push(gather(rows, "key", &DataType::Utf8)?);
        arrays.push(gather(rows, "sequence", &DataType::Utf8)?);
        arrays.push(repeated(op, n));
        arrays.push(gather(rows, "_offset", &DataType::Int64)?);
        RecordBatch::try_new(self.event_schema.clone(), arrays)
            .map_err(arrow_error(&self.name, "building change events"))
    }

    /// Rows of a stored file as events: each row holds from its `__sequence` (SCD1); an SCD2
    /// version holds from its `__start_at` and took its values at its `__sequence`, so a late
    /// change between the two still loses to the values.
    fn rows_as_events(
        &self,
        batch: &RecordBatch,
        hidden: bool,
    ) -> Result<Vec<RecordBatch>, TaskError> {
        let mut events = vec![self.rows_as_events_at(batch, hidden, CHANGE_SEQUENCE)?];
        if self.scd == ScdType::Scd2 && !hidden {
            events.push(self.rows_as_events_at(batch, hidden, CHANGE_START)?);
        }
        Ok(events)
    }

    fn rows_as_events_at(
        &self,
        batch: &RecordBatch,
        hidden: bool,
        since: &str,
    ) -> Result<RecordBatch, TaskError> {
        let n = batch.num_rows();
        let mut arrays = Vec::with_capacity(self.event_schema.fields().len());
        for field in &self.columns {
            let stored = column(batch, field.name())?;
            arrays.push(if stored.data_type() == field.data_type() {
                stored.clone()
            } else {
                arrow::compute::cast(stored, field.data_type())
                    .map_err(arrow_error(&self.name, "reading stored rows"))?
            });
        }
        arrays.push(column(batch, CHANGE_KEY)?.clone());
        arrays.push(column(batch, since)?.clone());
        let op = if hidden { "d" } else { "u" };
        arrays.push(repeated(op, n));
        arrays.push(Arc::new(arrow::array::Int64Array::from(vec![-1; n])));
        RecordBatch::try_new(self.event_schema.clone(), arrays)
            .map_err(arrow_error(&self.name, "reading stored rows"))
    }

    /// The new content of the touched buckets from their stored rows and the new events.
    fn merge(
        &self,
        existing: Vec<RecordBatch>,
        new: RecordBatch,
        mut truncates: BTreeSet<String>,
        touched: &BTreeSet<u32>,
    ) -> Result<Merged, TaskError> {
        let mut parts = existing;
        parts.push(new);
        let mut events = concat_batches(&self.event_schema, &parts)
            .map_err(arrow_error(&self.name, "collecting events"))?;
        drop(parts);
        truncates.extend(truncates_in(&events)?);
        if !truncates.is_empty() {
            // A truncate deletes every key at its sequence; later changes still apply.
            let keys: BTreeSet<&str> = strings(&events, CHANGE_KEY)?
                .iter()
                .flatten()
                .filter(|k| *k != TRUNCATE_KEY)
                .collect();
            let mut parts = vec![events.clone()];
            for at in &truncates {
                parts.push(self.deletes_at(keys.iter().copied(), at)?);
            }
            events = concat_batches(&self.event_schema, &parts)
                .map_err(arrow_error(&self.name, "applying a truncate"))?;
        }

        // Per key in sequence order; on equal sequences the later event (a later offset; any
        // new change over a stored row) wins.
        let order = lexsort_to_indices(
            &[
                SortColumn {
                    values: column(&events, CHANGE_KEY)?.clone(),
                    options: None,
                },
                SortColumn {
                    values: column(&events, EVENT_SEQUENCE)?.clone(),
                    options: None,
                },
                SortColumn {
                    values: column(&events, EVENT_OFFSET)?.clone(),
                    options: None,
                },
            ],
            None,
        )
        .map_err(arrow_error(&self.name, "ordering changes"))?;
        let keys = strings(&events, CHANGE_KEY)?;
        let seqs = strings(&events, EVENT_SEQUENCE)?;
        let ops = strings(&events, EVENT_OP)?;
        let tracked = if self.scd == ScdType::Scd2 {
            let converter = RowConverter::new(
                self.tracked
                    .iter()
                    .map(|&i| SortField::new(self.columns[i].data_type().clone()))
                    .collect(),
            )
            .map_err(arrow_error(&self.name, "comparing tracked columns"))?;
            let arrays: Vec<ArrayRef> = self
                .tracked
                .iter()
                .map(|&i| events.column(i).clone())
                .collect();
            Some(
                converter
                    .convert_columns(&arrays)
                    .map_err(arrow_error(&self.name, "comparing tracked columns"))?,
            )
        } else {
            None
        };

        // Rows to keep: (event holding the values, event starting it, event ending it).
        let mut rows: Vec<(u32, u32, Option<u32>)> = Vec::new();
        let mut tombstones: Vec<u32> = Vec::new();
        let order = order.values();
        let mut group: Vec<u32> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let key = keys.value(order[i] as usize);
            let mut end = i;
            while end < order.len() && keys.value(order[end] as usize) == key {
                end += 1;
            }
            // One event per sequence: the last of equal ones.
            group.clear();
            group.extend(
                (i..end)
                    .filter(|&j| {
                        j + 1 == end
                            || seqs.value(order[j] as usize) != seqs.value(order[j + 1] as usize)
                    })
                    .map(|j| order[j]),
            );
            match &tracked {
                None => {
                    if let Some(&last) = group.last() {
                        if ops.value(last as usize) == "u" {
                            rows.push((last, last, None));
                        } else {
                            tombstones.push(last);
                        }
                    }
                }
                Some(tracked) => {
                    let mut open: Option<(u32, u32)> = None;
                    for &e in &group {
                        if ops.value(e as usize) == "u" {
                            match open {
                                Some((values, start))
                                    if tracked.row(values as usize) == tracked.row(e as usize) =>
                                {
                                    // Untracked columns changed: the version takes the new values.
                                    open = Some((e, start));
                                }
                                Some((values, start)) => {
                                    rows.push((values, start, Some(e)));
                                    open = Some((e, e));
                                }
                                None => open = Some((e, e)),
                            }
                        } else {
                            if let Some((values, start)) = open.take() {
                                rows.push((values, start, Some(e)));
                            }
                            tombstones.push(e);
                        }
                    }
                    if let Some((values, start)) = open {
                        rows.push((values, start, None));
                    }
                }
            }
            i = end;
        }

        // Split by bucket, each bucket's rows in key order.
        let mut by_bucket: BTreeMap<u32, (Vec<(u32, u32, Option<u32>)>, Vec<u32>)> = touched
            .iter()
            .map(|&b| (b, (Vec::new(), Vec::new())))
            .collect();
        for row in rows {
            let bucket = bucket_of_key(keys.value(row.0 as usize), self.buckets);
            by_bucket.entry(bucket).or_default().0.push(row);
        }
        for t in tombstones {
            let bucket = bucket_of_key(keys.value(t as usize), self.buckets);
            by_bucket.entry(bucket).or_default().1.push(t);
        }
        let mut buckets = BTreeMap::new();
        for (bucket, (rows, tombstones)) in by_bucket {
            let visible = self.table_rows(&events, &rows)?;
            let hidden: Vec<_> = tombstones.iter().map(|&t| (t, t, None)).collect();
            let hidden = self.table_rows(&events, &hidden)?;
            buckets.insert(bucket, (visible, hidden));
        }
        Ok(Merged { buckets })
    }

    /// Table rows from events: values, key and `__sequence` of the first index, SCD2's
    /// `__start_at` and `__end_at` from the others.
    fn table_rows(
        &self,
        events: &RecordBatch,
        rows: &[(u32, u32, Option<u32>)],
    ) -> Result<RecordBatch, TaskError> {
        let error = |what| arrow_error(&self.name, what);
        let values = UInt32Array::from_iter_values(rows.iter().map(|r| r.0));
        let starts = UInt32Array::from_iter_values(rows.iter().map(|r| r.1));
        let ends: UInt32Array = rows.iter().map(|r| r.2).collect();
        let mut arrays = Vec::with_capacity(self.table_schema.fields().len());
        for i in 0..=self.columns.len() {
            // The declared columns, then the key.
            arrays.push(take(events.column(i), &values, None).map_err(error("taking rows"))?);
        }
        let seq = column(events, EVENT_SEQUENCE)?;
        if self.scd == ScdType::Scd2 {
            arrays.push(take(seq, &starts, None).map_err(error("taking sequences"))?);
            arrays.push(take(seq, &ends, None).map_err(error("taking sequences"))?);
        }
        arrays.push(take(seq, &values, None).map_err(error("taking sequences"))?);
        RecordBatch::try_new(self.table_schema.clone(), arrays).map_err(error("building rows"))
    }

    /// Delete events for `keys` at sequence `at`.
    fn deletes_at<'a>(
        &self,
        keys: impl Iterator<Item = &'a str>,
        at: &str,
    ) -> Result<RecordBatch, TaskError> {
        let keys = StringArray::from_iter_values(keys);
        let n = keys.len();
        let mut arrays: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|f| new_null_array(f.data_type(), n))
            .collect();
        arrays.push(Arc::new(keys));
        arrays.push(repeated(at, n));
        arrays.push(repeated("d", n));
        arrays.push(Arc::new(arrow::array::Int64Array::from(vec![i64::MAX; n])));
        RecordBatch::try_new(self.event_schema.clone(), arrays)
            .map_err(arrow_error(&self.name, "applying a truncate"))
    }
}

/// Changes that cannot be applied: where they came from, why, and their bytes.
#[derive(Default)]
struct DeadLetters {
    topic: arrow::array::StringBuilder,
    partition: arrow::array::Int32Builder,
    offset: arrow::array::Int64Builder,
    error: arrow::array::StringBuilder,
    value: arrow::array::BinaryBuilder,
}

impl DeadLetters {
    fn push_origin(
        &mut self,
        batch: &RecordBatch,
        row: usize,
        error: &str,
    ) -> Result<(), TaskError> {
        let (topic, partition, offset) = origin(batch)?;
        self.topic
            .append_option(topic.is_valid(row).then(|| topic.value(row)));
        self.partition
            .append_option(partition.is_valid(row).then(|| partition.value(row)));
        self.offset
            .append_option(offset.is_valid(row).then(|| offset.value(row)));
        self.error.append_value(error);
        Ok(())
    }

    /// A message the ingestor could not parse, with the bytes it kept.
    fn push_raw(&mut self, batch: &RecordBatch, row: usize, error: &str) -> Result<(), TaskError> {
        self.push_origin(batch, row, error)?;
        let value = column(batch, "_value")?
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| TaskError::internal("`_value` is not binary"))?;
        self.value
            .append_option(value.is_valid(row).then(|| value.value(row)));
        Ok(())
    }

    /// A change whose row image does not fit, with the image.
    fn push_image(
        &mut self,
        batch: &RecordBatch,
        row: usize,
        error: &str,
    ) -> Result<(), TaskError> {
        self.push_origin(batch, row, error)?;
        let after = strings(batch, "after")?;
        self.value
            .append_option(after.is_valid(row).then(|| after.value(row).as_bytes()));
        Ok(())
    }

    fn finish(mut self) -> Result<RecordBatch, TaskError> {
        RecordBatch::try_new(
            dead_letter_schema(),
            vec![
                Arc::new(self.topic.finish()),
                Arc::new(self.partition.finish()),
                Arc::new(self.offset.finish()),
                Arc::new(self.error.finish()),
                Arc::new(self.value.finish()),
            ],
        )
        .map_err(TaskError::internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int32Array, Int64Array};

    fn table(stored_as: &str, track: &str) -> ChangeTable {
        let yaml = format!(
            "name: t\nsources:\n  - {{ name: c, format: kafka-debezium, kafka: {{ brokers: b, topics: [t] }} }}\nsilver:\n  - {{ name: s, from: bronze.c, apply_changes: {{ stored_as: {stored_as}{track}, buckets: 4 }}, columns: [{{ name: id, type: int64 }}, {{ name: v, type: string }}, {{ name: x, type: int64 }}] }}\n"
        );
        let pipeline = medallion_spec::Pipeline::parse(&yaml).expect("spec");
        let spec = pipeline.spec.silver[0].clone();
        let apply = spec.apply_changes.clone().expect("apply");
        ChangeTable::new(&spec, &apply, None, None).expect("table")
    }

    #[test]
    fn untyped_columns_take_the_row_schema_types_and_encodings() {
        let yaml = "name: t\nsources:\n  - { name: c, format: kafka-debezium, kafka: { brokers: b, topics: [t] } }\nsilver:\n  - { name: s, from: bronze.c, apply_changes: {}, columns: [{ name: id, type: int64 }, { name: amount }, { name: seen }, { name: cents, type: \"decimal(10,3)\", from: amount } ] }\n";
        let pipeline = medallion_spec::Pipeline::parse(yaml).expect("spec");
        let spec = pipeline.spec.silver[0].clone();
        let apply = spec.apply_changes.clone().expect("apply");
        let missing = ChangeTable::new(&spec, &apply, None, None)
            .err()
            .expect("no types without a schema");
        assert!(
            missing.to_string().contains("`amount`") && missing.to_string().contains("`seen`"),
            "{missing}"
        );
        let row_schema = RowSchema::parse(
            r#"[{"type":"int64","field":"id"},
                {"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"8"},"field":"amount"},
                {"type":"int64","name":"io.debezium.time.Timestamp","field":"seen"}]"#,
        )
        .expect("row schema");
        let table = ChangeTable::new(&spec, &apply, None, Some(&row_schema)).expect("table");
        let changes = table
            .parse_changes(&[bronze(&[(
                "c",
                1,
                "01",
                Some(r#"{"id":1,"amount":"AeJA","seen":1700000000123}"#),
            )])])
            .expect("parse");
        assert_eq!(changes.dead_letters.num_rows(), 0);
        let events = changes.events;
        let column = |name: &str| events.column_by_name(name).expect(name);
        assert_eq!(column("amount").data_type(), &DataType::Decimal128(8, 2));
        assert_eq!(
            column("amount")
                .as_primitive::<arrow::datatypes::Decimal128Type>()
                .value(0),
            123_456
        );
        // A declared type keeps its own scale; the encoding still comes from the schema.
        assert_eq!(
            column("cents")
                .as_primitive::<arrow::datatypes::Decimal128Type>()
                .value(0),
            1_234_560
        );
        assert_eq!(
            column("seen")
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            1_700_000_000_123_000
        );
        // Decimals sent as JSON numbers (the converter's decimal.format=NUMERIC) are read as
        // numbers, not taken for base64.
        let numeric = table
            .parse_changes(&[bronze(&[(
                "c",
                2,
                "02",
                Some(r#"{"id":2,"amount":1234,"seen":1}"#),
            )])])
            .expect("parse");
        assert_eq!(numeric.dead_letters.num_rows(), 0);
        assert_eq!(
            numeric
                .events
                .column_by_name("amount")
                .expect("amount")
                .as_primitive::<arrow::datatypes::Decimal128Type>()
                .value(0),
            123_400
        );
        // A later schema of the source changes how values are read, not the column types.
        let micros = RowSchema::parse(
            r#"[{"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"seen"}]"#,
        )
        .expect("row schema");
        let later = table.decoding(&micros);
        let events = later
            .parse_changes(&[bronze(&[(
                "c",
                3,
                "03",
                Some(r#"{"id":3,"amount":"1.00","seen":1700000000123456}"#),
            )])])
            .expect("parse")
            .events;
        assert_eq!(
            events
                .column_by_name("seen")
                .expect("seen")
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            1_700_000_000_123_456
        );
        assert_eq!(later.table_schema, table.table_schema);
        // The table as stored gives the types of later applies.
        let stored = ChangeTable::new(&spec, &apply, Some(&table.table_schema), None)
            .expect("types from the table");
        assert_eq!(stored.table_schema, table.table_schema);
    }

    /// Bronze change rows: (op, key id, sequence, after image).
    fn bronze(rows: &[(&str, i64, &str, Option<&str>)]) -> RecordBatch {
        let n = rows.len();
        let text = |f: &dyn Fn(&(&str, i64, &str, Option<&str>)) -> Option<String>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("op", text(&|r| Some(r.0.to_string()))),
            ("key", text(&|r| Some(format!(r#"{{"id":{}}}"#, r.1)))),
            ("sequence", text(&|r| Some(r.2.to_string()))),
            ("before", text(&|_| None)),
            ("after", text(&|r| r.3.map(str::to_string))),
            ("_topic", text(&|_| Some("t".into()))),
            ("_partition", Arc::new(Int32Array::from(vec![0; n]))),
            (
                "_offset",
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
            ),
            ("_error", text(&|_| None)),
            (
                "_value",
                Arc::new(BinaryArray::from(vec![None::<&[u8]>; n])),
            ),
        ];
        RecordBatch::try_from_iter(columns).expect("batch")
    }

    /// Applies `rows` on top of `stored` (the previous merge's buckets) and returns the merge.
    fn apply(
        table: &ChangeTable,
        stored: Option<&Merged>,
        rows: &[(&str, i64, &str, Option<&str>)],
    ) -> Merged {
        let changes = table.parse_changes(&[bronze(rows)]).expect("parse");
        let mut existing = Vec::new();
        if let Some(stored) = stored {
            for (visible, hidden) in stored.buckets.values() {
                existing.extend(table.rows_as_events(visible, false).expect("events"));
                existing.extend(table.rows_as_events(hidden, true).expect("events"));
            }
        }
        let touched: BTreeSet<u32> = (0..table.buckets).collect();
        table
            .merge(existing, changes.events, BTreeSet::new(), &touched)
            .expect("merge")
    }

    /// Visible rows as (id, v, x, start, end, sequence) and hidden keys with their sequences.
    #[allow(clippy::type_complexity)]
    fn rows(
        merged: &Merged,
    ) -> (
        BTreeSet<(i64, String, i64, String, Option<String>, String)>,
        BTreeSet<(String, String)>,
    ) {
        let mut visible = BTreeSet::new();
        let mut hidden = BTreeSet::new();
        for (v, h) in merged.buckets.values() {
            let text = |b: &RecordBatch, name: &str, r: usize| {
                let c = b.column_by_name(name).expect(name).as_string::<i32>();
                c.is_valid(r).then(|| c.value(r).to_string())
            };
            for r in 0..v.num_rows() {
                let start = v.column_by_name(CHANGE_START).map_or_else(
                    || text(v, CHANGE_SEQUENCE, r).expect("seq"),
                    |_| text(v, CHANGE_START, r).expect("start"),
                );
                let end = v
                    .column_by_name(CHANGE_END)
                    .and_then(|_| text(v, CHANGE_END, r));
                visible.insert((
                    v.column(0)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(r),
                    text(v, "v", r).expect("v"),
                    v.column(2)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(r),
                    start,
                    end,
                    text(v, CHANGE_SEQUENCE, r).expect("seq"),
                ));
            }
            for r in 0..h.num_rows() {
                hidden.insert((
                    text(h, CHANGE_KEY, r).expect("key"),
                    text(h, CHANGE_SEQUENCE, r).expect("seq"),
                ));
            }
        }
        (visible, hidden)
    }

    fn row(
        id: i64,
        v: &str,
        x: i64,
        start: &str,
        end: Option<&str>,
        seq: &str,
    ) -> (i64, String, i64, String, Option<String>, String) {
        (
            id,
            v.into(),
            x,
            start.into(),
            end.map(str::to_string),
            seq.into(),
        )
    }

    #[test]
    fn keeping_the_newest_change_per_key_merges_to_the_same_rows() {
        let t = table("scd1", "");
        // Creates, updates out of order, equal sequences, deletes and re-creates of 40 keys.
        let mut changes = Vec::new();
        for i in 0..400u32 {
            let id = i64::from(i * 7 % 40);
            let seq = format!("{:04}", (i * 13) % 397);
            let op = ["c", "u", "u", "d", "u"][(i % 5) as usize];
            let image = (op != "d").then(|| format!(r#"{{"id":{id},"v":"v{i}","x":{i}}}"#));
            changes.push((op, id, seq, image));
        }
        let rows_in: Vec<(&str, i64, &str, Option<&str>)> = changes
            .iter()
            .map(|(op, id, seq, image)| (*op, *id, seq.as_str(), image.as_deref()))
            .collect();
        let parsed = t.parse_changes(&[bronze(&rows_in)]).expect("parse");
        let newest = t.newest_per_key(&parsed.events).expect("newest");
        assert_eq!(newest.num_rows(), 40);
        let touched: BTreeSet<u32> = (0..t.buckets).collect();
        let all = t
            .merge(Vec::new(), parsed.events, BTreeSet::new(), &touched)
            .expect("merge all");
        let kept = t
            .merge(Vec::new(), newest, BTreeSet::new(), &touched)
            .expect("merge newest");
        assert_eq!(rows(&all), rows(&kept));
    }

    #[test]
    fn scd1_keeps_the_newest_change_and_tombstones_outlive_late_changes() {
        let t = table("scd1", "");
        let first = apply(
            &t,
            None,
            &[
                ("c", 1, "01", Some(r#"{"id":1,"v":"a","x":1}"#)),
                ("u", 1, "03", Some(r#"{"id":1,"v":"c","x":3}"#)),
                ("u", 1, "02", Some(r#"{"id":1,"v":"b","x":2}"#)),
                ("c", 2, "04", Some(r#"{"id":2,"v":"z","x":0}"#)),
                ("d", 2, "05", None),
                ("u", 1, "03", Some(r#"{"id":1,"v":"c","x":3}"#)),
            ],
        );
        let (visible, hidden) = rows(&first);
        assert_eq!(visible, BTreeSet::from([row(1, "c", 3, "03", None, "03")]));
        assert_eq!(
            hidden,
            BTreeSet::from([(r#"{"id":2}"#.into(), "05".into())])
        );

        // Late: an update older than the delete, and one older than the current row.
        let second = apply(
            &t,
            Some(&first),
            &[
                ("u", 2, "045", Some(r#"{"id":2,"v":"late","x":0}"#)),
                ("u", 1, "025", Some(r#"{"id":1,"v":"late","x":0}"#)),
                ("r", 3, "06", Some(r#"{"id":3,"v":"s","x":6}"#)),
            ],
        );
        let (visible, hidden) = rows(&second);
        assert_eq!(
            visible,
            BTreeSet::from([
                row(1, "c", 3, "03", None, "03"),
                row(3, "s", 6, "06", None, "06")
            ])
        );
        assert_eq!(hidden.len(), 1);
    }

    #[test]
    fn equal_sequences_resolve_by_offset() {
        let t = table("scd1", "");
        let merged = apply(
            &t,
            None,
            &[
                ("c", 1, "05", Some(r#"{"id":1,"v":"a","x":1}"#)),
                ("d", 1, "05", None),
                ("c", 1, "05", Some(r#"{"id":1,"v":"b","x":2}"#)),
                ("c", 2, "05", Some(r#"{"id":2,"v":"c","x":3}"#)),
                ("d", 2, "05", None),
            ],
        );
        let (visible, hidden) = rows(&merged);
        assert_eq!(visible, BTreeSet::from([row(1, "b", 2, "05", None, "05")]));
        assert_eq!(
            hidden,
            BTreeSet::from([(r#"{"id":2}"#.into(), "05".into())])
        );
    }

    #[test]
    fn scd2_starts_versions_on_tracked_changes_only() {
        let t = table("scd2", ", track_history_on: [v]");
        let first = apply(
            &t,
            None,
            &[
                ("c", 1, "01", Some(r#"{"id":1,"v":"a","x":1}"#)),
                ("u", 1, "02", Some(r#"{"id":1,"v":"a","x":2}"#)),
                ("u", 1, "03", Some(r#"{"id":1,"v":"b","x":2}"#)),
                ("d", 1, "04", None),
                ("c", 1, "05", Some(r#"{"id":1,"v":"c","x":5}"#)),
            ],
        );
        let expected = BTreeSet::from([
            row(1, "a", 2, "01", Some("03"), "02"),
            row(1, "b", 2, "03", Some("04"), "03"),
            row(1, "c", 5, "05", None, "05"),
        ]);
        assert_eq!(rows(&first).0, expected);
        // Re-delivered changes (one between a version's start and its values) change nothing.
        let again = apply(
            &t,
            Some(&first),
            &[
                ("u", 1, "02", Some(r#"{"id":1,"v":"a","x":2}"#)),
                ("c", 1, "01", Some(r#"{"id":1,"v":"a","x":1}"#)),
                ("d", 1, "04", None),
            ],
        );
        assert_eq!(rows(&again).0, expected);
    }

    #[test]
    fn a_truncate_removes_older_rows_and_keeps_later_ones() {
        let t = table("scd1", "");
        let first = apply(
            &t,
            None,
            &[
                ("c", 1, "01", Some(r#"{"id":1,"v":"a","x":1}"#)),
                ("c", 2, "02", Some(r#"{"id":2,"v":"b","x":2}"#)),
            ],
        );
        let second = apply(
            &t,
            Some(&first),
            &[
                ("t", 0, "03", None),
                ("c", 3, "04", Some(r#"{"id":3,"v":"c","x":3}"#)),
                ("u", 1, "025", Some(r#"{"id":1,"v":"late","x":0}"#)),
            ],
        );
        let (visible, hidden) = rows(&second);
        assert_eq!(visible, BTreeSet::from([row(3, "c", 3, "04", None, "04")]));
        // Keys 1 and 2 deleted at the truncate, and the truncate itself.
        assert_eq!(hidden.len(), 3);
        // The truncate is remembered: a change older than it, arriving later, stays deleted.
        let third = apply(
            &t,
            Some(&second),
            &[("c", 4, "029", Some(r#"{"id":4,"v":"late","x":0}"#))],
        );
        assert_eq!(
            rows(&third).0,
            BTreeSet::from([row(3, "c", 3, "04", None, "04")])
        );
    }

    #[test]
    fn images_that_do_not_fit_the_columns_become_dead_letters() {
        let t = table("scd1", "");
        let changes = t
            .parse_changes(&[bronze(&[
                ("c", 1, "01", Some(r#"{"id":1,"v":"a","x":1}"#)),
                ("c", 2, "02", Some(r#"{"id":2,"v":"b","x":"lots"}"#)),
                ("x", 3, "03", Some(r#"{"id":3}"#)),
            ])])
            .expect("parse");
        assert_eq!(changes.events.num_rows(), 1);
        let dead = &changes.dead_letters;
        assert_eq!(dead.num_rows(), 2);
        let errors = dead
            .column_by_name("_error")
            .expect("error")
            .as_string::<i32>();
        let offsets = dead
            .column_by_name("_offset")
            .expect("offset")
            .as_primitive::<arrow::datatypes::Int64Type>();
        let by_offset: BTreeMap<i64, &str> = (0..2)
            .map(|r| (offsets.value(r), errors.value(r)))
            .collect();
        assert!(by_offset[&1].contains("field `x`"), "{by_offset:?}");
        assert!(by_offset[&2].contains("op `x`"), "{by_offset:?}");
    }
}
