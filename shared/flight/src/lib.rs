//! Arrow Flight for the lake: self-describing tickets, the Flight server every layer service
//! runs for its own layer, and the client the next layer uses to read it.
//!
//! A ticket names (layer, table, version, partition), so any replica of a layer service can
//! serve any ticket: the data comes from the lake, not from the replica's memory.

mod client;
mod keys;
mod server;

pub use client::{BatchStream, FlightReader};
pub use keys::{KeyFilter, KeySet};
pub use server::LayerFlightService;

use medallion_spec::Layer;
use serde::{Deserialize, Serialize};

/// Largest Flight message sent; ~2 MiB messages with 16 MiB HTTP/2 windows measured fastest on loopback.
pub const MAX_FLIGHT_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// What a Flight ticket reads: one version of one table, whole or one partition (data file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableTicket {
    pub layer: Layer,
    pub table: String,
    pub version: i64,
    /// Index into the version's data files (in the snapshot's order); `None` reads them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<usize>,
    /// Only these columns (in table order; unknown names are ignored); `None` reads all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Only the data files added after this earlier version (the new rows of an append-only
    /// table); `partition` then indexes those files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Only the rows whose values in the filter's columns equal one of its key rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_in: Option<KeyFilter>,
    /// Instead of rows: the distinct values of these columns among the rows that differ
    /// between version `since` and `version` (one batch of those columns). Refused with
    /// `FAILED_PRECONDITION` when the files the versions differ in outweigh the table, or the
    /// schemas differ: reading the whole table is the cheaper way then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_keys: Option<Vec<String>>,
}

impl TableTicket {
    pub fn encode(&self) -> bytes::Bytes {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self)
            .map(bytes::Bytes::from)
            .unwrap_or_default()
    }

    /// The same ticket reading only `columns` (projection pushed down to the Parquet reader).
    pub fn with_columns(&self, columns: Option<Vec<String>>) -> TableTicket {
        TableTicket {
            columns,
            ..self.clone()
        }
    }

    /// The same table version, whole, reading only the files added after version `since`.
    pub fn added_since(&self, since: i64) -> TableTicket {
        TableTicket {
            partition: None,
            since: Some(since),
            ..self.clone()
        }
    }

    /// The same table version, whole, reading only the rows whose keys are in `filter`.
    pub fn rows_in(&self, filter: KeyFilter) -> TableTicket {
        TableTicket {
            rows_in: Some(filter),
            ..self.clone()
        }
    }

    /// The groups (distinct values of `columns`) of the rows that differ between version
    /// `older` and this ticket's version.
    pub fn changed_keys(&self, older: i64, columns: Vec<String>) -> TableTicket {
        TableTicket {
            partition: None,
            columns: None,
            since: Some(older),
            rows_in: None,
            changed_keys: Some(columns),
            ..self.clone()
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<TableTicket> {
        serde_json::from_slice(bytes).map_err(|e| Error::BadTicket(e.to_string()))
    }

    /// One ticket per partition of a snapshot, or a single whole-table ticket for an empty one.
    pub fn for_snapshot(snapshot: &medallion_lake::TableSnapshot) -> Vec<TableTicket> {
        let whole = TableTicket {
            layer: snapshot.layer,
            table: snapshot.table.clone(),
            version: snapshot.version,
            partition: None,
            columns: None,
            since: None,
            rows_in: None,
            changed_keys: None,
        };
        if snapshot.files.is_empty() {
            return vec![whole];
        }
        (0..snapshot.files.len())
            .map(|i| TableTicket {
                partition: Some(i),
                ..whole.clone()
            })
            .collect()
    }
}

/// The bytes of Arrow data a batch covers. Unlike `get_array_memory_size`, buffers that
/// several batches share (as batches decoded from one Flight message do) count only for the
/// slice each batch holds, so sums over a stream stay true.
pub fn batch_bytes(batch: &arrow::record_batch::RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0) as u64)
        .sum()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid Flight ticket: {0}")]
    BadTicket(String),
    #[error("Flight read of {what} from {endpoint} failed: {source}")]
    Read {
        endpoint: String,
        what: String,
        source: arrow_flight::error::FlightError,
    },
    #[error("Flight read of {what} returned inconsistent schemas: {detail}")]
    Schema { what: String, detail: String },
    #[error("no healthy replica of {endpoint} answered within {waited_secs}s")]
    NoReplica { endpoint: String, waited_secs: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
