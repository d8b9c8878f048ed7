//! One bronze task: take in the source's new files, add lineage, commit once.

use std::{collections::BTreeMap, collections::BTreeSet, sync::Arc};

use arrow::{
    array::{ArrayRef, StringArray, TimestampMicrosecondArray},
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
    record_batch::RecordBatch,
};
use medallion_lake::{Lake, TableSnapshot, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::{Layer, SourceFormat, SourceSpec};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, TaskRunner};

use std::path::PathBuf;

use medallion_objects::{ObjectStore, S3Options, S3Url};

use crate::sources::{self, Location, SourceFile};

/// Data-file tags that record which source file a bronze data file came from.
const TAG_PATH: &str = "medallion.source.path";
const TAG_SIZE: &str = "medallion.source.size";
const TAG_MODIFIED: &str = "medallion.source.modified_us";
const TAG_ETAG: &str = "medallion.source.etag";
/// The incremental cursor of an HTTP source after the run that wrote the data file.
const TAG_CURSOR: &str = "medallion.http.cursor";

pub(crate) struct Ingestor {
    pub lake: Lake,
    pub s3: S3Options,
    /// Built on the first S3 source, so a local-only ingestor never loads AWS settings.
    pub objects: tokio::sync::OnceCell<ObjectStore>,
    /// Where S3 objects are streamed to before parsing.
    pub spool_dir: PathBuf,
    /// This replica's members of Kafka sources' consumer groups.
    pub members: std::sync::Arc<crate::group::Members>,
}

/// Bronze as a task finds it.
enum Current {
    /// This run already committed the table (the task is a retry): its manifest.
    Done(Manifest),
    /// The latest version, if the table exists.
    Snapshot(Option<TableSnapshot>),
}

impl Ingestor {
    /// The table's latest version, unless this run already committed it: a retry of a run
    /// that committed must not ingest again.
    async fn current(&self, task: &TaskRequest, name: &str) -> Result<Current, TaskError> {
        let current = self
            .lake
            .snapshot(Layer::Bronze, name, None)
            .await
            .map_err(TaskError::internal)?;
        if let Some(snapshot) = &current
            && task.is_done(snapshot, false).await?
        {
            return Ok(Current::Done(Manifest::of_snapshot(snapshot, false)));
        }
        Ok(Current::Snapshot(current))
    }

    async fn objects(&self) -> &ObjectStore {
        self.objects
            .get_or_init(|| ObjectStore::connect(self.s3.clone()))
            .await
    }

    /// An `http-json` source: fetch the pages after the stored cursor, commit the records and
    /// the new cursor together, so a failed run leaves the cursor where it was.
    async fn run_http(
        &self,
        task: TaskRequest,
        source: SourceSpec,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Manifest, TaskError> {
        let name = source.name.clone();
        let http = source
            .http
            .clone()
            .ok_or_else(|| TaskError::Invalid(format!("source `{name}` has no http block")))?;
        let current = match self.current(&task, &name).await? {
            Current::Done(manifest) => return Ok(manifest),
            Current::Snapshot(current) => current,
        };
        let appending = current
            .as_ref()
            .filter(|c| !c.files.is_empty() && !task.full_refresh);
        let since = appending.and_then(stored_cursor);
        progress.report(&format!("fetching {}", http.url), 0, 0, true);
        let fetch = crate::http::fetch(
            &http,
            since.as_deref(),
            &self.spool_dir,
            |pages, records| {
                progress.report(
                    &format!("fetched {pages} pages of {}", http.url),
                    records,
                    0,
                    false,
                )
            },
        );
        let fetched = tokio::select! {
            r = fetch => r.map_err(|e| TaskError::Invalid(format!("source `{name}`: {e}")))?,
            _ = cancel.cancelled() => return Err(TaskError::Cancelled),
        };
        if fetched.records == 0 {
            return match appending {
                Some(snapshot) => Ok(Manifest::of_snapshot(snapshot, false)),
                None => Err(TaskError::Invalid(format!(
                    "source `{name}`: {} returned no records (nothing to learn the columns from)",
                    http.url
                ))),
            };
        }
        // Bronze keeps its columns: a field absent from this run's records is null; a new
        // field needs a full refresh, like a changed file layout.
        let columns: Vec<String> = match appending {
            Some(snapshot) => {
                let known: Vec<String> = snapshot
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .filter(|n| !LINEAGE.contains(&n.as_str()))
                    .collect();
                let new: Vec<&String> = fetched
                    .fields
                    .iter()
                    .filter(|f| !known.contains(f))
                    .collect();
                if !new.is_empty() {
                    return Err(TaskError::Invalid(format!(
                        "source `{name}`: {} returned fields {new:?} that bronze.{name} lacks (run with full refresh to take the new layout)",
                        http.url
                    )));
                }
                known
            }
            None => fetched.fields.clone(),
        };
        let read_schema: SchemaRef = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(c, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ));
        let full_schema = with_lineage(&read_schema);
        let file = SourceFile {
            location: Location::Http(http.url.clone()),
            size: 0,
            modified_us: chrono::Utc::now().timestamp_micros(),
        };
        let mut writer = self
            .lake
            .writer(Layer::Bronze, &name, full_schema.clone())
            .await
            .map_err(TaskError::internal)?;
        let (mut rx, handle) = sources::spawn_ndjson_reader(
            fetched.spool.path().to_path_buf(),
            read_schema,
            http.url.clone(),
        );
        let (mut rows, mut bytes) = (0u64, 0u64);
        while let Some(batch) = rx.recv().await {
            let batch = batch.map_err(TaskError::Invalid)?;
            let out = add_lineage(&batch, &full_schema, &file, file.modified_us, &task.run_id)?;
            rows += out.num_rows() as u64;
            bytes += out.get_array_memory_size() as u64;
            writer.write(out).await.map_err(TaskError::internal)?;
            progress.report("writing", rows, bytes, false);
        }
        handle.await.map_err(TaskError::internal)?;
        let mut tags = BTreeMap::from([(TAG_PATH.to_string(), http.url.clone())]);
        if let Some(cursor) = &fetched.cursor {
            tags.insert(TAG_CURSOR.to_string(), cursor.clone());
        }
        writer
            .finish_part(tags)
            .await
            .map_err(TaskError::internal)?;
        progress.report("committing", rows, bytes, true);
        let mode = if appending.is_some() {
            WriteMode::Append
        } else {
            WriteMode::Overwrite
        };
        let mut commit = task.commit_spec(&task.table, mode);
        commit.metadata.insert("pages".into(), fetched.pages.into());
        if let Some(cursor) = &fetched.cursor {
            commit
                .metadata
                .insert("cursor".into(), cursor.clone().into());
        }
        let outcome = writer.commit(commit).await.map_err(TaskError::internal)?;
        let mut manifest = Manifest::after_commit(&self.lake, &task.table, &outcome).await?;
        if manifest.committed {
            manifest.source_files = vec![http.url.clone()];
        }
        Ok(manifest)
    }
}

/// The lineage columns bronze adds after the source's own.
const LINEAGE: [&str; 4] = [
    "_source_file",
    "_source_modified",
    "_ingested_at",
    "_run_id",
];

/// The incremental cursor committed last: the highest over the table's data files.
fn stored_cursor(snapshot: &TableSnapshot) -> Option<String> {
    snapshot
        .files
        .iter()
        .filter_map(|f| f.tags.get(TAG_CURSOR))
        .max_by(|a, b| match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => x.total_cmp(&y),
            _ => a.cmp(b),
        })
        .cloned()
}

/// Source files already in the current bronze version, by (path, size, version).
fn committed_files(snapshot: Option<&TableSnapshot>) -> BTreeSet<(String, u64, String)> {
    let Some(snapshot) = snapshot else {
        return BTreeSet::new();
    };
    snapshot
        .files
        .iter()
        .filter_map(|f| {
            let version = match f.tags.get(TAG_ETAG) {
                Some(etag) => format!("etag:{etag}"),
                None => f.tags.get(TAG_MODIFIED)?.clone(),
            };
            Some((
                f.tags.get(TAG_PATH)?.clone(),
                f.tags.get(TAG_SIZE)?.parse().ok()?,
                version,
            ))
        })
        .collect()
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The source's columns plus the lineage columns.
pub fn with_lineage(schema: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("_source_file", DataType::Utf8, false));
    fields.push(Field::new("_source_modified", timestamp_type(), false));
    fields.push(Field::new("_ingested_at", timestamp_type(), false));
    fields.push(Field::new("_run_id", DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

/// Appends the lineage columns to a batch read from `file`.
pub fn add_lineage(
    batch: &RecordBatch,
    schema: &SchemaRef,
    file: &SourceFile,
    ingested_at_us: i64,
    run_id: &str,
) -> Result<RecordBatch, TaskError> {
    let n = batch.num_rows();
    let path = file.display();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(StringArray::from_iter_values(
        std::iter::repeat_n(path.as_str(), n),
    )));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from_value(file.modified_us, n).with_timezone("UTC"),
    ));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from_value(ingested_at_us, n).with_timezone("UTC"),
    ));
    columns.push(Arc::new(StringArray::from_iter_values(
        std::iter::repeat_n(run_id, n),
    )));
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| TaskError::Invalid(format!("{path}: {e}")))
}

#[tonic::async_trait]
impl TaskRunner for Ingestor {
    fn layer(&self) -> Layer {
        Layer::Bronze
    }

    async fn run(
        &self,
        task: TaskRequest,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Manifest, TaskError> {
        let source = task
            .pipeline
            .source(&task.table.name)
            .cloned()
            .ok_or_else(|| TaskError::Invalid(format!("no source named {}", task.table.name)))?;
        if source.format == SourceFormat::HttpJson {
            return self.run_http(task, source, progress, cancel).await;
        }
        if let Some(kafka) = &source.kafka {
            return crate::group::run(
                &self.members,
                &self.lake,
                &task,
                &source.name,
                kafka,
                &progress,
                &cancel,
            )
            .await;
        }
        let name = source.name.clone();
        progress.report("listing files", 0, 0, true);
        let listed = if S3Url::is_s3(&source.path) {
            sources::list_objects(&source, self.objects().await)
                .await
                .map_err(TaskError::Invalid)?
        } else {
            let (source, base) = (source.clone(), task.base_dir.clone());
            tokio::task::spawn_blocking(move || sources::list_files(&source, &base))
                .await
                .map_err(TaskError::internal)?
                .map_err(TaskError::Invalid)?
        };
        let current = match self.current(&task, &name).await? {
            Current::Done(manifest) => return Ok(manifest),
            Current::Snapshot(current) => current,
        };
        let seen = if task.full_refresh {
            BTreeSet::new()
        } else {
            committed_files(current.as_ref())
        };
        let new_files: Vec<SourceFile> = listed
            .into_iter()
            .filter(|f| !seen.contains(&(f.display(), f.size, f.version())))
            .collect();
        if new_files.is_empty()
            && !task.full_refresh
            && let Some(snapshot) = &current
        {
            return Ok(Manifest::of_snapshot(snapshot, false));
        }

        let ingested_at = chrono::Utc::now().timestamp_micros();
        let mut writer: Option<medallion_lake::TableWriter> = None;
        let mut schema: Option<(SchemaRef, SchemaRef)> = None; // (as read, with lineage)
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mut taken = Vec::new();
        for file in &new_files {
            // An S3 object is streamed to a spool file first (bounded memory, seekable for
            // the readers); the spool file is removed when `_spooled` drops.
            let (path, _spooled) = match &file.location {
                Location::Local(path) => (path.clone(), None),
                Location::Http(url) => {
                    return Err(TaskError::internal(format!("{url} is not a file source")));
                }
                Location::S3(object) => {
                    progress.report(
                        &format!("downloading {}", file.display()),
                        rows,
                        bytes,
                        true,
                    );
                    let spooled =
                        tempfile::NamedTempFile::new_in(&self.spool_dir).map_err(|e| {
                            TaskError::Invalid(format!(
                                "spool folder {}: {e}",
                                self.spool_dir.display()
                            ))
                        })?;
                    let download = self.objects().await.download(object, spooled.path());
                    tokio::select! {
                        r = download => r.map_err(|e| TaskError::Invalid(e.to_string()))?,
                        _ = cancel.cancelled() => return Err(TaskError::Cancelled),
                    };
                    (spooled.path().to_path_buf(), Some(spooled))
                }
            };
            let (mut rx, handle) = sources::spawn_reader(source.clone(), path, file.display());
            loop {
                let next = tokio::select! {
                    b = rx.recv() => b,
                    _ = cancel.cancelled() => return Err(TaskError::Cancelled),
                };
                let Some(batch) = next else { break };
                let batch = batch.map_err(TaskError::Invalid)?;
                let (read_schema, full_schema) = match &schema {
                    Some(s) => s.clone(),
                    None => {
                        let s = (batch.schema(), with_lineage(&batch.schema()));
                        // Appends must keep the table's columns: say which file differs.
                        if let Some(existing) = current
                            .as_ref()
                            .filter(|c| !c.files.is_empty() && !task.full_refresh)
                        {
                            let names = |schema: &Schema| {
                                schema
                                    .fields()
                                    .iter()
                                    .map(|f| f.name().clone())
                                    .collect::<Vec<_>>()
                            };
                            if names(&s.1) != names(&existing.schema) {
                                return Err(TaskError::Invalid(format!(
                                    "{}: columns {:?} differ from bronze.{name}'s {:?} (run with full refresh to take the new layout)",
                                    file.display(),
                                    names(&s.1),
                                    names(&existing.schema)
                                )));
                            }
                        }
                        schema = Some(s.clone());
                        s
                    }
                };
                if batch.schema().fields() != read_schema.fields() {
                    return Err(TaskError::Invalid(format!(
                        "{}: columns {:?} differ from the source's other files {:?}",
                        file.display(),
                        batch
                            .schema()
                            .fields()
                            .iter()
                            .map(|f| f.name())
                            .collect::<Vec<_>>(),
                        read_schema
                            .fields()
                            .iter()
                            .map(|f| f.name())
                            .collect::<Vec<_>>()
                    )));
                }
                let out = add_lineage(&batch, &full_schema, file, ingested_at, &task.run_id)?;
                rows += out.num_rows() as u64;
                bytes += out.get_array_memory_size() as u64;
                if writer.is_none() {
                    let mut w = self
                        .lake
                        .writer(Layer::Bronze, &name, full_schema.clone())
                        .await
                        .map_err(TaskError::internal)?;
                    // Encoding Parquet costs more than decoding CSV: a large source gets a
                    // second encoder when the machine has a second core.
                    w.encode_in_parallel(
                        std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
                    );
                    writer = Some(w);
                }
                if let Some(w) = writer.as_mut() {
                    w.write(out).await.map_err(TaskError::internal)?;
                }
                progress.report(&format!("reading {}", file.display()), rows, bytes, false);
            }
            handle.await.map_err(TaskError::internal)?;
            if let Some(w) = writer.as_mut() {
                let mut tags = BTreeMap::from([
                    (TAG_PATH.to_string(), file.display()),
                    (TAG_SIZE.to_string(), file.size.to_string()),
                    (TAG_MODIFIED.to_string(), file.modified_us.to_string()),
                ]);
                if let Location::S3(object) = &file.location {
                    tags.insert(TAG_ETAG.to_string(), object.etag.clone());
                }
                w.finish_part(tags).await.map_err(TaskError::internal)?;
            }
            taken.push(file.display());
        }
        let writer = match writer {
            Some(w) => w,
            None => {
                // Only empty files (or none at all on a full refresh): the table keeps its schema.
                let Some(snapshot) = &current else {
                    return Err(TaskError::Invalid(format!(
                        "source `{name}`: no rows in {} (nothing to learn the columns from)",
                        if taken.is_empty() {
                            format!("any file matching `{}`", source.path)
                        } else {
                            taken.join(", ")
                        }
                    )));
                };
                if !task.full_refresh {
                    return Ok(Manifest::of_snapshot(snapshot, false));
                }
                self.lake
                    .writer(Layer::Bronze, &name, snapshot.schema.clone())
                    .await
                    .map_err(TaskError::internal)?
            }
        };
        progress.report("committing", rows, bytes, true);
        // A source file delivered again with new content replaces its old rows in the same commit.
        let mode = match &current {
            _ if task.full_refresh => WriteMode::Overwrite,
            None => WriteMode::Overwrite,
            Some(snapshot) if snapshot.files.is_empty() => WriteMode::Overwrite,
            Some(snapshot) => {
                let taken_paths: BTreeSet<&str> = taken.iter().map(String::as_str).collect();
                let replaced: BTreeSet<String> = snapshot
                    .files
                    .iter()
                    .filter(|f| {
                        f.tags
                            .get(TAG_PATH)
                            .is_some_and(|p| taken_paths.contains(p.as_str()))
                    })
                    .map(|f| f.path.clone())
                    .collect();
                if replaced.is_empty() {
                    WriteMode::Append
                } else {
                    WriteMode::Replace(replaced)
                }
            }
        };
        let mut commit = task.commit_spec(&task.table, mode);
        commit
            .metadata
            .insert("source_files".into(), taken.len().into());
        let outcome = writer.commit(commit).await.map_err(TaskError::internal)?;
        let mut manifest = Manifest::after_commit(&self.lake, &task.table, &outcome).await?;
        if manifest.committed {
            manifest.source_files = taken;
        }
        Ok(manifest)
    }
}
