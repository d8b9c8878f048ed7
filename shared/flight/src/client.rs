//! Reading a layer over Flight from whichever replica the endpoint reaches.

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use arrow_flight::{FlightClient, Ticket, decode::FlightRecordBatchStream};
use futures::{StreamExt, stream::BoxStream};
use medallion_server::REPLICA_WAIT;
use medallion_telemetry::metrics;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::{Error, Result, TableTicket};

/// Partitions of one table read at once.
const PARALLEL_PARTITIONS: usize = 4;

/// Reads tables from one layer service's Flight face.
#[derive(Clone)]
pub struct FlightReader {
    endpoint: String,
    channel: Channel,
}

/// What one partition's stream yields: its batches, then the schema it announced.
enum Piece {
    Batch(RecordBatch),
    End(Option<SchemaRef>),
}

/// Where a partition's read is.
enum Partition {
    Start(FlightReader, TableTicket),
    Reading(Box<Reading>),
    Done,
}

struct Reading {
    stream: FlightRecordBatchStream,
    what: String,
    endpoint: String,
    received: prometheus_client::metrics::counter::Counter,
    span: tracing::Span,
    rows: u64,
    bytes: u64,
}

impl FlightReader {
    /// A reader over an existing channel; `endpoint` names it in errors.
    pub fn new(channel: Channel, endpoint: &str) -> Self {
        FlightReader {
            endpoint: endpoint.to_string(),
            channel,
        }
    }

    fn client(&self) -> FlightClient {
        let inner =
            arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024);
        FlightClient::new_from_inner(inner)
    }

    /// Starts one ticket's DoGet.
    async fn open(&self, ticket: &TableTicket, span: tracing::Span) -> Result<Reading> {
        let what = format!("{}.{}@{}", ticket.layer, ticket.table, ticket.version);
        let mut client = self.client();
        {
            let _entered = span.enter();
            medallion_telemetry::inject_context(client.metadata_mut());
        }
        // A balanced channel holds calls while no replica is healthy: bound the wait.
        let stream =
            tokio::time::timeout(REPLICA_WAIT, client.do_get(Ticket::new(ticket.encode())))
                .instrument(span.clone())
                .await
                .map_err(|_| Error::NoReplica {
                    endpoint: self.endpoint.clone(),
                    waited_secs: REPLICA_WAIT.as_secs(),
                })?
                .map_err(|source| Error::Read {
                    endpoint: self.endpoint.clone(),
                    what: what.clone(),
                    source,
                })?;
        let received = metrics::metrics()
            .flight_received_bytes
            .get_or_create_owned(&metrics::table(ticket.layer, &ticket.table));
        Ok(Reading {
            stream,
            what,
            endpoint: self.endpoint.clone(),
            received,
            span,
            rows: 0,
            bytes: 0,
        })
    }

    /// One partition as a stream of pieces, in its own order.
    fn partition(&self, ticket: TableTicket) -> BoxStream<'static, Result<Piece>> {
        futures::stream::unfold(Partition::Start(self.clone(), ticket), |state| async move {
            let mut reading = match state {
                Partition::Done => return None,
                Partition::Start(reader, ticket) => {
                    let span = tracing::info_span!(
                        "flight.do_get",
                        otel.kind = "client",
                        table = %format!("{}.{}", ticket.layer, ticket.table),
                        version = ticket.version,
                        partition = ticket.partition,
                        rows = tracing::field::Empty,
                        bytes = tracing::field::Empty,
                    );
                    match reader.open(&ticket, span).await {
                        Ok(reading) => Box::new(reading),
                        Err(e) => return Some((Err(e), Partition::Done)),
                    }
                }
                Partition::Reading(reading) => reading,
            };
            match reading.stream.next().await {
                Some(Ok(batch)) => {
                    let size = crate::batch_bytes(&batch);
                    reading.rows += batch.num_rows() as u64;
                    reading.bytes += size;
                    reading.received.inc_by(size);
                    Some((Ok(Piece::Batch(batch)), Partition::Reading(reading)))
                }
                Some(Err(source)) => Some((
                    Err(Error::Read {
                        endpoint: reading.endpoint.clone(),
                        what: reading.what.clone(),
                        source,
                    }),
                    Partition::Done,
                )),
                None => {
                    reading.span.record("rows", reading.rows);
                    reading.span.record("bytes", reading.bytes);
                    let schema = reading.stream.schema().cloned();
                    Some((Ok(Piece::End(schema)), Partition::Done))
                }
            }
        })
        .boxed()
    }

    /// Streams every batch of `tickets`, reading a few partitions at once and taking batches
    /// from whichever has one: each partition's batches stay in order, partitions interleave.
    /// Every open stream is drained as fast as the consumer goes, so the HTTP/2 windows bound
    /// what is buffered (a stream left unread would hold the connection's window and stall
    /// the others).
    pub fn stream(&self, tickets: &[TableTicket]) -> BatchStream {
        let reader = self.clone();
        let pieces = futures::stream::iter(tickets.to_vec())
            .map(move |ticket| reader.partition(ticket))
            .flatten_unordered(PARALLEL_PARTITIONS)
            .boxed();
        BatchStream {
            pieces,
            schema: None,
            what: tickets
                .first()
                .map(|t| format!("{}.{}", t.layer, t.table))
                .unwrap_or_else(|| "tickets".into()),
        }
    }

    /// Reads every ticket into memory; the schema comes even without rows.
    pub async fn read_all(&self, tickets: &[TableTicket]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let mut stream = self.stream(tickets);
        let mut batches = Vec::new();
        while let Some(batch) = stream.next_batch().await? {
            batches.push(batch);
        }
        Ok((stream.schema()?, batches))
    }
}

/// The batches of several tickets; see [`FlightReader::stream`].
pub struct BatchStream {
    pieces: BoxStream<'static, Result<Piece>>,
    schema: Option<SchemaRef>,
    what: String,
}

impl BatchStream {
    /// The next batch, or `None` after the last partition's last batch.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            match self.pieces.next().await.transpose()? {
                None => return Ok(None),
                Some(Piece::Batch(batch)) => return Ok(Some(batch)),
                Some(Piece::End(got)) => match (&self.schema, got) {
                    (None, Some(s)) => self.schema = Some(s),
                    (Some(a), Some(b)) if a.fields() != b.fields() => {
                        return Err(Error::Schema {
                            what: self.what.clone(),
                            detail: format!("{a:?} vs {b:?}"),
                        });
                    }
                    _ => {}
                },
            }
        }
    }

    /// The tables' schema, known once the stream has ended (it arrives even without rows).
    pub fn schema(&self) -> Result<SchemaRef> {
        self.schema.clone().ok_or_else(|| Error::Schema {
            what: self.what.clone(),
            detail: "no ticket returned a schema".into(),
        })
    }
}
