//! Key sets for reading a few groups of a table: which groups changed between two versions,
//! and a filter that keeps only the rows of given groups. Both compare values in arrow's row
//! format (one byte string per row), so any column types work, nulls included.

use std::collections::{HashMap, HashSet};

use arrow::array::{ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::{CastOptions, cast_with_options, filter_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::row::{RowConverter, SortField};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Rows whose values in `columns` equal one of the key rows, sent inside a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFilter {
    pub columns: Vec<String>,
    /// The key rows: an Arrow IPC stream of one batch with exactly `columns`, base64.
    pub values: String,
}

impl KeyFilter {
    /// A filter keeping the rows that match one row of `keys` on all of its columns.
    pub fn new(keys: &RecordBatch) -> Result<KeyFilter> {
        let bad = |e: arrow::error::ArrowError| Error::BadTicket(format!("encoding keys: {e}"));
        let mut bytes = Vec::new();
        let mut writer = StreamWriter::try_new(&mut bytes, &keys.schema()).map_err(bad)?;
        writer.write(keys).map_err(bad)?;
        writer.finish().map_err(bad)?;
        drop(writer);
        Ok(KeyFilter {
            columns: keys
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect(),
            values: base64::engine::general_purpose::STANDARD.encode(bytes),
        })
    }

    fn keys(&self) -> Result<RecordBatch> {
        let bad = |what: String| Error::BadTicket(format!("key filter: {what}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.values)
            .map_err(|e| bad(e.to_string()))?;
        let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| bad(e.to_string()))?;
        let schema = reader.schema();
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        arrow::compute::concat_batches(&schema, &batches).map_err(|e| bad(e.to_string()))
    }
}

/// The column positions and row encoder of a set of key columns of one table schema.
struct KeyColumns {
    indices: Vec<usize>,
    converter: RowConverter,
}

impl KeyColumns {
    fn new(schema: &Schema, columns: &[String]) -> Result<KeyColumns> {
        let indices = columns
            .iter()
            .map(|c| {
                schema.index_of(c).map_err(|_| {
                    Error::BadTicket(format!("key column {c} is not among the columns read"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fields = indices
            .iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields)
            .map_err(|e| Error::BadTicket(format!("key columns {columns:?}: {e}")))?;
        Ok(KeyColumns { indices, converter })
    }

    fn rows(&self, batch: &RecordBatch) -> arrow::error::Result<arrow::row::Rows> {
        let columns: Vec<ArrayRef> = self
            .indices
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        self.converter.convert_columns(&columns)
    }
}

/// A set of key rows, matched against the key columns of a table's batches.
pub struct KeySet {
    columns: KeyColumns,
    keys: HashSet<Box<[u8]>>,
}

impl KeySet {
    /// The filter's keys, typed as the columns of `schema` (the schema of the batches read).
    pub(crate) fn new(filter: &KeyFilter, schema: &Schema) -> Result<KeySet> {
        KeySet::of_keys(&filter.keys()?, &filter.columns, schema)
    }

    /// The rows of `given` (one column per name in `columns`, in that order) as keys of
    /// batches of `schema`.
    pub fn of_keys(given: &RecordBatch, columns: &[String], schema: &Schema) -> Result<KeySet> {
        let columns = KeyColumns::new(schema, columns)?;
        if given.num_columns() != columns.indices.len() {
            return Err(Error::BadTicket(format!(
                "key filter has {} columns of values for {} names",
                given.num_columns(),
                columns.indices.len()
            )));
        }
        // The keys come from another engine (polars' string views, say): cast to the table's types.
        let typed = columns
            .indices
            .iter()
            .zip(given.columns())
            .map(|(&i, values)| {
                // Strict: a value that does not convert must not turn into a null key.
                let options = CastOptions {
                    safe: false,
                    ..CastOptions::default()
                };
                cast_with_options(values, schema.field(i).data_type(), &options)
            })
            .collect::<arrow::error::Result<Vec<_>>>()
            .map_err(|e| Error::BadTicket(format!("key filter values: {e}")))?;
        let rows = columns
            .converter
            .convert_columns(&typed)
            .map_err(|e| Error::BadTicket(format!("key filter values: {e}")))?;
        let keys = rows.iter().map(|r| Box::from(r.as_ref())).collect();
        Ok(KeySet { columns, keys })
    }

    /// The rows of `batch` whose keys are in the set.
    pub fn filter(&self, batch: &RecordBatch) -> arrow::error::Result<RecordBatch> {
        filter_record_batch(batch, &self.matches(batch, true)?)
    }

    /// The rows of `batch` whose keys are not in the set.
    pub fn filter_out(&self, batch: &RecordBatch) -> arrow::error::Result<RecordBatch> {
        filter_record_batch(batch, &self.matches(batch, false)?)
    }

    fn matches(&self, batch: &RecordBatch, wanted: bool) -> arrow::error::Result<BooleanArray> {
        let rows = self.columns.rows(batch)?;
        Ok(rows
            .iter()
            .map(|r| Some(self.keys.contains(r.as_ref()) == wanted))
            .collect())
    }
}

/// A row (or a row's key) in arrow's row format.
type EncodedRow = Box<[u8]>;

/// Finds the groups (distinct values of some key columns) of the rows that differ between two
/// versions of a table: rows only in the older files or only in the newer ones, compared
/// whole, so rows a rewrite carried over unchanged touch nothing.
pub(crate) struct ChangedKeys {
    whole: RowConverter,
    keys: KeyColumns,
    key_schema: SchemaRef,
    /// Rows of the older files not yet matched by a newer row: count and the row's key.
    older: HashMap<EncodedRow, (u64, EncodedRow)>,
    changed: HashSet<EncodedRow>,
}

impl ChangedKeys {
    pub(crate) fn new(schema: SchemaRef, columns: &[String]) -> Result<ChangedKeys> {
        let whole = RowConverter::new(
            schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )
        .map_err(|e| Error::BadTicket(format!("comparing rows: {e}")))?;
        let keys = KeyColumns::new(&schema, columns)?;
        let key_schema = std::sync::Arc::new(Schema::new(
            keys.indices
                .iter()
                .map(|&i| schema.field(i).as_ref().clone())
                .collect::<Vec<Field>>(),
        ));
        Ok(ChangedKeys {
            whole,
            keys,
            key_schema,
            older: HashMap::new(),
            changed: HashSet::new(),
        })
    }

    fn encode(
        &self,
        batch: &RecordBatch,
    ) -> arrow::error::Result<(arrow::row::Rows, arrow::row::Rows)> {
        Ok((
            self.whole.convert_columns(batch.columns())?,
            self.keys.rows(batch)?,
        ))
    }

    /// A batch of the older version's files that the newer version no longer has.
    pub(crate) fn add_older(&mut self, batch: &RecordBatch) -> arrow::error::Result<()> {
        let (rows, keys) = self.encode(batch)?;
        for (row, key) in rows.iter().zip(keys.iter()) {
            self.older
                .entry(Box::from(row.as_ref()))
                .or_insert_with(|| (0, Box::from(key.as_ref())))
                .0 += 1;
        }
        Ok(())
    }

    /// A batch of the newer version's files that the older version did not have; call after
    /// every older batch.
    pub(crate) fn add_newer(&mut self, batch: &RecordBatch) -> arrow::error::Result<()> {
        let (rows, keys) = self.encode(batch)?;
        for (row, key) in rows.iter().zip(keys.iter()) {
            match self.older.get_mut(row.as_ref()) {
                Some((count, _)) if *count > 0 => *count -= 1,
                _ => {
                    if !self.changed.contains(key.as_ref()) {
                        self.changed.insert(Box::from(key.as_ref()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The distinct keys of every changed row, as one batch of the key columns.
    pub(crate) fn finish(mut self) -> arrow::error::Result<RecordBatch> {
        for (count, key) in self.older.into_values() {
            if count > 0 {
                self.changed.insert(key);
            }
        }
        let parser = self.keys.converter.parser();
        let columns = self
            .keys
            .converter
            .convert_rows(self.changed.iter().map(|k| parser.parse(k)))?;
        RecordBatch::try_new_with_options(
            self.key_schema,
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(self.changed.len())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, StringViewArray};
    use arrow::compute::cast;
    use arrow::datatypes::DataType;
    use std::sync::Arc;

    fn table(regions: &[Option<&str>], values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("region", DataType::Utf8, true),
            Field::new("value", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(regions.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .expect("batch")
    }

    fn regions(batch: &RecordBatch) -> Vec<Option<String>> {
        let column = cast(batch.column(0), &DataType::Utf8).expect("cast");
        let strings = column
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("strings");
        let mut out: Vec<Option<String>> = strings.iter().map(|s| s.map(str::to_owned)).collect();
        out.sort();
        out
    }

    #[test]
    fn only_groups_of_rows_that_differ_are_changed() {
        let older = table(&[Some("eu"), Some("us"), None, Some("asia")], &[1, 2, 3, 4]);
        // eu unchanged, us changed value, the null group deleted, asia unchanged, apac new.
        let newer = table(
            &[Some("eu"), Some("us"), Some("asia"), Some("apac")],
            &[1, 5, 4, 6],
        );
        let mut changed = ChangedKeys::new(older.schema(), &["region".into()]).expect("new");
        changed.add_older(&older).expect("older");
        changed.add_newer(&newer).expect("newer");
        let keys = changed.finish().expect("finish");
        assert_eq!(
            regions(&keys),
            vec![None, Some("apac".into()), Some("us".into())]
        );
    }

    #[test]
    fn a_row_repeated_counts_each_copy() {
        let older = table(&[Some("eu"), Some("eu")], &[1, 1]);
        let newer = table(&[Some("eu")], &[1]);
        let mut changed = ChangedKeys::new(older.schema(), &["region".into()]).expect("new");
        changed.add_older(&older).expect("older");
        changed.add_newer(&newer).expect("newer");
        assert_eq!(
            regions(&changed.finish().expect("finish")),
            vec![Some("eu".into())]
        );
    }

    #[test]
    fn a_key_filter_keeps_matching_rows_whatever_the_string_type_it_was_built_from() {
        let keys = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(
                "region",
                DataType::Utf8View,
                true,
            )])),
            vec![Arc::new(StringViewArray::from(vec![Some("us"), None]))],
        )
        .expect("keys");
        let filter = KeyFilter::new(&keys).expect("filter");
        let data = table(&[Some("eu"), Some("us"), None, Some("us")], &[1, 2, 3, 4]);
        let set = KeySet::new(&filter, &data.schema()).expect("set");
        let kept = set.filter(&data).expect("filter");
        let values: Vec<i64> = kept
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("ints")
            .values()
            .to_vec();
        assert_eq!(values, vec![2, 3, 4]);
    }

    #[test]
    fn a_key_filter_on_a_column_not_read_is_refused() {
        let keys = table(&[Some("eu")], &[1]);
        let filter = KeyFilter::new(&keys).expect("filter");
        let schema = Schema::new(vec![Field::new("region", DataType::Utf8, true)]);
        let err = KeySet::new(&filter, &schema).err().expect("refused");
        assert!(err.to_string().contains("value"), "{err}");
    }
}
