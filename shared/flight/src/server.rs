//! The Flight face of a layer service: it serves its own layer of the lake.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
    encode::FlightDataEncoderBuilder, error::FlightError, flight_service_server::FlightService,
    flight_service_server::FlightServiceServer,
};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use medallion_lake::{Lake, TableSnapshot};
use medallion_spec::Layer;
use tonic::{Request, Response, Status, Streaming};

use crate::keys::{ChangedKeys, KeySet};
use crate::{MAX_FLIGHT_MESSAGE_BYTES, TableTicket};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Rows per record batch read from a data file and sent over Flight.
const READ_BATCH_ROWS: usize = 64 * 1024;

/// Serves `DoGet`, `GetFlightInfo`, `GetSchema` and `ListFlights` for one layer of the lake.
#[derive(Clone)]
pub struct LayerFlightService {
    lake: Lake,
    layers: Vec<Layer>,
}

impl LayerFlightService {
    /// Serves `layers` (a layer service's own layer, plus quarantine for the refiner).
    pub fn new(lake: Lake, layers: Vec<Layer>) -> Self {
        LayerFlightService { lake, layers }
    }

    pub fn into_server(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    fn check_layer(&self, layer: Layer) -> Result<(), Status> {
        if self.layers.contains(&layer) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "this service serves {:?}, not {layer}; ask the {layer} layer's service",
                self.layers.iter().map(|l| l.as_str()).collect::<Vec<_>>()
            )))
        }
    }

    async fn snapshot(
        &self,
        layer: Layer,
        table: &str,
        version: Option<i64>,
    ) -> Result<TableSnapshot, Status> {
        self.check_layer(layer)?;
        match self.lake.snapshot(layer, table, version).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(Status::not_found(format!(
                "table {layer}.{table} does not exist"
            ))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    /// Parses a descriptor path `[layer, table]` or `[layer, table, version]` (or `layer.table`).
    fn parse_path(descriptor: &FlightDescriptor) -> Result<(Layer, String, Option<i64>), Status> {
        let mut parts: Vec<String> = descriptor.path.clone();
        if parts.len() == 1
            && let Some((l, t)) = parts[0].clone().split_once('.')
        {
            parts = vec![l.to_string(), t.to_string()];
        }
        let bad = || {
            Status::invalid_argument(
                "descriptor path must be [layer, table] or [layer, table, version]",
            )
        };
        if parts.len() < 2 || parts.len() > 3 {
            return Err(bad());
        }
        let layer: Layer = parts[0].parse().map_err(Status::invalid_argument)?;
        let version = match parts.get(2) {
            Some(v) => Some(v.parse::<i64>().map_err(|_| bad())?),
            None => None,
        };
        Ok((layer, parts[1].clone(), version))
    }

    /// Serves a `changed_keys` ticket: compares the files one version dropped with the files
    /// the other added (a rewrite of touched buckets, say) and returns the changed groups.
    async fn changed_keys(
        &self,
        ticket: &TableTicket,
        newer: &TableSnapshot,
        columns: &[String],
    ) -> Result<RecordBatch, Status> {
        let Some(since) = ticket.since else {
            return Err(Status::invalid_argument(
                "a changed_keys ticket needs `since`, the older version",
            ));
        };
        let older = self
            .snapshot(ticket.layer, &ticket.table, Some(since))
            .await?;
        let what = format!(
            "{}.{} versions {since} and {}",
            ticket.layer, ticket.table, newer.version
        );
        if older.schema.fields() != newer.schema.fields() {
            return Err(Status::failed_precondition(format!(
                "{what} have different schemas"
            )));
        }
        let dropped = older.files_added_since(newer);
        let added = newer.files_added_since(&older);
        // Files dropped and added beyond the table's own size (a rewrite of most of it):
        // comparing them costs more than recomputing from the whole table. The dropped rows
        // are held in memory, so this also bounds that.
        let differing: i64 = dropped.iter().chain(&added).map(|f| f.size).sum();
        if differing > newer.total_bytes() {
            return Err(Status::failed_precondition(format!(
                "{what} differ in {differing} bytes of files, more than the table's {}",
                newer.total_bytes()
            )));
        }
        let internal = |e: &dyn std::fmt::Display| Status::internal(format!("{what}: {e}"));
        let mut changed =
            ChangedKeys::new(newer.schema.clone(), columns).map_err(|e| internal(&e))?;
        for file in &dropped {
            let mut batches = self.lake.read_file(&older, file, READ_BATCH_ROWS);
            while let Some(batch) = batches.next().await {
                let batch = batch.map_err(|e| internal(&e))?;
                changed.add_older(&batch).map_err(|e| internal(&e))?;
            }
        }
        for file in &added {
            let mut batches = self.lake.read_file(newer, file, READ_BATCH_ROWS);
            while let Some(batch) = batches.next().await {
                let batch = batch.map_err(|e| internal(&e))?;
                changed.add_newer(&batch).map_err(|e| internal(&e))?;
            }
        }
        let keys = changed.finish().map_err(|e| internal(&e))?;
        tracing::debug!(table = %ticket.table, since, version = newer.version, dropped = dropped.len(), added = added.len(), groups = keys.num_rows(), "changed keys");
        Ok(keys)
    }

    fn flight_info(snapshot: &TableSnapshot) -> Result<FlightInfo, Status> {
        let mut info = FlightInfo::new()
            .try_with_schema(&snapshot.schema)
            .map_err(|e| Status::internal(format!("encoding schema: {e}")))?
            .with_descriptor(FlightDescriptor::new_path(vec![
                snapshot.layer.to_string(),
                snapshot.table.clone(),
                snapshot.version.to_string(),
            ]))
            .with_total_bytes(snapshot.total_bytes())
            .with_total_records(snapshot.total_rows().unwrap_or(-1));
        for ticket in TableTicket::for_snapshot(snapshot) {
            info =
                info.with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket.encode())));
        }
        Ok(info)
    }
}

#[tonic::async_trait]
impl FlightService for LayerFlightService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("no handshake needed"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let mut infos = Vec::new();
        for layer in &self.layers {
            let tables = self
                .lake
                .list_tables(*layer)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            for table in tables {
                if let Ok(Some(snapshot)) = self.lake.snapshot(*layer, &table, None).await {
                    infos.push(Self::flight_info(&snapshot));
                }
            }
        }
        Ok(Response::new(stream::iter(infos).boxed()))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (layer, table, version) = Self::parse_path(request.get_ref())?;
        let snapshot = self.snapshot(layer, &table, version).await?;
        Ok(Response::new(Self::flight_info(&snapshot)?))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("use GetFlightInfo"))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let (layer, table, version) = Self::parse_path(request.get_ref())?;
        let snapshot = self.snapshot(layer, &table, version).await?;
        let options = IpcWriteOptions::default();
        let result: SchemaResult = SchemaAsIpc::new(&snapshot.schema, &options)
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = TableTicket::decode(&request.get_ref().ticket)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let snapshot = self
            .snapshot(ticket.layer, &ticket.table, Some(ticket.version))
            .await?;
        if let Some(columns) = ticket.changed_keys.clone() {
            let indices = columns
                .iter()
                .map(|c| {
                    snapshot.schema.index_of(c).map_err(|_| {
                        Status::invalid_argument(format!(
                            "{}.{} has no column {c}",
                            ticket.layer, ticket.table
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let key_schema = Arc::new(
                snapshot
                    .schema
                    .project(&indices)
                    .map_err(|e| Status::internal(e.to_string()))?,
            );
            // The comparison runs as the response streams, so the headers go out at once
            // however long it takes.
            let service = self.clone();
            let keys = stream::once(async move {
                service
                    .changed_keys(&ticket, &snapshot, &columns)
                    .await
                    .map_err(FlightError::from)
            });
            let encoded = FlightDataEncoderBuilder::new()
                .with_schema(key_schema)
                .with_max_flight_data_size(MAX_FLIGHT_MESSAGE_BYTES)
                .build(keys)
                .map_err(Status::from);
            return Ok(Response::new(encoded.boxed()));
        }
        let candidates = match ticket.since {
            Some(since) if since >= 0 => {
                let older = self
                    .snapshot(ticket.layer, &ticket.table, Some(since))
                    .await?;
                snapshot.files_added_since(&older)
            }
            _ => snapshot.files.clone(),
        };
        let files: Vec<_> = match ticket.partition {
            None => candidates,
            Some(i) => vec![candidates.get(i).cloned().ok_or_else(|| {
                Status::not_found(format!(
                    "{}.{} version {} has {} partitions, not {}",
                    ticket.layer,
                    ticket.table,
                    ticket.version,
                    candidates.len(),
                    i + 1
                ))
            })?],
        };
        tracing::debug!(table = %ticket.table, version = ticket.version, files = files.len(), "DoGet");
        let lake = self.lake.clone();
        let columns = ticket.columns.clone();
        let schema = match &columns {
            Some(c) => snapshot.projected_schema(c),
            None => snapshot.schema.clone(),
        };
        let key_set = match &ticket.rows_in {
            Some(filter) => Some(Arc::new(
                KeySet::new(filter, &schema)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )),
            None => None,
        };
        // One file at a time, batch by batch: memory stays bounded by a few batches.
        let batches = stream::iter(files)
            .map(move |file| match &columns {
                Some(c) => lake.read_file_columns(&snapshot, &file, READ_BATCH_ROWS, c),
                None => lake.read_file(&snapshot, &file, READ_BATCH_ROWS),
            })
            .flatten()
            .map_err(|e| FlightError::ExternalError(Box::new(e)))
            .and_then(move |batch| {
                let filtered = match &key_set {
                    Some(keys) => keys.filter(&batch).map_err(FlightError::from),
                    None => Ok(batch),
                };
                futures::future::ready(filtered)
            });
        let encoded = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_max_flight_data_size(MAX_FLIGHT_MESSAGE_BYTES)
            .build(batches)
            .map_err(Status::from);
        // Counted as the messages leave, so the rate of this counter is Flight bytes/s.
        let sent = medallion_telemetry::metrics::metrics()
            .flight_sent_bytes
            .get_or_create_owned(&medallion_telemetry::metrics::table(
                ticket.layer,
                &ticket.table,
            ));
        let counted = encoded.inspect_ok(move |data| {
            sent.inc_by((data.data_header.len() + data.data_body.len()) as u64);
        });
        Ok(Response::new(counted.boxed()))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented(
            "layers are written only by their own service's tasks",
        ))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("not supported"))
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(Status::unimplemented("no actions"))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(stream::empty().boxed()))
    }
}
