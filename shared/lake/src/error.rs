//! The crate's one error type; every variant names what it was working on.

use crate::Layer;

/// Everything that can go wrong in lake storage, with the layer/table/path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake root could not be parsed or created.
    #[error("invalid lake root {root:?}: {reason}")]
    InvalidRoot {
        /// The root as given.
        root: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A table name that cannot be used as one path segment.
    #[error("invalid table name {name:?} in layer {layer}: {reason}")]
    InvalidTableName {
        /// Layer the table was asked for in.
        layer: Layer,
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A deltalake operation (load, write, commit, ...) failed.
    #[error("{layer}/{table}: {op} failed: {source}")]
    Delta {
        /// Layer of the table.
        layer: Layer,
        /// Table name.
        table: String,
        /// What we were doing.
        op: &'static str,
        /// The deltalake error (boxed: it is large).
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// An append whose schema differs from the table's (overwrite instead to replace it).
    #[error(
        "{layer}/{table}: cannot append with a different schema (table: {table_schema}; write: {write_schema}); use an overwrite to change the schema"
    )]
    SchemaMismatch {
        /// Layer of the table.
        layer: Layer,
        /// Table name.
        table: String,
        /// The table's current schema (rendered).
        table_schema: String,
        /// The writer's schema (rendered).
        write_schema: String,
    },

    /// An application transaction the commit expected to find unchanged has moved: another
    /// writer committed for that app id since this one read it.
    #[error(
        "{layer}/{table}: `{app_id}` is at {found:?} but this commit continues from {expected:?}: another writer took it over"
    )]
    TransactionMoved {
        /// Layer of the table.
        layer: Layer,
        /// Table name.
        table: String,
        /// The application id.
        app_id: String,
        /// The version the commit continues from (`None`: never committed).
        expected: Option<i64>,
        /// The version the table holds.
        found: Option<i64>,
    },

    /// An Arrow schema that has no Delta equivalent.
    #[error("{layer}/{table}: unsupported schema: {source}")]
    Schema {
        /// Layer of the table.
        layer: Layer,
        /// Table name.
        table: String,
        /// The conversion error.
        #[source]
        source: arrow::error::ArrowError,
    },

    /// Reading one parquet data file failed.
    #[error("{layer}/{table}: reading data file {path}: {source}")]
    Read {
        /// Layer of the table.
        layer: Layer,
        /// Table name.
        table: String,
        /// Data file path, relative to the table root.
        path: String,
        /// The parquet error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// Listing or deleting objects failed.
    #[error("object store at {location}: {source}")]
    Store {
        /// The URL or path being accessed.
        location: String,
        /// The object store error.
        #[source]
        source: deltalake::ObjectStoreError,
    },

    /// Creating the local lake root folder failed.
    #[error("creating lake root folder {path}: {source}")]
    CreateRoot {
        /// The folder.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A blocking reader task could not be started or died (no Tokio runtime, or a panic).
    #[error("{layer}/{table}: reading data file {path}: {reason}")]
    ReaderTask {
        /// Layer of the table.
        layer: Layer,
        /// Table name.
        table: String,
        /// Data file path, relative to the table root.
        path: String,
        /// What happened.
        reason: String,
    },
}

/// Result with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
