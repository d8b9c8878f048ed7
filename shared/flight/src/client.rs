//! Reading a layer over Flight from whichever replica the endpoint reaches.

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use arrow_flight::{FlightClient, Ticket};
use futures::{StreamExt, TryStreamExt};
use tonic::transport::{Channel, Endpoint};

/// Partitions of one table read at once.
const PARALLEL_PARTITIONS: usize = 4;

use crate::{Error, Result, TableTicket};

/// Opens a channel with the large HTTP/2 windows Flight needs for throughput.
pub async fn connect(endpoint: &str) -> Result<Channel> {
    let window = 16 * 1024 * 1024;
    Endpoint::from_shared(endpoint.to_string())
        .map_err(|source| Error::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect()
        .await
        .map_err(|source| Error::Connect {
            endpoint: endpoint.to_string(),
            source,
        })
}

/// Reads tables from one layer service's Flight face.
#[derive(Clone)]
pub struct FlightReader {
    endpoint: String,
    channel: Channel,
}

impl FlightReader {
    pub async fn connect(endpoint: &str) -> Result<Self> {
        Ok(FlightReader {
            endpoint: endpoint.to_string(),
            channel: connect(endpoint).await?,
        })
    }

    fn client(&self) -> FlightClient {
        let inner =
            arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024);
        FlightClient::new_from_inner(inner)
    }

    /// Reads one ticket into memory: its schema and batches.
    async fn read_one(
        &self,
        ticket: &TableTicket,
    ) -> Result<(Option<SchemaRef>, Vec<RecordBatch>)> {
        let what = format!("{}.{}@{}", ticket.layer, ticket.table, ticket.version);
        let error = |source| Error::Read {
            endpoint: self.endpoint.clone(),
            what: what.clone(),
            source,
        };
        let mut stream = self
            .client()
            .do_get(Ticket::new(ticket.encode()))
            .await
            .map_err(error)?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch.map_err(error)?);
        }
        Ok((stream.schema().cloned(), batches))
    }

    /// Reads every ticket into memory (batches in ticket order), a few partitions at a time
    /// so decoding on the serving side runs in parallel; the schema comes even without rows.
    pub async fn read_all(&self, tickets: &[TableTicket]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        // Owned reader and tickets in the stream: its future stays `Send` for any caller.
        let reader = self.clone();
        let parts: Vec<_> = futures::stream::iter(tickets.to_vec())
            .map(move |ticket| {
                let reader = reader.clone();
                async move { reader.read_one(&ticket).await }
            })
            .buffered(PARALLEL_PARTITIONS)
            .try_collect()
            .await?;
        let mut schema: Option<SchemaRef> = None;
        let mut batches = Vec::new();
        for (got, part) in parts {
            match (&schema, got) {
                (None, Some(s)) => schema = Some(s),
                (Some(a), Some(b)) if a.fields() != b.fields() => {
                    return Err(Error::Schema {
                        what: tickets
                            .first()
                            .map(|t| format!("{}.{}", t.layer, t.table))
                            .unwrap_or_default(),
                        detail: format!("{a:?} vs {b:?}"),
                    });
                }
                _ => {}
            }
            batches.extend(part);
        }
        let schema = schema.ok_or_else(|| Error::Schema {
            what: "tickets".into(),
            detail: "no ticket returned a schema".into(),
        })?;
        Ok((schema, batches))
    }
}
