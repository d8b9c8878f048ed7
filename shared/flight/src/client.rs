//! Reading a layer over Flight from whichever replica the endpoint reaches.

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use arrow_flight::{FlightClient, Ticket};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::transport::{Channel, Endpoint};

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

    /// Streams the batches of one ticket.
    pub async fn stream(
        &self,
        ticket: &TableTicket,
    ) -> Result<impl Stream<Item = Result<RecordBatch>> + Send + 'static> {
        let what = format!("{}.{}@{}", ticket.layer, ticket.table, ticket.version);
        let endpoint = self.endpoint.clone();
        let err = {
            let (endpoint, what) = (endpoint.clone(), what.clone());
            move |source| Error::Read {
                endpoint: endpoint.clone(),
                what: what.clone(),
                source,
            }
        };
        let stream = self
            .client()
            .do_get(Ticket::new(ticket.encode()))
            .await
            .map_err(err.clone())?;
        Ok(stream.map_err(err))
    }

    /// Reads every ticket (in order) into memory, with the schema even when there are no rows.
    pub async fn read_all(&self, tickets: &[TableTicket]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let mut schema: Option<SchemaRef> = None;
        let mut batches = Vec::new();
        for ticket in tickets {
            let what = format!("{}.{}@{}", ticket.layer, ticket.table, ticket.version);
            let mut client = self.client();
            let mut stream =
                client
                    .do_get(Ticket::new(ticket.encode()))
                    .await
                    .map_err(|source| Error::Read {
                        endpoint: self.endpoint.clone(),
                        what: what.clone(),
                        source,
                    })?;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|source| Error::Read {
                    endpoint: self.endpoint.clone(),
                    what: what.clone(),
                    source,
                })?;
                batches.push(batch);
            }
            let got = stream.schema().cloned();
            match (&schema, got) {
                (None, Some(s)) => schema = Some(s),
                (Some(a), Some(b)) if a.fields() != b.fields() => {
                    return Err(Error::Schema {
                        what,
                        detail: format!("{a:?} vs {b:?}"),
                    });
                }
                _ => {}
            }
        }
        let schema = schema.ok_or_else(|| Error::Schema {
            what: "tickets".into(),
            detail: "no ticket returned a schema".into(),
        })?;
        Ok((schema, batches))
    }
}
