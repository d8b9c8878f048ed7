//! Loads Arrow tables into PostgreSQL, or into Amazon Redshift through the Redshift Data API
//! ([`RedshiftSink`], which stages Parquet on S3 and loads it with `COPY`).
//!
//! [`PostgresSink::load`] runs one transaction per load:
//!
//! 1. `CREATE SCHEMA IF NOT EXISTS` and `CREATE TABLE IF NOT EXISTS` from the Arrow schema (with
//!    a primary key on the merge keys in [`LoadMode::Merge`]); an existing table whose columns
//!    differ is an error, never silently altered.
//! 2. The batches are streamed, one at a time, with binary `COPY` into a temporary staging table
//!    (`LIKE` the target, `ON COMMIT DROP`).
//! 3. [`LoadMode::Replace`] deletes the target's rows and inserts the staged ones;
//!    [`LoadMode::Merge`] upserts them by key.
//!
//! Any failure (bad input, a constraint violation, a broken stream) rolls the whole load back,
//! leaving the previous rows in place.
//!
//! Dependency direction: this is a `shared/*` crate; it depends only on `medallion-objects`
//! (for the Redshift staging files).

mod copy;
mod error;
mod name;
mod redshift;
mod sink;
mod types;

pub use error::{Error, Result};
pub use name::QualifiedName;
pub use redshift::{RedshiftSink, RedshiftTarget, STAGED_FILE_ROWS};
pub use sink::{LoadMode, LoadReport, PostgresSink};
