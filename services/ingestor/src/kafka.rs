//! The `kafka-debezium` source: reads Debezium change events from Kafka topics into the bronze
//! change table, exactly once.
//!
//! Offsets live in bronze, not in Kafka: every commit records, as Delta application
//! transactions (`kafka:<topic>:<partition>` = last offset), where each partition's rows end,
//! in the same commit as the rows. Ingestor replicas read a source as members of one consumer
//! group ([`crate::group`]), each starting its partitions just after the committed offsets; a
//! crash loses only the micro-batch in flight, which the partition's next reader reads again.
//! A full refresh resets the table and every offset ([`reset`]); the members read it all again.
//!
//! Malformed messages are not lost: they become rows with `_error` and the raw `_value`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use medallion_lake::{CommitOutcome, CommitSpec, Lake, WriteMode};
use medallion_spec::{KafkaSourceSpec, Layer, ROW_SCHEMA};
use medallion_stage::{Manifest, TaskError, TaskRequest};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::debezium::{self, Event};

/// Bronze change table columns.
pub fn change_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("op", DataType::Utf8, true),
        Field::new("key", DataType::Utf8, true),
        Field::new("sequence", DataType::Utf8, true),
        Field::new("before", DataType::Utf8, true),
        Field::new("after", DataType::Utf8, true),
        Field::new(ROW_SCHEMA, DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("ts_ms", DataType::Int64, true),
        Field::new("_topic", DataType::Utf8, false),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("_kafka_timestamp", ts.clone(), true),
        Field::new("_error", DataType::Utf8, true),
        Field::new("_value", DataType::Binary, true),
        Field::new("_ingested_at", ts, false),
        Field::new("_run_id", DataType::Utf8, false),
    ]))
}

/// How long a task waits for its first message before deciding the topics hold nothing new.
pub(crate) const FIRST_WAIT: Duration = Duration::from_secs(5);

pub(crate) fn app_id(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}:{partition}")
}

/// Rows of one micro-batch, column by column.
pub(crate) struct BatchBuilder {
    op: StringBuilder,
    key: StringBuilder,
    sequence: StringBuilder,
    before: StringBuilder,
    after: StringBuilder,
    row_schema: StringBuilder,
    /// The last envelope schema seen and the row schema found in it: consecutive messages
    /// almost always repeat it, so comparing the text saves parsing it again.
    schema_seen: Option<(String, Option<String>)>,
    /// The row schema last written into this batch.
    row_schema_written: Option<String>,
    source: StringBuilder,
    ts_ms: Int64Builder,
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    kafka_ts: TimestampMicrosecondBuilder,
    error: StringBuilder,
    value: BinaryBuilder,
    pub rows: usize,
    /// Last offset per (topic, partition) in this batch, tombstones included.
    pub last: BTreeMap<String, BTreeMap<i32, i64>>,
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        BatchBuilder {
            op: StringBuilder::new(),
            key: StringBuilder::new(),
            sequence: StringBuilder::new(),
            before: StringBuilder::new(),
            after: StringBuilder::new(),
            row_schema: StringBuilder::new(),
            schema_seen: None,
            row_schema_written: None,
            source: StringBuilder::new(),
            ts_ms: Int64Builder::new(),
            topic: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            kafka_ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            error: StringBuilder::new(),
            value: BinaryBuilder::new(),
            rows: 0,
            last: BTreeMap::new(),
        }
    }

    pub fn push<M: Message>(&mut self, message: &M, options: &debezium::Options) {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        // The topic's name is copied once per batch, not per message.
        match self.last.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, offset);
            }
            None => {
                self.last
                    .insert(topic.to_string(), BTreeMap::from([(partition, offset)]));
            }
        }
        let parsed = debezium::parse(message.key(), message.payload(), options);
        let change = match parsed {
            Ok(Event::Tombstone) => return,
            Ok(Event::Change(change)) => Some(change),
            Err(error) => {
                self.error.append_value(error);
                self.value.append_option(message.payload());
                None
            }
        };
        match &change {
            Some(c) => {
                self.op.append_value(c.op.as_str());
                self.key.append_value(&c.key);
                self.sequence.append_value(&c.sequence);
                self.before.append_option(c.before);
                self.after.append_option(c.after);
                self.push_row_schema(c.schema);
                self.source.append_option(c.source);
                self.ts_ms.append_option(c.ts_ms);
                self.error.append_null();
                self.value.append_null();
            }
            None => {
                for b in [
                    &mut self.op,
                    &mut self.key,
                    &mut self.sequence,
                    &mut self.before,
                    &mut self.after,
                    &mut self.row_schema,
                    &mut self.source,
                ] {
                    b.append_null();
                }
                self.ts_ms.append_null();
            }
        }
        self.topic.append_value(topic);
        self.partition.append_value(partition);
        self.offset.append_value(offset);
        self.kafka_ts.append_option(
            message
                .timestamp()
                .to_millis()
                .map(|ms| ms.saturating_mul(1000)),
        );
        self.rows += 1;
    }

    /// Records the row schema of a message's envelope schema where it differs from the last
    /// one written into the batch (null elsewhere: readers need it once, not per row).
    fn push_row_schema(&mut self, schema: Option<&str>) {
        let Some(schema) = schema else {
            self.row_schema.append_null();
            return;
        };
        if !matches!(&self.schema_seen, Some((seen, _)) if seen == schema) {
            self.schema_seen = Some((schema.to_string(), debezium::row_fields(schema)));
        }
        let fields = self.schema_seen.as_ref().and_then(|(_, f)| f.as_deref());
        match fields {
            Some(fields) if self.row_schema_written.as_deref() != Some(fields) => {
                self.row_schema.append_value(fields);
                self.row_schema_written = Some(fields.to_string());
            }
            _ => self.row_schema.append_null(),
        }
    }

    fn finish(&mut self, ingested_at_us: i64, run_id: &str) -> Result<RecordBatch, TaskError> {
        let n = self.rows;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.op.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.sequence.finish()),
            Arc::new(self.before.finish()),
            Arc::new(self.after.finish()),
            Arc::new(self.row_schema.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.ts_ms.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.kafka_ts.finish()),
            Arc::new(self.error.finish()),
            Arc::new(self.value.finish()),
            Arc::new(
                arrow::array::TimestampMicrosecondArray::from_value(ingested_at_us, n)
                    .with_timezone("UTC"),
            ),
            Arc::new(arrow::array::StringArray::from_iter_values(
                std::iter::repeat_n(run_id, n),
            )),
        ];
        self.rows = 0;
        self.row_schema_written = None;
        RecordBatch::try_new(change_schema(), columns).map_err(TaskError::internal)
    }
}

/// What a commit records about the run it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct CommitTag {
    pub run_id: String,
    pub pipeline: String,
    pub table: String,
}

impl CommitTag {
    pub fn of(task: &TaskRequest) -> CommitTag {
        CommitTag {
            run_id: task.run_id.clone(),
            pipeline: task.pipeline.spec.name.clone(),
            table: task.table.to_string(),
        }
    }
}

/// The librdkafka settings of a source: ours, then the spec's pass-through settings.
pub(crate) fn client_config(
    task: &TaskRequest,
    name: &str,
    kafka: &KafkaSourceSpec,
) -> Result<ClientConfig, TaskError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", group_id(task, name, kafka))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    for (key, value) in &kafka.settings {
        let value = crate::env::expand(&format!("kafka.settings.{key}"), value)
            .map_err(TaskError::Invalid)?;
        config.set(key, value);
    }
    Ok(config)
}

/// The consumer group of a source's readers: the spec's, else one per pipeline source.
pub(crate) fn group_id(task: &TaskRequest, name: &str, kafka: &KafkaSourceSpec) -> String {
    kafka
        .group
        .clone()
        .unwrap_or_else(|| format!("medallion-{}-{name}", task.pipeline.spec.name))
}

/// Whether an existing change table predates `row_schema`: appends must keep its schema (until
/// a full refresh rewrites it).
pub(crate) fn is_legacy(snapshot: Option<&medallion_lake::TableSnapshot>) -> bool {
    snapshot.is_some_and(|s| s.schema.field_with_name(ROW_SCHEMA).is_err())
}

/// A full refresh of a Kafka source: one commit empties the change table and sets every
/// partition's offset to "nothing read" (-1). It is keyed by the run (`kafka:<source>:refresh` =
/// the run's sequence), so the calls of one refresh on several replicas reset the table once.
/// The members of the consumer group notice the new refresh and read their partitions again
/// from the beginning; each replica's task then waits for its member to catch up.
/// Returns whether this call made the reset (another replica's call may have).
pub async fn reset(
    lake: &Lake,
    task: &TaskRequest,
    name: &str,
    kafka: &KafkaSourceSpec,
) -> Result<bool, TaskError> {
    let probe: BaseConsumer = client_config(task, name, kafka)?
        .create()
        .map_err(|e| TaskError::Invalid(format!("source `{name}`: Kafka client: {e}")))?;
    let partitions = topic_partitions(Arc::new(probe), name, kafka).await?;
    let mut txns = vec![(refresh_app_id(name), refresh_epoch(task))];
    txns.extend(partitions.iter().map(|(t, p)| (app_id(t, *p), -1)));
    // A member's commit landing at the same moment conflicts on the partitions' app ids; the
    // reset is idempotent (keyed by the run), so it simply tries again.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let writer = lake
            .writer(Layer::Bronze, name, change_schema())
            .await
            .map_err(TaskError::internal)?;
        let spec = commit_spec(&CommitTag::of(task), WriteMode::Overwrite, txns.clone());
        match writer.commit(spec).await {
            Ok(outcome) => {
                tracing::info!(source = name, ?outcome, "bronze reset for a full refresh");
                return Ok(matches!(outcome, CommitOutcome::Committed { .. }));
            }
            Err(e) if attempt < RESET_ATTEMPTS => {
                tracing::warn!(source = name, error = %e, "resetting bronze; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(TaskError::internal(e)),
        }
    }
}

/// Attempts at a full refresh's reset commit before the task fails.
const RESET_ATTEMPTS: u32 = 5;

/// The application transaction that records a source's last full refresh.
pub(crate) fn refresh_app_id(name: &str) -> String {
    format!("kafka:{name}:refresh")
}

/// The refresh epoch a full-refresh task resets bronze to: its run's sequence, which only grows.
pub(crate) fn refresh_epoch(task: &TaskRequest) -> i64 {
    i64::try_from(task.run_sequence).unwrap_or(i64::MAX)
}

/// Every partition of the source's topics; a topic the brokers do not know is an error.
pub(crate) async fn topic_partitions<C: Consumer + Send + Sync + 'static>(
    consumer: Arc<C>,
    name: &str,
    kafka: &KafkaSourceSpec,
) -> Result<Vec<(String, i32)>, TaskError> {
    let mut partitions = Vec::new();
    for topic in &kafka.topics {
        let (c, t) = (consumer.clone(), topic.clone());
        let metadata = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(10))
        })
        .await
        .map_err(TaskError::internal)?
        .map_err(|e| {
            TaskError::Invalid(format!(
                "source `{name}`: topic `{topic}` at {}: {e}",
                kafka.brokers
            ))
        })?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if ids.is_empty() {
            return Err(TaskError::Invalid(format!(
                "source `{name}`: topic `{topic}` has no partitions at {} (does it exist?)",
                kafka.brokers
            )));
        }
        partitions.extend(ids.into_iter().map(|p| (topic.clone(), p)));
    }
    Ok(partitions)
}

/// Commits an empty change table (nothing read yet), so the tables downstream have an input.
pub(crate) async fn create_empty(
    lake: &Lake,
    task: &TaskRequest,
    name: &str,
    mode: WriteMode,
) -> Result<Manifest, TaskError> {
    let writer = lake
        .writer(Layer::Bronze, name, change_schema())
        .await
        .map_err(TaskError::internal)?;
    let spec = commit_spec(
        &CommitTag::of(task),
        mode,
        vec![(format!("kafka:{name}"), 0)],
    );
    let outcome = writer.commit(spec).await.map_err(TaskError::internal)?;
    Manifest::after_commit(lake, &task.table, &outcome).await
}

/// Messages the assigned partitions hold beyond what the consumer has read (high watermark
/// minus next offset, summed); `None` if the broker cannot say.
pub(crate) async fn source_lag<C: Consumer + Send + Sync + 'static>(
    consumer: Arc<C>,
    assignment: TopicPartitionList,
) -> Option<u64> {
    tokio::task::spawn_blocking(move || {
        // A client with no assignment of its own counts from the given offsets.
        let position = consumer.position().unwrap_or_default();
        let mut lag = 0u64;
        for start in assignment.elements() {
            let (topic, partition) = (start.topic(), start.partition());
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(5))
                .ok()?;
            let read = position
                .find_partition(topic, partition)
                .map(|p| p.offset());
            let next = match (read, start.offset()) {
                (Some(Offset::Offset(n)), _) | (_, Offset::Offset(n)) => n,
                _ => low,
            };
            lag += u64::try_from(high - next.max(low)).unwrap_or(0);
        }
        Some(lag)
    })
    .await
    .ok()
    .flatten()
}

fn commit_spec(tag: &CommitTag, mode: WriteMode, mut txns: Vec<(String, i64)>) -> CommitSpec {
    let (app_id, txn_version) = if txns.is_empty() {
        (format!("kafka:{}", tag.table), 0)
    } else {
        txns.remove(0)
    };
    let mut metadata = serde_json::Map::new();
    metadata.insert("run_id".into(), tag.run_id.clone().into());
    metadata.insert("pipeline".into(), tag.pipeline.clone().into());
    metadata.insert("table".into(), tag.table.clone().into());
    CommitSpec {
        mode,
        app_id,
        txn_version,
        metadata,
        more_transactions: txns,
        expect_transactions: Vec::new(),
    }
}

/// What a commit of a member's batch came to.
#[derive(Debug)]
pub(crate) enum Committed {
    Done(CommitOutcome),
    /// Another writer moved these partitions' offsets (a member that took them over, or a full
    /// refresh): nothing was committed.
    Moved(String),
}

/// Commits the batch with the last offset of each partition it read, provided bronze still
/// holds `expected` for those partitions (the offsets the batch continues from). A table from
/// before `row_schema` (`legacy`) gets the rows without it.
pub(crate) async fn commit(
    lake: &Lake,
    tag: &CommitTag,
    name: &str,
    batch: &mut BatchBuilder,
    legacy: bool,
    expected: Vec<(String, Option<i64>)>,
) -> Result<Committed, TaskError> {
    let mut rows = batch.finish(chrono::Utc::now().timestamp_micros(), &tag.run_id)?;
    if legacy {
        let keep: Vec<usize> = (0..rows.num_columns())
            .filter(|&i| rows.schema().field(i).name() != ROW_SCHEMA)
            .collect();
        rows = rows.project(&keep).map_err(TaskError::internal)?;
    }
    let txns: Vec<(String, i64)> = std::mem::take(&mut batch.last)
        .into_iter()
        .flat_map(|(topic, partitions)| {
            partitions
                .into_iter()
                .map(move |(partition, offset)| (app_id(&topic, partition), offset))
        })
        .collect();
    let mut writer = lake
        .writer(Layer::Bronze, name, rows.schema())
        .await
        .map_err(TaskError::internal)?;
    if rows.num_rows() > 0 {
        writer.write(rows).await.map_err(TaskError::internal)?;
    }
    let mut spec = commit_spec(tag, WriteMode::Append, txns);
    spec.expect_transactions = expected;
    match writer.commit(spec).await {
        // The batch's first partition already holds these offsets: someone else wrote them.
        Ok(CommitOutcome::AlreadyCommitted { .. }) => Ok(Committed::Moved(format!(
            "source `{name}`: another reader already committed these offsets"
        ))),
        Ok(outcome) => Ok(Committed::Done(outcome)),
        Err(e @ medallion_lake::Error::TransactionMoved { .. }) => {
            Ok(Committed::Moved(e.to_string()))
        }
        Err(e) => Err(TaskError::internal(e)),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::BaseConsumer;

    /// librdkafka refuses, at creation, settings its build does not support.
    #[test]
    fn the_kafka_client_speaks_tls_and_sasl() {
        for (protocol, mechanism) in [
            ("SSL", None),
            ("SASL_SSL", Some("SCRAM-SHA-512")),
            ("SASL_SSL", Some("PLAIN")),
        ] {
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", "127.0.0.1:1")
                .set("group.id", "medallion-test")
                .set("security.protocol", protocol);
            if let Some(mechanism) = mechanism {
                config
                    .set("sasl.mechanisms", mechanism)
                    .set("sasl.username", "user")
                    .set("sasl.password", "secret");
            }
            let consumer: Result<BaseConsumer, _> = config.create();
            assert!(
                consumer.is_ok(),
                "{protocol} {mechanism:?}: {:?}",
                consumer.err()
            );
        }
    }
}
