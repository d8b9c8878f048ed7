//! Hash buckets of a silver table's rows, spilled to local disk as Arrow IPC, so that the
//! whole-table steps (de-duplication and the join) run one bucket at a time: the table's own
//! rows are in memory a bucket at a time, never whole (the joined table is held whole).
//!
//! Rows are bucketed by columns that every whole-table step groups by: the de-duplication
//! keys, or the join's keys, or the join keys that are also de-duplication keys. Two rows
//! that must meet (duplicates of one key, or a row and its join partner) then always share a
//! bucket, so refining bucket by bucket gives the same rows as refining the table whole.
//! Within a bucket, rows keep their input order, so "first" and "last" mean what they mean
//! for the whole table.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int8Type,
    Int16Type, Int32Type, Int64Type, SchemaRef, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use medallion_spec::SilverSpec;
use polars::prelude::DataFrame;

/// Most buckets one table is split into (each is an open file while the rows stream in).
const MAX_BUCKETS: u64 = 256;

/// Start of the names of spill folders (see [`sweep`]).
const SPILL_PREFIX: &str = "medallion-spill-";

/// File in a spill folder that its task holds locked while the folder is in use.
const LOCK_FILE: &str = "in-use.lock";

/// A spill folder without a lock file is left alone this long: its task may be making it.
const UNLOCKED_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Why rows could not be bucketed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot make a spill folder in {path}: {source}")]
    SpoolDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bucket file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bucket file {path}: {source}")]
    Ipc {
        path: PathBuf,
        #[source]
        source: ArrowError,
    },
    #[error("bucket key `{column}`: {source}")]
    Key {
        column: String,
        #[source]
        source: ArrowError,
    },
    #[error("bucket key `{0}` is not a column of the rows")]
    MissingKey(String),
    #[error("bucket file {path}: {source}")]
    ReadFrame {
        path: PathBuf,
        #[source]
        source: medallion_frames::Error,
    },
    #[error("rows to bucket: {0}")]
    Convert(#[source] medallion_frames::Error),
    #[error("splitting rows into buckets: {0}")]
    Split(#[source] ArrowError),
    #[error("no rows were staged, not even an empty frame with the table's columns")]
    NothingStaged,
}

/// How a silver table's rows are bucketed: by which columns, into how many buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// Key columns of the table's own rows (after the row stage).
    pub keys: Vec<String>,
    /// The matching key columns of the joined table, in the same order (empty without a join).
    pub join_keys: Vec<String>,
    pub buckets: u32,
    /// Rows with a null key go to any bucket: with a join and no de-duplication they meet
    /// nothing (null keys never match), so they need not pile up in one bucket.
    pub spread_nulls: bool,
}

impl BucketPlan {
    /// The plan for `spec` when its input has about `input_rows` rows, or `None` when the table
    /// is refined whole: it has no whole-table step, fewer than `rows_per_bucket` rows, or a
    /// de-duplication and a join with no key in common.
    pub fn for_table(
        spec: &SilverSpec,
        input_rows: u64,
        rows_per_bucket: u64,
    ) -> Option<BucketPlan> {
        let wanted = input_rows.div_ceil(rows_per_bucket.max(1));
        if wanted < 2 {
            return None;
        }
        let dedupe = spec.dedupe.as_ref().map(|d| &d.keys);
        let join = spec.join.as_ref().map(|j| &j.on);
        let (keys, join_keys): (Vec<String>, Vec<String>) = match (dedupe, join) {
            (None, None) => return None,
            (Some(keys), None) => (keys.clone(), Vec::new()),
            (None, Some(on)) => on.iter().map(|k| (k.left.clone(), k.right.clone())).unzip(),
            (Some(keys), Some(on)) => on
                .iter()
                .filter(|k| keys.contains(&k.left))
                .map(|k| (k.left.clone(), k.right.clone()))
                .unzip(),
        };
        if keys.is_empty() {
            return None;
        }
        if wanted > MAX_BUCKETS {
            tracing::warn!(
                table = %spec.name,
                input_rows,
                rows_per_bucket,
                "the table needs {wanted} buckets; it gets {MAX_BUCKETS}, so each holds more rows than --bucket-rows"
            );
        }
        Some(BucketPlan {
            keys,
            join_keys,
            buckets: u32::try_from(wanted.min(MAX_BUCKETS)).unwrap_or(u32::MAX),
            spread_nulls: dedupe.is_none(),
        })
    }
}

/// Rows being written into bucket files, one Arrow IPC stream per bucket.
pub struct Spill {
    dir: tempfile::TempDir,
    /// Held locked for as long as the folder is in use (the OS lets go when the process dies).
    lock: File,
    keys: Vec<String>,
    buckets: u32,
    spread_nulls: bool,
    /// Opened on the first rows, when their schema is known.
    writers: Vec<StreamWriter<BufWriter<File>>>,
    schema: Option<SchemaRef>,
    rows: u64,
}

impl Spill {
    /// Starts spilling into a new folder under `spool_dir` (removed when the spill is dropped).
    pub fn create(spool_dir: &Path, table: &str, plan: &BucketPlan) -> Result<Spill, Error> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{SPILL_PREFIX}{table}-"))
            .tempdir_in(spool_dir)
            .map_err(|source| Error::SpoolDir {
                path: spool_dir.to_path_buf(),
                source,
            })?;
        let lock_path = dir.path().join(LOCK_FILE);
        let lock = File::create(&lock_path)
            .and_then(|file| file.try_lock().map_err(std::io::Error::from).map(|()| file))
            .map_err(|source| Error::Io {
                path: lock_path,
                source,
            })?;
        Ok(Spill {
            dir,
            lock,
            keys: plan.keys.clone(),
            buckets: plan.buckets,
            spread_nulls: plan.spread_nulls,
            writers: Vec::new(),
            schema: None,
            rows: 0,
        })
    }

    /// Rows spilled so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn path(&self, bucket: u32) -> PathBuf {
        bucket_path(self.dir.path(), bucket)
    }

    /// Appends `df`'s rows to their buckets.
    pub fn push(&mut self, df: &DataFrame) -> Result<(), Error> {
        // As the lake stores them (unsigned integers widened), like the whole-table path.
        let (schema, batches) = medallion_frames::lake_batches(df).map_err(Error::Convert)?;
        if self.writers.is_empty() {
            for bucket in 0..self.buckets {
                let path = self.path(bucket);
                let file = File::create(&path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                let writer = StreamWriter::try_new(BufWriter::new(file), &schema)
                    .map_err(|source| Error::Ipc { path, source })?;
                self.writers.push(writer);
            }
            self.schema = Some(schema);
        }
        for batch in &batches {
            let parts = split_batch(batch, &self.keys, self.buckets, self.spread_nulls)?;
            for (bucket, part) in parts.into_iter().enumerate() {
                if part.num_rows() == 0 {
                    continue;
                }
                // Only the bytes of this bucket's strings go to its file.
                let part = compact_views(&part)?;
                self.writers[bucket]
                    .write(&part)
                    .map_err(|source| Error::Ipc {
                        path: bucket_path(self.dir.path(), bucket as u32),
                        source,
                    })?;
            }
            self.rows += batch.num_rows() as u64;
        }
        Ok(())
    }

    /// Closes the bucket files for reading.
    pub fn finish(mut self) -> Result<SpilledBuckets, Error> {
        for (bucket, mut writer) in std::mem::take(&mut self.writers).into_iter().enumerate() {
            let path = bucket_path(self.dir.path(), bucket as u32);
            // Finishing writes the end-of-stream marker; taking the file back flushes its
            // buffer, and a failed flush must not go unnoticed.
            writer.finish().map_err(|source| Error::Ipc {
                path: path.clone(),
                source,
            })?;
            let buffered = writer.into_inner().map_err(|source| Error::Ipc {
                path: path.clone(),
                source,
            })?;
            buffered.into_inner().map_err(|e| Error::Io {
                path,
                source: e.into_error(),
            })?;
        }
        Ok(SpilledBuckets {
            schema: self.schema.take().ok_or(Error::NothingStaged)?,
            dir: self.dir,
            _lock: self.lock,
        })
    }
}

fn bucket_path(dir: &Path, bucket: u32) -> PathBuf {
    dir.join(format!("{bucket}.arrows"))
}

/// Bucket files ready to be read back one at a time.
pub struct SpilledBuckets {
    dir: tempfile::TempDir,
    schema: SchemaRef,
    _lock: File,
}

impl SpilledBuckets {
    /// The rows of one bucket, in the order they were pushed, as one chunk per column.
    pub fn read(&self, bucket: u32) -> Result<DataFrame, Error> {
        let path = bucket_path(self.dir.path(), bucket);
        let file = File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let reader =
            StreamReader::try_new(BufReader::new(file), None).map_err(|source| Error::Ipc {
                path: path.clone(),
                source,
            })?;
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Ipc {
                path: path.clone(),
                source,
            })?;
        let mut df = medallion_frames::frame_from_batches(&self.schema, &batches)
            .map_err(|source| Error::ReadFrame { path, source })?;
        drop(batches);
        // A bucket arrives in many small batches; de-duplication and joins run faster on one
        // contiguous chunk.
        df.rechunk_mut_par();
        Ok(df)
    }
}

/// Removes the spill folders under `spool_dir` that no running task holds: those a refiner
/// left when it was killed or ran out of memory. A folder is in use while its lock file is
/// locked; a folder without one is left alone for a while, as its task may be making it.
/// Returns how many were removed.
pub fn sweep(spool_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(spool_dir) else {
        return 0;
    };
    let abandoned = |dir: &Path| match File::open(dir.join(LOCK_FILE)) {
        Ok(lock) => lock.try_lock().is_ok(),
        Err(_) => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > UNLOCKED_GRACE)),
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(SPILL_PREFIX))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| abandoned(&e.path()))
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}

/// Splits a frame held in memory (the other side of a join) into `buckets` frames by `keys`,
/// the way [`Spill`] splits the table's own rows. The parts share the frame's buffers.
pub fn split_frame(
    df: &DataFrame,
    keys: &[String],
    buckets: u32,
    spread_nulls: bool,
) -> Result<Vec<DataFrame>, Error> {
    let (schema, batches) = medallion_frames::lake_batches(df).map_err(Error::Convert)?;
    let mut parts: Vec<Vec<RecordBatch>> = (0..buckets).map(|_| Vec::new()).collect();
    for batch in &batches {
        for (bucket, part) in split_batch(batch, keys, buckets, spread_nulls)?
            .into_iter()
            .enumerate()
        {
            if part.num_rows() > 0 {
                parts[bucket].push(part);
            }
        }
    }
    parts
        .iter()
        .map(|batches| {
            medallion_frames::frame_from_batches(&schema, batches).map_err(Error::Convert)
        })
        .collect()
}

/// The rows of `batch` by bucket, each part in input order.
fn split_batch(
    batch: &RecordBatch,
    keys: &[String],
    buckets: u32,
    spread_nulls: bool,
) -> Result<Vec<RecordBatch>, Error> {
    let ids = bucket_ids(batch, keys, buckets, spread_nulls)?;
    // A stable counting sort of the row numbers by bucket: one gather for the whole batch,
    // then a zero-copy slice per bucket.
    let mut starts = vec![0u32; buckets as usize + 1];
    for &b in &ids {
        starts[b as usize + 1] += 1;
    }
    for b in 0..buckets as usize {
        starts[b + 1] += starts[b];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; ids.len()];
    for (row, &b) in ids.iter().enumerate() {
        order[next[b as usize] as usize] = row as u32;
        next[b as usize] += 1;
    }
    let sorted = take_record_batch(batch, &UInt32Array::from(order)).map_err(Error::Split)?;
    Ok((0..buckets as usize)
        .map(|b| {
            let (start, end) = (starts[b] as usize, starts[b + 1] as usize);
            sorted.slice(start, end - start)
        })
        .collect())
}

/// `batch` with its string and binary view columns holding only the bytes their rows use.
fn compact_views(batch: &RecordBatch) -> Result<RecordBatch, Error> {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as ArrayRef,
            _ => c.clone(),
        })
        .collect();
    RecordBatch::try_new(batch.schema(), columns).map_err(Error::Split)
}

/// The bucket of every row of `batch`, from its `keys` columns. With `spread_nulls`, a row
/// with a null key goes to a bucket by its position instead.
fn bucket_ids(
    batch: &RecordBatch,
    keys: &[String],
    buckets: u32,
    spread_nulls: bool,
) -> Result<Vec<u32>, Error> {
    let mut hashes = vec![SEED; batch.num_rows()];
    let mut key_columns = Vec::with_capacity(keys.len());
    for key in keys {
        let column = batch
            .column_by_name(key)
            .ok_or_else(|| Error::MissingKey(key.clone()))?;
        hash_column(column, &mut hashes).map_err(|source| Error::Key {
            column: key.clone(),
            source,
        })?;
        key_columns.push(column);
    }
    let mut ids: Vec<u32> = hashes
        .into_iter()
        .map(|h| (finalize(h) % u64::from(buckets)) as u32)
        .collect();
    if spread_nulls {
        for column in key_columns {
            if let Some(nulls) = column.logical_nulls() {
                for row in nulls
                    .iter()
                    .enumerate()
                    .filter(|(_, valid)| !valid)
                    .map(|(r, _)| r)
                {
                    ids[row] = (row % buckets as usize) as u32;
                }
            }
        }
    }
    Ok(ids)
}

const SEED: u64 = 0x243f_6a88_85a3_08d3;
/// What a null value adds to a row's hash (nulls of one key column share a bucket).
const NULL_WORD: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(29)
}

/// murmur3's 64-bit finaliser: every input bit reaches the low bits the modulo keeps.
fn finalize(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn canonical_float(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = mix(SEED, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h = mix(h, u64::from_le_bytes(w));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(w));
    }
    h
}

/// Folds one column into the rows' hashes. Equal values hash equally whatever the integer
/// width or string encoding, so the two sides of a join bucket alike.
fn hash_column(column: &ArrayRef, hashes: &mut [u64]) -> Result<(), ArrowError> {
    fn values<'a>(hashes: &mut [u64], words: impl Iterator<Item = Option<u64>> + 'a) {
        for (h, w) in hashes.iter_mut().zip(words) {
            *h = mix(*h, w.unwrap_or(NULL_WORD));
        }
    }
    fn primitive<T: ArrowPrimitiveType>(
        column: &ArrayRef,
        hashes: &mut [u64],
        word: impl Fn(T::Native) -> u64,
    ) {
        values(
            hashes,
            column.as_primitive::<T>().iter().map(|v| v.map(&word)),
        );
    }
    match column.data_type() {
        DataType::Int8 => primitive::<Int8Type>(column, hashes, |v| i64::from(v) as u64),
        DataType::Int16 => primitive::<Int16Type>(column, hashes, |v| i64::from(v) as u64),
        DataType::Int32 => primitive::<Int32Type>(column, hashes, |v| i64::from(v) as u64),
        DataType::Int64 => primitive::<Int64Type>(column, hashes, |v| v as u64),
        DataType::UInt8 => primitive::<UInt8Type>(column, hashes, u64::from),
        DataType::UInt16 => primitive::<UInt16Type>(column, hashes, u64::from),
        DataType::UInt32 => primitive::<UInt32Type>(column, hashes, u64::from),
        DataType::UInt64 => primitive::<UInt64Type>(column, hashes, |v| v),
        DataType::Date32 => primitive::<Date32Type>(column, hashes, |v| i64::from(v) as u64),
        DataType::Decimal128(_, _) => {
            primitive::<Decimal128Type>(column, hashes, |v| hash_bytes(&v.to_le_bytes()))
        }
        DataType::Utf8 => values(
            hashes,
            column
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(|s| hash_bytes(s.as_bytes()))),
        ),
        DataType::LargeUtf8 => values(
            hashes,
            column
                .as_string::<i64>()
                .iter()
                .map(|v| v.map(|s| hash_bytes(s.as_bytes()))),
        ),
        DataType::Utf8View => values(
            hashes,
            column
                .as_string_view()
                .iter()
                .map(|v| v.map(|s| hash_bytes(s.as_bytes()))),
        ),
        DataType::Binary => values(
            hashes,
            column.as_binary::<i32>().iter().map(|v| v.map(hash_bytes)),
        ),
        DataType::BinaryView => values(
            hashes,
            column.as_binary_view().iter().map(|v| v.map(hash_bytes)),
        ),
        // As polars compares them: -0.0 equals 0.0, every NaN is one value, and a 32-bit
        // float joins a 64-bit one by its exact widened value.
        DataType::Float32 => {
            primitive::<Float32Type>(column, hashes, |v| canonical_float(f64::from(v)))
        }
        DataType::Float64 => primitive::<Float64Type>(column, hashes, canonical_float),
        DataType::Boolean => values(hashes, column.as_boolean().iter().map(|v| v.map(u64::from))),
        // Timestamps, other dates and times: their integer value.
        dt if dt.is_temporal() => {
            let ints = arrow::compute::cast(column, &DataType::Int64)?;
            primitive::<Int64Type>(&ints, hashes, |v| v as u64);
        }
        // Anything else by its text.
        _ => {
            let text = arrow::compute::cast(column, &DataType::Utf8)?;
            values(
                hashes,
                text.as_string::<i32>()
                    .iter()
                    .map(|v| v.map(|s| hash_bytes(s.as_bytes()))),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Float32Array, Float64Array, Int32Array, Int64Array, StringArray, StringViewArray,
    };
    use arrow::datatypes::{Field, Schema};

    fn batch(column: ArrayRef) -> RecordBatch {
        let schema = Schema::new(vec![Field::new("k", column.data_type().clone(), true)]);
        RecordBatch::try_new(Arc::new(schema), vec![column]).expect("batch")
    }

    /// The bucket of each value of `column`, used as the only key.
    fn ids(column: impl Array + 'static, buckets: u32, spread_nulls: bool) -> Vec<u32> {
        bucket_ids(
            &batch(Arc::new(column)),
            &["k".to_string()],
            buckets,
            spread_nulls,
        )
        .expect("bucket ids")
    }

    fn silver(json: serde_json::Value) -> SilverSpec {
        serde_json::from_value(json).expect("silver spec")
    }

    #[test]
    fn tables_are_bucketed_by_keys_every_whole_table_step_groups_by() {
        let both = silver(serde_json::json!({
            "name": "lineitem", "from": "bronze.lineitem",
            "dedupe": { "keys": ["orderkey", "linenumber"] },
            "join": { "with": "silver.orders", "on": [{ "left": "orderkey", "right": "o_orderkey" }] },
        }));
        let plan = BucketPlan::for_table(&both, 10_000, 1000).expect("bucketed");
        assert_eq!(plan.keys, ["orderkey"]);
        assert_eq!(plan.join_keys, ["o_orderkey"]);
        assert_eq!(plan.buckets, 10);
        assert!(!plan.spread_nulls, "null keys are one de-duplication group");
        // Small inputs are refined whole.
        assert_eq!(BucketPlan::for_table(&both, 1000, 1000), None);

        let dedupe_only = silver(serde_json::json!({
            "name": "t", "from": "bronze.t", "dedupe": { "keys": ["a", "b"] },
        }));
        let plan = BucketPlan::for_table(&dedupe_only, 2001, 1000).expect("bucketed");
        assert_eq!(
            (plan.keys, plan.join_keys, plan.buckets),
            (vec!["a".into(), "b".into()], vec![], 3)
        );

        // A de-duplication and a join with no key in common cannot share buckets.
        let disjoint = silver(serde_json::json!({
            "name": "t", "from": "bronze.t", "dedupe": { "keys": ["a"] },
            "join": { "with": "silver.u", "on": [{ "left": "b", "right": "b" }] },
        }));
        assert_eq!(BucketPlan::for_table(&disjoint, 1_000_000, 1000), None);
        // Neither step: nothing needs the rows together.
        let plain = silver(serde_json::json!({ "name": "t", "from": "bronze.t" }));
        assert_eq!(BucketPlan::for_table(&plain, 1_000_000, 1000), None);
        // A join alone: rows with null keys match nothing, so they may go anywhere.
        let join_only = silver(serde_json::json!({
            "name": "t", "from": "bronze.t",
            "join": { "with": "silver.u", "on": [{ "left": "a", "right": "b" }] },
        }));
        let plan = BucketPlan::for_table(&join_only, 5000, 1000).expect("bucketed");
        assert!(plan.spread_nulls);
        assert_eq!(
            (plan.keys, plan.join_keys),
            (vec!["a".into()], vec!["b".into()])
        );
        // The bucket count is bounded.
        let plan = BucketPlan::for_table(&dedupe_only, u64::MAX, 1).expect("bucketed");
        assert_eq!(u64::from(plan.buckets), MAX_BUCKETS);
    }

    #[test]
    fn equal_keys_share_a_bucket_whatever_their_encoding() {
        let ints: Vec<Option<i64>> = (0..1000).map(|i| (i % 7 != 0).then_some(i)).collect();
        let wide = ids(Int64Array::from(ints.clone()), 16, false);
        let narrow = ids(
            Int32Array::from(ints.iter().map(|v| v.map(|i| i as i32)).collect::<Vec<_>>()),
            16,
            false,
        );
        assert_eq!(wide, narrow);
        let text: Vec<Option<String>> =
            ints.iter().map(|v| v.map(|i| format!("key-{i}"))).collect();
        let utf8 = ids(StringArray::from(text.clone()), 16, false);
        let view = ids(StringViewArray::from(text), 16, false);
        assert_eq!(utf8, view);
        let unsigned = ids(
            UInt32Array::from(ints.iter().map(|v| v.map(|i| i as u32)).collect::<Vec<_>>()),
            16,
            false,
        );
        assert_eq!(wide, unsigned);
        // Floats as polars compares them: a 32-bit value joins its exact 64-bit widening, and
        // -0.0 equals 0.0.
        let singles = [0.1f32, -0.0, 0.0, 2.5, f32::NAN, 1e30];
        let doubles: Vec<f64> = singles
            .iter()
            .map(|v| if *v == 0.0 { 0.0 } else { f64::from(*v) })
            .collect();
        let single = ids(Float32Array::from(singles.to_vec()), 64, false);
        let double = ids(Float64Array::from(doubles), 64, false);
        assert_eq!(single, double);
        assert_eq!(single[1], single[2], "-0.0 and 0.0 share a bucket");
        // The 857 distinct keys spread over every bucket, none taking much more than its
        // share (about 54); the nulls all share one bucket.
        let mut counts = [0usize; 16];
        for (b, v) in wide.iter().zip(&ints) {
            if v.is_some() {
                counts[*b as usize] += 1;
            }
        }
        assert!(counts.iter().all(|c| (25..=90).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_split_keeps_every_row_once_in_input_order() {
        let keys: Vec<i64> = (0..5000).map(|i| (i * 37) % 101).collect();
        let schema = Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("row", DataType::Int64, false),
        ]);
        let input = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Int64Array::from(keys.clone())),
                Arc::new(Int64Array::from_iter_values(0..5000)),
            ],
        )
        .expect("batch");
        let parts = split_batch(&input, &["k".to_string()], 8, false).expect("split");
        assert_eq!(parts.len(), 8);
        let mut seen = Vec::new();
        for (b, part) in parts.iter().enumerate() {
            let rows = part.column(1).as_primitive::<Int64Type>().values();
            assert!(
                rows.windows(2).all(|w| w[0] < w[1]),
                "bucket {b} is out of order"
            );
            let part_keys = part.column(0).as_primitive::<Int64Type>().values();
            for (other_b, other) in parts.iter().enumerate().filter(|(o, _)| *o != b) {
                let other_keys = other.column(0).as_primitive::<Int64Type>().values();
                assert!(
                    other_keys.iter().all(|k| !part_keys.contains(k)),
                    "buckets {b} and {other_b} share a key"
                );
            }
            seen.extend(rows.iter().copied());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..5000).collect::<Vec<i64>>());
    }

    #[test]
    fn a_sweep_removes_only_folders_no_task_holds() {
        let spool = tempfile::tempdir().expect("spool");
        let plan = BucketPlan {
            keys: vec!["k".into()],
            join_keys: Vec::new(),
            buckets: 2,
            spread_nulls: false,
        };
        let live = Spill::create(spool.path(), "live", &plan).expect("live spill");
        let left = Spill::create(spool.path(), "left", &plan).expect("left spill");
        let left_path = left.dir.path().to_path_buf();
        // A killed task's folder: it stays on disk, its lock is gone with the process.
        drop(left.lock);
        std::mem::forget(left.dir);
        let making = spool.path().join(format!("{SPILL_PREFIX}new-1234"));
        std::fs::create_dir(&making).expect("folder being made");
        let other = spool.path().join("someone-else");
        std::fs::create_dir(&other).expect("other folder");

        assert_eq!(sweep(spool.path()), 1);
        assert!(!left_path.exists(), "the abandoned folder is removed");
        assert!(live.dir.path().exists(), "a folder in use is kept");
        assert!(making.exists() && other.exists());
    }

    #[test]
    fn null_keys_spread_only_when_asked() {
        let nulls = || Int64Array::from(vec![None::<i64>; 64]);
        let together = ids(nulls(), 8, false);
        assert!(together.iter().all(|b| *b == together[0]));
        let spread = ids(nulls(), 8, true);
        let used: std::collections::BTreeSet<u32> = spread.iter().copied().collect();
        assert_eq!(used.len(), 8);
    }
}
