//! Committing a polars frame as one version of a lake table.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use medallion_lake::{CommitOutcome, CommitSpec, Lake};
use medallion_spec::TableRef;
use polars::prelude::{DataFrame, DataType, IntoColumn};

/// Rows per record batch written to Parquet.
const WRITE_BATCH_ROWS: usize = 128 * 1024;

/// Why a frame could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Convert(#[from] crate::Error),
    #[error(transparent)]
    Lake(#[from] medallion_lake::Error),
}

/// Writes `df` to `table` as one Delta commit, its data files tagged with `tags`.
pub async fn commit_frame(
    lake: &Lake,
    table: &TableRef,
    df: &DataFrame,
    tags: BTreeMap<String, String>,
    spec: CommitSpec,
) -> Result<CommitOutcome, CommitError> {
    let (schema, batches) = lake_batches(df)?;
    let mut writer = lake.writer(table.layer, &table.name, schema).await?;
    for batch in batches {
        writer.write(batch).await?;
    }
    writer.finish_part(tags).await?;
    Ok(writer.commit(spec).await?)
}

/// `df` as the record batches a lake table stores (unsigned integers widened to Int64).
pub fn lake_batches(df: &DataFrame) -> Result<(SchemaRef, Vec<RecordBatch>), crate::Error> {
    crate::batches_from_frame(&signed_integers(df)?, WRITE_BATCH_ROWS)
}

/// Delta has no unsigned integers; polars counts are UInt32. Widen them losslessly to Int64.
fn signed_integers(df: &DataFrame) -> Result<DataFrame, crate::Error> {
    let needs_cast = |dt: &DataType| {
        matches!(
            dt,
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64
        )
    };
    if !df.columns().iter().any(|c| needs_cast(c.dtype())) {
        return Ok(df.clone());
    }
    let mut columns = Vec::with_capacity(df.width());
    for c in df.columns() {
        if needs_cast(c.dtype()) {
            let cast = c
                .as_materialized_series()
                .strict_cast(&DataType::Int64)
                .map_err(crate::Error::Frame)?;
            columns.push(cast.into_column());
        } else {
            columns.push(c.clone());
        }
    }
    DataFrame::new(df.height(), columns).map_err(crate::Error::Frame)
}
