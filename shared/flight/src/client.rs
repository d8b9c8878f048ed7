//! Reading a layer over Flight from whichever replica the endpoint reaches.

use arrow::{datatypes::SchemaRef, record_batch::RecordBatch};
use arrow_flight::{FlightClient, Ticket};
use futures::{StreamExt, stream::BoxStream};
use medallion_server::REPLICA_WAIT;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::Instrument;

/// Partitions of one table read at once.
const PARALLEL_PARTITIONS: usize = 4;
/// Batches a partition being read ahead may buffer before its stream waits.
const BATCHES_AHEAD_PER_PARTITION: usize = 8;

/// Stops a partition's fetch when the reader gives up early (error or cancellation).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

use crate::{Error, Result, TableTicket};

/// Reads tables from one layer service's Flight face.
#[derive(Clone)]
pub struct FlightReader {
    endpoint: String,
    channel: Channel,
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

    /// Streams one ticket's batches into `tx`; returns the schema the stream announced.
    async fn send_one(
        &self,
        ticket: &TableTicket,
        tx: mpsc::Sender<RecordBatch>,
    ) -> Result<Option<SchemaRef>> {
        let what = format!("{}.{}@{}", ticket.layer, ticket.table, ticket.version);
        let error = |source| Error::Read {
            endpoint: self.endpoint.clone(),
            what: what.clone(),
            source,
        };
        let mut client = self.client();
        medallion_telemetry::inject_context(client.metadata_mut());
        // A balanced channel holds calls while no replica is healthy: bound the wait.
        let mut stream =
            tokio::time::timeout(REPLICA_WAIT, client.do_get(Ticket::new(ticket.encode())))
                .await
                .map_err(|_| Error::NoReplica {
                    endpoint: self.endpoint.clone(),
                    waited_secs: REPLICA_WAIT.as_secs(),
                })?
                .map_err(error)?;
        let received = medallion_telemetry::metrics::metrics()
            .flight_received_bytes
            .get_or_create_owned(&medallion_telemetry::metrics::table(
                ticket.layer,
                &ticket.table,
            ));
        let (mut rows, mut bytes) = (0u64, 0u64);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(error)?;
            rows += batch.num_rows() as u64;
            bytes += batch.get_array_memory_size() as u64;
            received.inc_by(batch.get_array_memory_size() as u64);
            if tx.send(batch).await.is_err() {
                break; // the consumer has stopped
            }
        }
        let span = tracing::Span::current();
        span.record("rows", rows);
        span.record("bytes", bytes);
        Ok(stream.schema().cloned())
    }

    /// Streams every batch of `tickets` in ticket order while a few partitions ahead are
    /// already being fetched (so decoding on the serving side runs in parallel). Memory stays
    /// bounded: each partition ahead buffers at most a few batches.
    pub fn stream(&self, tickets: &[TableTicket]) -> BatchStream {
        let reader = self.clone();
        // Each partition is fetched by its own task into a small channel; `buffered` starts
        // the next ones as soon as the consumer moves past the first.
        let partitions = futures::stream::iter(tickets.to_vec())
            .map(move |ticket| {
                let reader = reader.clone();
                let (tx, rx) = mpsc::channel(BATCHES_AHEAD_PER_PARTITION);
                let span = tracing::info_span!(
                    "flight.do_get",
                    otel.kind = "client",
                    table = %format!("{}.{}", ticket.layer, ticket.table),
                    version = ticket.version,
                    partition = ticket.partition,
                    rows = tracing::field::Empty,
                    bytes = tracing::field::Empty,
                );
                let task = tokio::spawn(
                    async move { reader.send_one(&ticket, tx).await }.instrument(span),
                );
                futures::future::ready((rx, AbortOnDrop(task)))
            })
            .buffered(PARALLEL_PARTITIONS)
            .boxed();
        BatchStream {
            partitions,
            current: None,
            schema: None,
            what: tickets
                .first()
                .map(|t| format!("{}.{}", t.layer, t.table))
                .unwrap_or_else(|| "tickets".into()),
        }
    }

    /// Reads every ticket into memory (batches in ticket order); the schema comes even
    /// without rows.
    pub async fn read_all(&self, tickets: &[TableTicket]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let mut stream = self.stream(tickets);
        let mut batches = Vec::new();
        while let Some(batch) = stream.next_batch().await? {
            batches.push(batch);
        }
        Ok((stream.schema()?, batches))
    }
}

type Partition = (
    mpsc::Receiver<RecordBatch>,
    AbortOnDrop<Result<Option<SchemaRef>>>,
);

/// The batches of several tickets in ticket order; see [`FlightReader::stream`].
pub struct BatchStream {
    partitions: BoxStream<'static, Partition>,
    current: Option<Partition>,
    schema: Option<SchemaRef>,
    what: String,
}

impl BatchStream {
    /// The next batch, or `None` after the last ticket's last batch.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if let Some((rx, task)) = &mut self.current {
                if let Some(batch) = rx.recv().await {
                    return Ok(Some(batch));
                }
                let got = (&mut task.0)
                    .await
                    .map_err(|e| Error::Task(e.to_string()))??;
                self.current = None;
                match (&self.schema, got) {
                    (None, Some(s)) => self.schema = Some(s),
                    (Some(a), Some(b)) if a.fields() != b.fields() => {
                        return Err(Error::Schema {
                            what: self.what.clone(),
                            detail: format!("{a:?} vs {b:?}"),
                        });
                    }
                    _ => {}
                }
            }
            match self.partitions.next().await {
                Some(partition) => self.current = Some(partition),
                None => return Ok(None),
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
