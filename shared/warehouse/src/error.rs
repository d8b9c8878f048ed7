//! The crate's error type. Every variant names the table (and column, where there is one) it
//! concerns; PostgreSQL failures carry the server's message, detail and hint.

use arrow::datatypes::DataType;

use crate::QualifiedName;

/// Errors from connecting to the warehouse or loading a table into it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `schema.table` string could not be parsed.
    #[error("invalid qualified table name {input:?}: {reason}")]
    InvalidName { input: String, reason: &'static str },

    /// The connection URL could not be parsed. The URL itself is never echoed (it may hold a
    /// password).
    #[error("invalid postgres connection url")]
    InvalidUrl { source: tokio_postgres::Error },

    /// The server could not be reached or refused the session.
    #[error("connecting to postgres at {endpoint}: {source}")]
    Connect {
        /// `user@host:port/db`, never the password.
        endpoint: String,
        source: tokio_postgres::Error,
    },

    /// An Arrow column has a type this sink cannot map to PostgreSQL.
    #[error("column {column:?} of {table} has unsupported type {data_type}")]
    UnsupportedType {
        table: QualifiedName,
        column: String,
        data_type: DataType,
    },

    /// The target table exists but its columns differ from the Arrow schema. The sink never
    /// alters an existing table.
    #[error("table {table} does not match the input schema at column {column:?}: {detail}")]
    SchemaMismatch {
        table: QualifiedName,
        column: String,
        detail: String,
    },

    /// The merge keys are empty or name columns that are not in the schema.
    #[error("invalid merge keys for {table}: {detail}")]
    InvalidKeys {
        table: QualifiedName,
        detail: String,
    },

    /// A record batch from the input stream does not match the declared schema.
    #[error(
        "input batch for {table} does not match the declared schema at column {column:?}: {detail}"
    )]
    BatchSchema {
        table: QualifiedName,
        column: String,
        detail: String,
    },

    /// The input stream yielded an error; the load was rolled back.
    #[error("reading input for {table}")]
    Input {
        table: QualifiedName,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A value cannot be represented in PostgreSQL's binary format (e.g. a date out of range).
    #[error("value in row {row} of column {column:?} for {table} is out of range: {detail}")]
    ValueOutOfRange {
        table: QualifiedName,
        column: String,
        row: usize,
        detail: &'static str,
    },

    /// A statement failed on the server; the transaction was rolled back.
    #[error("{operation} for {table} failed: {message}")]
    Postgres {
        table: QualifiedName,
        operation: &'static str,
        /// Server message with detail, hint, column and constraint when present.
        message: String,
        source: tokio_postgres::Error,
    },

    /// Writing or uploading the staged Parquet files for a Redshift load failed.
    #[error("staging the rows for {table} failed: {detail}")]
    Staging {
        table: QualifiedName,
        detail: String,
    },

    /// Redshift (or its Data API) refused a call or a statement; `message` is its own text.
    #[error("redshift load of {table} failed{}: {message}", if statement.is_empty() { String::new() } else { format!(" in `{statement}`") })]
    Redshift {
        table: QualifiedName,
        statement: String,
        message: String,
    },

    /// The blocking encoder task panicked or was cancelled.
    #[error("encoding a batch for {table} failed: {source}")]
    EncodeTask {
        table: QualifiedName,
        source: tokio::task::JoinError,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Postgres`] for `operation` on `table`, spelling out the server's report.
pub(crate) fn postgres(
    table: &QualifiedName,
    operation: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres {
        table: table.clone(),
        operation,
        message: describe(&source),
        source,
    }
}

/// Renders a driver error with everything the server told us.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        return error.to_string();
    };
    let mut out = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        out.push_str("; detail: ");
        out.push_str(detail);
    }
    if let Some(hint) = db.hint() {
        out.push_str("; hint: ");
        out.push_str(hint);
    }
    if let Some(column) = db.column() {
        out.push_str("; column: ");
        out.push_str(column);
    }
    if let Some(constraint) = db.constraint() {
        out.push_str("; constraint: ");
        out.push_str(constraint);
    }
    if let Some(where_) = db.where_() {
        out.push_str("; where: ");
        out.push_str(where_);
    }
    out
}
