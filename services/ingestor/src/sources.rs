//! Finding a source's files and reading one into Arrow batches, as read (CSV as strings
//! unless type inference is asked for). Reading is blocking work: it runs on the blocking
//! pool and hands batches over a bounded channel, so memory stays bounded by a few batches.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Seek},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use medallion_objects::{ObjectInfo, ObjectStore};
use medallion_spec::{SourceFormat, SourceSpec};
use tokio::sync::mpsc;

/// Rows per batch read from a source file.
pub const BATCH_ROWS: usize = 64 * 1024;

/// Where a source file lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3(ObjectInfo),
    /// The URL of an HTTP API source.
    Http(String),
}

/// A source file and the identity bronze remembers it by: path, size and modification time
/// for a local file; URL, size and ETag for an S3 object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub location: Location,
    pub size: u64,
    /// Modification time, microseconds since the epoch.
    pub modified_us: i64,
}

impl SourceFile {
    /// The file's path or `s3://` URL, as errors and lineage name it.
    pub fn display(&self) -> String {
        match &self.location {
            Location::Local(path) => path.display().to_string(),
            Location::S3(object) => object.url.to_string(),
            Location::Http(url) => url.clone(),
        }
    }

    /// What changes when the content changes: the ETag of an object, else the mtime.
    pub fn version(&self) -> String {
        match &self.location {
            Location::Local(_) => self.modified_us.to_string(),
            Location::S3(object) => format!("etag:{}", object.etag),
            Location::Http(_) => String::new(),
        }
    }
}

/// Lists the objects of an `s3://` source (a prefix, an object or a glob), sorted by key.
pub async fn list_objects(
    source: &SourceSpec,
    store: &ObjectStore,
) -> Result<Vec<SourceFile>, String> {
    let objects = store
        .list(&source.path)
        .await
        .map_err(|e| format!("source `{}`: {e}", source.name))?;
    Ok(objects
        .into_iter()
        .map(|object| SourceFile {
            size: object.size,
            modified_us: object.modified_us,
            location: Location::S3(object),
        })
        .collect())
}

/// Lists the files of a source: one file, every file of a folder, or a glob; sorted by path.
pub fn list_files(source: &SourceSpec, base_dir: &str) -> Result<Vec<SourceFile>, String> {
    let base = if base_dir.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(base_dir)
    };
    let pattern = base.join(&source.path);
    let pattern_str = pattern.to_string_lossy().to_string();
    let mut paths: Vec<PathBuf> = Vec::new();
    if pattern_str.contains(['*', '?', '[']) {
        let entries = glob::glob(&pattern_str)
            .map_err(|e| format!("source `{}`: bad glob `{}`: {e}", source.name, source.path))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("source `{}`: {e}", source.name))?;
            if path.is_file() {
                paths.push(path);
            }
        }
    } else if pattern.is_dir() {
        let entries = std::fs::read_dir(&pattern).map_err(|e| {
            format!(
                "source `{}`: cannot list {}: {e}",
                source.name,
                pattern.display()
            )
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                format!(
                    "source `{}`: cannot list {}: {e}",
                    source.name,
                    pattern.display()
                )
            })?;
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.') || n.starts_with('_'));
            if path.is_file() && !hidden {
                paths.push(path);
            }
        }
    } else if pattern.is_file() {
        paths.push(pattern.clone());
    } else {
        return Err(format!(
            "source `{}`: {} does not exist",
            source.name,
            pattern.display()
        ));
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let modified_us = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_micros() as i64);
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            Ok(SourceFile {
                location: Location::Local(path),
                size: meta.len(),
                modified_us,
            })
        })
        .collect()
}

/// Reads the local file at `path` on the blocking pool, sending its batches; errors name the
/// file as `name` (its source path or URL; an S3 object is read from a local spool copy).
pub fn spawn_reader(source: SourceSpec, path: PathBuf, name: String) -> Reader {
    spawn_blocking_reader(name, move |tx| read_file(&source, &path, tx))
}

/// Batches arriving from a blocking reader, and the reader's task.
pub type Reader = (
    mpsc::Receiver<Result<RecordBatch, String>>,
    tokio::task::JoinHandle<()>,
);

/// Runs `read` on the blocking pool behind a bounded channel (memory stays bounded by a few
/// batches); its error, prefixed with `name`, is the channel's last item.
fn spawn_blocking_reader(
    name: String,
    read: impl FnOnce(&Sender) -> Result<(), String> + Send + 'static,
) -> Reader {
    let (tx, rx) = mpsc::channel(4);
    let handle = tokio::task::spawn_blocking(move || {
        if let Err(e) = read(&tx) {
            let _ = tx.blocking_send(Err(format!("{name}: {e}")));
        }
    });
    (rx, handle)
}

type Sender = mpsc::Sender<Result<RecordBatch, String>>;

fn send(tx: &Sender, batch: RecordBatch) -> Result<(), String> {
    tx.blocking_send(Ok(batch))
        .map_err(|_| "reader cancelled".to_string())
}

fn read_file(source: &SourceSpec, path: &Path, tx: &Sender) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    match source.format {
        SourceFormat::Csv => crate::csv_file::read_csv(source, file, &mut |batch| send(tx, batch)),
        SourceFormat::Ndjson => read_ndjson(BufReader::new(file), tx),
        SourceFormat::Json => read_json_array(file, tx),
        SourceFormat::Parquet => read_parquet(file, tx),
        SourceFormat::HttpJson | SourceFormat::KafkaDebezium => {
            Err("http-json and kafka-debezium sources are not read from files".into())
        }
    }
}

/// Reads an NDJSON spool file with a known schema (fields it lacks are null) on the blocking
/// pool, sending its batches; errors name the source as `name`.
pub fn spawn_ndjson_reader(path: PathBuf, schema: SchemaRef, name: String) -> Reader {
    spawn_blocking_reader(name, move |tx| {
        let file = File::open(&path).map_err(|e| e.to_string())?;
        let reader = arrow::json::ReaderBuilder::new(schema)
            .with_batch_size(BATCH_ROWS)
            .build(BufReader::with_capacity(1 << 20, file))
            .map_err(|e| e.to_string())?;
        for batch in reader {
            send(tx, batch.map_err(|e| e.to_string())?)?;
        }
        Ok(())
    })
}

fn read_ndjson<R: BufRead + Seek>(mut reader: R, tx: &Sender) -> Result<(), String> {
    let (schema, _) =
        arrow::json::reader::infer_json_schema_from_seekable(&mut reader, Some(10_000))
            .map_err(|e| e.to_string())?;
    let reader = arrow::json::ReaderBuilder::new(Arc::new(schema))
        .with_batch_size(BATCH_ROWS)
        .build(reader)
        .map_err(|e| e.to_string())?;
    for batch in reader {
        send(tx, batch.map_err(|e| e.to_string())?)?;
    }
    Ok(())
}

/// A JSON document holding an array of records (or one record): rewritten as NDJSON in memory.
fn read_json_array(mut file: File, tx: &Sender) -> Result<(), String> {
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("not UTF-8 text: {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("line {} column {}: invalid JSON: {e}", e.line(), e.column()))?;
    let records = match value {
        serde_json::Value::Array(items) => items,
        obj @ serde_json::Value::Object(_) => vec![obj],
        _ => return Err("expected a JSON array of objects".into()),
    };
    let mut lines = Vec::with_capacity(text.len());
    for (i, record) in records.iter().enumerate() {
        if !record.is_object() {
            return Err(format!("record {i} is not a JSON object"));
        }
        serde_json::to_writer(&mut lines, record).map_err(|e| e.to_string())?;
        lines.push(b'\n');
    }
    read_ndjson(std::io::Cursor::new(lines), tx)
}

fn read_parquet(file: File, tx: &Sender) -> Result<(), String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| e.to_string())?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| e.to_string())?;
    for batch in reader {
        send(tx, batch.map_err(|e| e.to_string())?)?;
    }
    Ok(())
}
