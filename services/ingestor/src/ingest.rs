//! One bronze task: take in the source's new files, add lineage, commit once.

use std::{collections::BTreeMap, collections::BTreeSet, sync::Arc};

use arrow::{
    array::{ArrayRef, StringArray, TimestampMicrosecondArray},
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
    record_batch::RecordBatch,
};
use medallion_lake::{Lake, TableSnapshot, WriteMode};
use medallion_server::CancellationToken;
use medallion_spec::Layer;
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest, TaskRunner};

use crate::sources::{self, SourceFile};

/// Data-file tags that record which source file a bronze data file came from.
const TAG_PATH: &str = "medallion.source.path";
const TAG_SIZE: &str = "medallion.source.size";
const TAG_MODIFIED: &str = "medallion.source.modified_us";

pub(crate) struct Ingestor {
    pub lake: Lake,
}

/// Source files already in the current bronze version, by (path, size, mtime).
fn committed_files(snapshot: Option<&TableSnapshot>) -> BTreeSet<(String, u64, i64)> {
    let Some(snapshot) = snapshot else {
        return BTreeSet::new();
    };
    snapshot
        .files
        .iter()
        .filter_map(|f| {
            Some((
                f.tags.get(TAG_PATH)?.clone(),
                f.tags.get(TAG_SIZE)?.parse().ok()?,
                f.tags.get(TAG_MODIFIED)?.parse().ok()?,
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
        let name = source.name.clone();
        progress.report("listing files", 0, 0, true);
        let listed = {
            let (source, base) = (source.clone(), task.base_dir.clone());
            tokio::task::spawn_blocking(move || sources::list_files(&source, &base))
                .await
                .map_err(TaskError::internal)?
                .map_err(TaskError::Invalid)?
        };
        let current = self
            .lake
            .snapshot(Layer::Bronze, &name, None)
            .await
            .map_err(TaskError::internal)?;
        // A retry of a run that already committed must not ingest again.
        if let Some(snapshot) = &current
            && task.is_done(snapshot, false).await?
        {
            return Ok(Manifest::of_snapshot(snapshot, false));
        }
        let seen = if task.full_refresh {
            BTreeSet::new()
        } else {
            committed_files(current.as_ref())
        };
        let new_files: Vec<SourceFile> = listed
            .into_iter()
            .filter(|f| !seen.contains(&(f.display(), f.size, f.modified_us)))
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
            let (mut rx, handle) = sources::spawn_reader(source.clone(), file.clone());
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
                    writer = Some(
                        self.lake
                            .writer(Layer::Bronze, &name, full_schema.clone())
                            .await
                            .map_err(TaskError::internal)?,
                    );
                }
                if let Some(w) = writer.as_mut() {
                    w.write(out).await.map_err(TaskError::internal)?;
                }
                progress.report(&format!("reading {}", file.display()), rows, bytes, false);
            }
            handle.await.map_err(TaskError::internal)?;
            if let Some(w) = writer.as_mut() {
                let tags = BTreeMap::from([
                    (TAG_PATH.to_string(), file.display()),
                    (TAG_SIZE.to_string(), file.size.to_string()),
                    (TAG_MODIFIED.to_string(), file.modified_us.to_string()),
                ]);
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
