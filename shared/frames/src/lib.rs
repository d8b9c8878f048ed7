//! The one place where polars [`DataFrame`]s and arrow-rs [`RecordBatch`]es convert.
//!
//! polars carries its own Arrow implementation (`polars-arrow`), so the two sides share no Rust
//! types. Every conversion here goes through the Arrow C Data Interface: the producer exports
//! its buffers as `ArrowArray`/`ArrowSchema` C structs and the consumer imports them, keeping
//! the producer's allocations alive through the C `release` callback. No value buffer is
//! copied in either direction, and nothing is serialised to Arrow IPC bytes.
//!
//! Type mapping (arrow-rs <-> polars):
//!
//! | arrow-rs                                        | polars                   | back to arrow-rs |
//! | ----------------------------------------------- | ------------------------ | ---------------- |
//! | `Utf8`, `LargeUtf8`, `Utf8View`                 | `String`                 | `Utf8View`       |
//! | `Binary`, `LargeBinary`, `BinaryView`           | `Binary`                 | `BinaryView`     |
//! | `Boolean`, `Int32`, `Int64`, `UInt32`, `UInt64` | same                     | same             |
//! | `Float32`, `Float64`                            | same                     | same             |
//! | `Date32`                                        | `Date`                   | `Date32`         |
//! | `Timestamp(ms/us/ns, tz)`                       | `Datetime(unit, tz)`     | same             |
//! | `Decimal128(p, s)`, `1 <= p <= 38`, `0 <= s <= p` | `Decimal(p, s)`        | same             |
//!
//! polars stores every string column as a view array, so `Utf8`/`LargeUtf8` input is turned into
//! views by polars itself on import (`polars_compute::cast::utf8_to_utf8view`): it builds one
//! 16-byte view per row but *re-uses* the imported value buffer for the string bytes, which is
//! the least copying possible (casting on the arrow-rs side first would cost the same views).
//! Strings always come back as `Utf8View`.
//!
//! Other types (nested types, dictionaries, 8/16-bit integers, `Timestamp(Second)`, ...) are
//! rejected with [`Error::UnsupportedType`] naming the column and type, rather than relying on
//! polars code paths that panic or silently change the unit.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, make_array, new_empty_array};
use arrow::datatypes::{DataType as ArrowDataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi_and_data_type};
use polars::prelude::{
    ArrowField as PlArrowField, Column, CompatLevel, DataFrame, DataType as PlDataType,
    PolarsError, Series,
};
use polars_arrow::array::Array as PlArray;
use polars_arrow::ffi as pl_ffi;

/// Errors from converting between polars and arrow-rs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The column's type is not one this crate converts (see the crate docs for the mapping).
    #[error("column `{column}` has type {data_type}, which cannot be converted: {reason}")]
    UnsupportedType {
        /// Column (field) name.
        column: String,
        /// The offending type, as text (arrow-rs or polars notation).
        data_type: String,
        /// Why it is not supported.
        reason: &'static str,
    },
    /// A record batch does not match the schema it was passed with.
    #[error("record batch {batch} does not match the schema: {detail}")]
    SchemaMismatch {
        /// Index of the batch in the input slice.
        batch: usize,
        /// What differs.
        detail: String,
    },
    /// arrow-rs rejected a column while exporting or importing it over the C Data Interface.
    #[error("column `{column}` ({data_type}): {context}")]
    Arrow {
        /// Column (field) name.
        column: String,
        /// The column's type, as text.
        data_type: String,
        /// What was being done.
        context: &'static str,
        /// The underlying arrow-rs error.
        #[source]
        source: ArrowError,
    },
    /// polars rejected a column while exporting or importing it.
    #[error("column `{column}` ({data_type}): {context}")]
    Polars {
        /// Column (field) name.
        column: String,
        /// The column's type, as text.
        data_type: String,
        /// What was being done.
        context: &'static str,
        /// The underlying polars error.
        #[source]
        source: PolarsError,
    },
    /// polars could not assemble the imported columns into a `DataFrame` (e.g. duplicate names).
    #[error("building the polars DataFrame failed")]
    Frame(#[source] PolarsError),
    /// arrow-rs could not assemble the exported columns into a `RecordBatch`.
    #[error("building an arrow RecordBatch failed")]
    RecordBatch(#[source] ArrowError),
    /// `max_rows_per_batch` was zero.
    #[error("max_rows_per_batch must be at least 1")]
    ZeroBatchSize,
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

// The two crates define the same `#[repr(C)]` C Data Interface structs; ownership is moved
// between them by reinterpreting one as the other, so their layouts must agree.
const _: () = {
    use std::mem::{align_of, size_of};
    assert!(size_of::<pl_ffi::ArrowArray>() == size_of::<FFI_ArrowArray>());
    assert!(align_of::<pl_ffi::ArrowArray>() == align_of::<FFI_ArrowArray>());
    assert!(size_of::<pl_ffi::ArrowSchema>() == size_of::<FFI_ArrowSchema>());
    assert!(align_of::<pl_ffi::ArrowSchema>() == align_of::<FFI_ArrowSchema>());
};

/// Sends polars' own warnings to the service's log as events of target `polars`, instead of
/// bare lines on stderr that a structured log pipeline cannot parse. Deprecations concern the
/// polars calls Medallion makes (and polars' SQL, which casts `DATE '…'` literals in a way it
/// has deprecated), which a spec cannot change, so they are logged at debug; others at warn.
pub fn log_polars_warnings() {
    polars::error::set_warning_function(|message, kind| match kind {
        polars::error::PolarsWarning::Deprecation => {
            tracing::debug!(target: "polars", kind = ?kind, "{message}")
        }
        _ => tracing::warn!(target: "polars", kind = ?kind, "{message}"),
    });
}

// ---------------------------------------------------------------------------------------------
// arrow-rs -> polars
// ---------------------------------------------------------------------------------------------

/// Builds a polars [`DataFrame`] from arrow-rs record batches without copying value buffers.
///
/// Each batch becomes one chunk of every column (empty batches are skipped); call
/// `rechunk_mut_par` on the result if a single contiguous chunk is needed. Column names are the
/// schema's field names. With no rows at all the result is an empty frame with the schema's
/// columns and dtypes. `Utf8`/`LargeUtf8` columns become polars `String` (views built, string
/// bytes shared; see the crate docs). Field nullability is not enforced (polars has none).
///
/// # Errors
/// [`Error::UnsupportedType`] for a column type outside the crate's mapping,
/// [`Error::SchemaMismatch`] when a batch's columns differ from `schema`, and
/// [`Error::Polars`]/[`Error::Arrow`]/[`Error::Frame`] when a library rejects the data.
pub fn frame_from_batches(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<DataFrame> {
    for (index, batch) in batches.iter().enumerate() {
        check_batch_matches(schema, index, batch)?;
    }
    let height = batches.iter().map(RecordBatch::num_rows).sum();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        check_arrow_supported(field)?;
        let pl_field = import_field(field)?;
        let mut chunks: Vec<Box<dyn PlArray>> = batches
            .iter()
            .filter(|batch| batch.num_rows() > 0)
            .map(|batch| import_array(field, &pl_field, batch.column(i)))
            .collect::<Result<_>>()?;
        if chunks.is_empty() {
            chunks.push(import_array(
                field,
                &pl_field,
                &new_empty_array(field.data_type()),
            )?);
        }
        let series = Series::try_from((&pl_field, chunks)).map_err(|source| Error::Polars {
            column: field.name().clone(),
            data_type: field.data_type().to_string(),
            context: "polars could not build a series from the imported arrays",
            source,
        })?;
        columns.push(Column::from(series));
    }
    DataFrame::new(height, columns).map_err(Error::Frame)
}

fn check_batch_matches(schema: &SchemaRef, index: usize, batch: &RecordBatch) -> Result<()> {
    let batch_schema = batch.schema_ref();
    if batch_schema.fields().len() != schema.fields().len() {
        return Err(Error::SchemaMismatch {
            batch: index,
            detail: format!(
                "{} columns, expected {}",
                batch_schema.fields().len(),
                schema.fields().len()
            ),
        });
    }
    for (expected, actual) in schema.fields().iter().zip(batch_schema.fields()) {
        if expected.data_type() != actual.data_type() {
            return Err(Error::SchemaMismatch {
                batch: index,
                detail: format!(
                    "column `{}` is {}, expected {} (schema column `{}`)",
                    actual.name(),
                    actual.data_type(),
                    expected.data_type(),
                    expected.name()
                ),
            });
        }
    }
    Ok(())
}

fn check_arrow_supported(field: &Field) -> Result<()> {
    let unsupported = |reason| {
        Err(Error::UnsupportedType {
            column: field.name().clone(),
            data_type: field.data_type().to_string(),
            reason,
        })
    };
    match field.data_type() {
        ArrowDataType::Boolean
        | ArrowDataType::Int32
        | ArrowDataType::Int64
        | ArrowDataType::UInt32
        | ArrowDataType::UInt64
        | ArrowDataType::Float32
        | ArrowDataType::Float64
        | ArrowDataType::Utf8
        | ArrowDataType::LargeUtf8
        | ArrowDataType::Utf8View
        | ArrowDataType::Binary
        | ArrowDataType::LargeBinary
        | ArrowDataType::BinaryView
        | ArrowDataType::Date32 => Ok(()),
        ArrowDataType::Timestamp(TimeUnit::Second, _) => {
            unsupported("polars would rescale seconds to milliseconds; cast to ms/us/ns first")
        }
        ArrowDataType::Timestamp(_, _) => Ok(()),
        ArrowDataType::Decimal128(precision, scale) => {
            if (1..=38).contains(precision) && *scale >= 0 && (*scale as u8) <= *precision {
                Ok(())
            } else {
                unsupported("polars decimals need 1 <= precision <= 38 and 0 <= scale <= precision")
            }
        }
        _ => unsupported("not in the polars <-> arrow mapping of medallion-frames"),
    }
}

/// Moves an arrow-rs `FFI_ArrowSchema` into polars' definition of the same C struct.
fn schema_to_polars_ffi(schema: FFI_ArrowSchema) -> pl_ffi::ArrowSchema {
    let mut out = pl_ffi::ArrowSchema::empty();
    // SAFETY: both types are `#[repr(C)]` definitions of the C Data Interface `ArrowSchema`
    // (size and alignment are asserted equal above). `ptr::write` moves `schema` into `out`
    // without dropping the empty placeholder (which owns nothing) and without running
    // `schema`'s destructor, so the release callback runs exactly once, when `out` drops.
    unsafe { std::ptr::write((&raw mut out).cast::<FFI_ArrowSchema>(), schema) };
    out
}

/// Moves an arrow-rs `FFI_ArrowArray` into polars' definition of the same C struct.
fn array_to_polars_ffi(array: FFI_ArrowArray) -> pl_ffi::ArrowArray {
    let mut out = pl_ffi::ArrowArray::empty();
    // SAFETY: as in `schema_to_polars_ffi`, for the C Data Interface `ArrowArray` struct.
    unsafe { std::ptr::write((&raw mut out).cast::<FFI_ArrowArray>(), array) };
    out
}

fn import_field(field: &Field) -> Result<PlArrowField> {
    let arrow_err = |context, source| Error::Arrow {
        column: field.name().clone(),
        data_type: field.data_type().to_string(),
        context,
        source,
    };
    let c_schema = FFI_ArrowSchema::try_from(field).map_err(|source| {
        arrow_err("exporting the field to the C Data Interface failed", source)
    })?;
    let c_schema = schema_to_polars_ffi(c_schema);
    // SAFETY: `c_schema` was just produced by arrow-rs's exporter, so it is a valid, released-
    // once C Data Interface schema; polars only reads it here and it is dropped afterwards.
    unsafe { pl_ffi::import_field_from_c(&c_schema) }.map_err(|source| Error::Polars {
        column: field.name().clone(),
        data_type: field.data_type().to_string(),
        context: "polars could not import the field from the C Data Interface",
        source,
    })
}

fn import_array(
    field: &Field,
    pl_field: &PlArrowField,
    array: &ArrayRef,
) -> Result<Box<dyn PlArray>> {
    let c_array = array_to_polars_ffi(FFI_ArrowArray::new(&array.to_data()));
    // SAFETY: `c_array` is a valid C Data Interface array exported by arrow-rs from an array
    // whose type is `field.data_type()` (checked against the schema by the caller), and
    // `pl_field.dtype` is polars' import of that same type. polars takes ownership and calls
    // the release callback when its buffers are dropped.
    unsafe { pl_ffi::import_array_from_c(c_array, pl_field.dtype.clone()) }.map_err(|source| {
        Error::Polars {
            column: field.name().clone(),
            data_type: field.data_type().to_string(),
            context: "polars could not import the array from the C Data Interface",
            source,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// polars -> arrow-rs
// ---------------------------------------------------------------------------------------------

/// Converts a polars [`DataFrame`] into an arrow-rs schema and record batches of at most
/// `max_rows_per_batch` rows each, without copying value buffers.
///
/// This collects [`FrameBatches`]; use that iterator directly to stream. Strings come out as
/// `Utf8View`, binaries as `BinaryView`; every field is nullable. A frame without rows gives
/// the schema and no batches.
///
/// # Errors
/// [`Error::ZeroBatchSize`], [`Error::UnsupportedType`] for a polars dtype outside the crate's
/// mapping, and [`Error::Polars`]/[`Error::Arrow`]/[`Error::RecordBatch`] when a library
/// rejects the data.
pub fn batches_from_frame(
    df: &DataFrame,
    max_rows_per_batch: usize,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let batches = FrameBatches::new(df, max_rows_per_batch)?;
    let schema = batches.schema();
    let batches = batches.collect::<Result<Vec<_>>>()?;
    Ok((schema, batches))
}

/// A streaming conversion of a polars [`DataFrame`] into arrow-rs [`RecordBatch`]es of at most
/// `max_rows_per_batch` rows.
///
/// The frame's chunks are aligned up front (`align_chunks_par`: a no-op when every column
/// already has the same chunk boundaries, a rechunk otherwise). Each polars chunk is exported
/// once over the C Data Interface when first reached, then sliced (zero-copy) into batches.
pub struct FrameBatches {
    df: DataFrame,
    schema: SchemaRef,
    polars_fields: Vec<PlArrowField>,
    max_rows: usize,
    n_chunks: usize,
    next_chunk: usize,
    current: Option<(RecordBatch, usize)>,
}

impl FrameBatches {
    /// Prepares the conversion of `df` (cheaply cloned: polars columns are reference counted).
    ///
    /// # Errors
    /// [`Error::ZeroBatchSize`], [`Error::UnsupportedType`], or an error importing a field's
    /// type into arrow-rs.
    pub fn new(df: &DataFrame, max_rows_per_batch: usize) -> Result<Self> {
        if max_rows_per_batch == 0 {
            return Err(Error::ZeroBatchSize);
        }
        let mut df = df.clone();
        df.align_chunks_par();
        let mut fields = Vec::with_capacity(df.width());
        let mut polars_fields = Vec::with_capacity(df.width());
        for column in df.columns() {
            let (field, pl_field) = export_field(column.name().as_str(), column.dtype())?;
            fields.push(field);
            polars_fields.push(pl_field);
        }
        let n_chunks = if df.height() == 0 {
            0
        } else if df.width() == 0 {
            1
        } else {
            df.first_col_n_chunks()
        };
        Ok(Self {
            df,
            schema: Arc::new(Schema::new(fields)),
            polars_fields,
            max_rows: max_rows_per_batch,
            n_chunks,
            next_chunk: 0,
            current: None,
        })
    }

    /// The arrow-rs schema every batch has.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn export_chunk(&self, chunk: usize) -> Result<RecordBatch> {
        if self.df.width() == 0 {
            let options = RecordBatchOptions::new().with_row_count(Some(self.df.height()));
            return RecordBatch::try_new_with_options(Arc::clone(&self.schema), vec![], &options)
                .map_err(Error::RecordBatch);
        }
        let mut arrays = Vec::with_capacity(self.df.width());
        for ((column, field), pl_field) in self
            .df
            .columns()
            .iter()
            .zip(self.schema.fields())
            .zip(&self.polars_fields)
        {
            let series = column.as_materialized_series();
            arrays.push(export_array(series, chunk, field, pl_field)?);
        }
        RecordBatch::try_new(Arc::clone(&self.schema), arrays).map_err(Error::RecordBatch)
    }
}

impl Iterator for FrameBatches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((batch, offset)) = self.current.take() {
                let rows = batch.num_rows();
                if offset < rows {
                    let len = usize::min(self.max_rows, rows - offset);
                    let slice = batch.slice(offset, len);
                    self.current = Some((batch, offset + len));
                    return Some(Ok(slice));
                }
            }
            if self.next_chunk >= self.n_chunks {
                return None;
            }
            let chunk = self.next_chunk;
            self.next_chunk += 1;
            match self.export_chunk(chunk) {
                Ok(batch) => self.current = Some((batch, 0)),
                Err(err) => {
                    self.next_chunk = self.n_chunks;
                    return Some(Err(err));
                }
            }
        }
    }
}

fn export_field(name: &str, dtype: &PlDataType) -> Result<(Field, PlArrowField)> {
    let supported = match dtype {
        PlDataType::Boolean
        | PlDataType::Int32
        | PlDataType::Int64
        | PlDataType::UInt32
        | PlDataType::UInt64
        | PlDataType::Float32
        | PlDataType::Float64
        | PlDataType::String
        | PlDataType::Binary
        | PlDataType::Date
        | PlDataType::Datetime(_, _) => true,
        PlDataType::Decimal(precision, _) => (1..=38).contains(precision),
        _ => false,
    };
    if !supported {
        return Err(Error::UnsupportedType {
            column: name.to_owned(),
            data_type: dtype.to_string(),
            reason: "not in the polars <-> arrow mapping of medallion-frames",
        });
    }
    let polars_err = |context, source| Error::Polars {
        column: name.to_owned(),
        data_type: dtype.to_string(),
        context,
        source,
    };
    let arrow_dtype = dtype
        .try_to_arrow(CompatLevel::newest())
        .map_err(|source| polars_err("polars has no arrow type for this dtype", source))?;
    let pl_field = PlArrowField::new(name.into(), arrow_dtype, true);
    let mut c_schema = pl_ffi::export_field_to_c(&pl_field);
    // SAFETY: `c_schema` is a valid C Data Interface schema just exported by polars, and both
    // crates define the struct identically (`#[repr(C)]`, layout asserted above). `from_raw`
    // moves it out and leaves a released (empty) struct behind, so polars' `Drop` on
    // `c_schema` does nothing and arrow-rs releases it exactly once.
    let c_schema = unsafe { FFI_ArrowSchema::from_raw((&raw mut c_schema).cast()) };
    let field = Field::try_from(&c_schema).map_err(|source| Error::Arrow {
        column: name.to_owned(),
        data_type: dtype.to_string(),
        context: "arrow-rs could not import the field from the C Data Interface",
        source,
    })?;
    Ok((field, pl_field))
}

fn export_array(
    series: &Series,
    chunk: usize,
    field: &Field,
    pl_field: &PlArrowField,
) -> Result<ArrayRef> {
    let array = series
        .to_arrow_with_field(chunk, Cow::Borrowed(pl_field), true)
        .map_err(|source| Error::Polars {
            column: field.name().clone(),
            data_type: series.dtype().to_string(),
            context: "polars could not export the chunk as arrow",
            source,
        })?;
    let mut c_array = pl_ffi::export_array_to_c(array);
    // SAFETY: `c_array` is a valid C Data Interface array just exported by polars; the structs
    // share one `#[repr(C)]` layout (asserted above). `from_raw` moves it out and leaves a
    // released struct behind, so it is released once, by arrow-rs, when the buffers drop.
    let c_array = unsafe { FFI_ArrowArray::from_raw((&raw mut c_array).cast()) };
    // SAFETY: the array was exported from a polars array of arrow type `pl_field.dtype`, and
    // `field.data_type()` is arrow-rs's import of that same type over the C Data Interface.
    let data = unsafe { from_ffi_and_data_type(c_array, field.data_type().clone()) }.map_err(
        |source| Error::Arrow {
            column: field.name().clone(),
            data_type: field.data_type().to_string(),
            context: "arrow-rs could not import the array from the C Data Interface",
            source,
        },
    )?;
    Ok(make_array(data))
}

#[cfg(test)]
mod tests;

mod lake;
pub use lake::{CommitError, commit_frame, lake_batches};
