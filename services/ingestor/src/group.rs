//! A Kafka source's member of its consumer group on this ingestor replica: a consumer that keeps
//! reading between tasks, so the replicas split the topics' partitions and bronze keeps up with
//! Kafka in micro-batches bounded by size and age.
//!
//! Offsets live in bronze (see [`crate::kafka`]). On every assignment the member reads, from
//! the latest bronze version, where each partition's rows end and starts just after. On a
//! revocation it drops the rows it has not committed: the partition's next owner reads them
//! again from bronze. Every commit names the offsets it continues from
//! (`CommitSpec::expect_transactions`), so a member that lost a partition without noticing (a
//! long stall, a network split) is refused instead of duplicating rows.
//!
//! A bronze task starts the member if it is not running, then waits until the member has
//! caught up (nothing read and uncommitted, no message for `idle_ms`) or `max_task_ms` has
//! passed, and reports the table as it then stands. A member nobody asked for during
//! [`MEMBER_IDLE`] commits what it has and leaves the group.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medallion_lake::{CommitOutcome, Lake};
use medallion_server::CancellationToken;
use medallion_spec::{KafkaSourceSpec, Layer};
use medallion_stage::{Manifest, Progress, TaskError, TaskRequest};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::debezium;
use crate::kafka::{self, BatchBuilder, CommitTag, FIRST_WAIT};

/// A member that no task asked for this long leaves the group.
pub const MEMBER_IDLE: Duration = Duration::from_secs(120);
/// How long stopping a member waits for its loop to end (a commit in flight, leaving the group).
const LEAVE_WAIT: Duration = Duration::from_secs(15);
/// How long a task waits for the group to assign partitions before failing.
const JOIN_WAIT: Duration = Duration::from_secs(60);
/// With no `max_task_ms`, the longest a micro-batch stays uncommitted while messages keep coming.
const BATCH_AGE: Duration = Duration::from_secs(10);
/// Failed commits in a row after which a member stops with the error.
const COMMIT_ATTEMPTS: u32 = 3;
/// How often an idle member checks whether a full refresh reset bronze.
const EPOCH_CHECK: Duration = Duration::from_secs(1);
/// How often a waiting task looks at its member.
const TASK_TICK: Duration = Duration::from_millis(50);

/// The group members of this replica, one per pipeline source.
pub struct Members {
    /// The replica's static group identity (empty: dynamic membership).
    instance: String,
    members: tokio::sync::Mutex<HashMap<String, Running>>,
}

/// Offsets bronze holds per owned partition (topic, then partition; `None`: nothing yet).
type Owned = BTreeMap<String, BTreeMap<i32, Option<i64>>>;

/// What the reading loop, the rebalance callback and waiting tasks share.
struct Member {
    /// The source's settings the member was started with; another spec starts another member.
    fingerprint: String,
    state: Mutex<State>,
    /// When the member started; the clock of `last_message_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` the last message was received (written once per message).
    last_message_ms: AtomicU64,
    /// Whether the loop holds rows (or tombstones) it has not committed.
    pending: AtomicBool,
    /// `State::generation`, readable without the lock (the loop checks it per message).
    generation: AtomicU64,
    /// Bumped whenever a task brings other settings (`State::kafka`) for the loop.
    settings: AtomicU64,
    stop: CancellationToken,
}

struct State {
    owned: Owned,
    /// Bumped on every assignment and revocation.
    generation: u64,
    /// When the partitions were last assigned or repositioned (`None`: not yet, or revoked
    /// since).
    assigned_at: Option<Instant>,
    /// Since when the member has had no assignment (its start, or the last revocation).
    unassigned_since: Instant,
    /// The source's last full refresh when the partitions were last positioned.
    epoch: Option<i64>,
    /// The change table predates `row_schema`.
    legacy: bool,
    /// Rows committed by this member, and its commits.
    committed_rows: u64,
    commits: u64,
    /// `committed_rows` and `commits` when a task last reported them: the next task reports
    /// what was committed since, between tasks included.
    reported: (u64, u64),
    last_outcome: Option<CommitOutcome>,
    /// The run of the task that asked last: its id tags the commits.
    tag: CommitTag,
    /// The source's settings as the last task gave them.
    kafka: KafkaSourceSpec,
    last_asked: Instant,
    /// Why the member stopped, if it failed.
    failed: Option<String>,
    /// The last error librdkafka reported (it retries on its own).
    last_error: Option<String>,
    stopped: bool,
}

impl State {
    /// Takes the positions the partitions were (re)started from.
    fn positioned(&mut self, positions: Positions) {
        if self.epoch != positions.epoch {
            // Rows committed before a full refresh are gone: tasks count from here.
            self.reported = (self.committed_rows, self.commits);
        }
        self.owned = positions.owned;
        self.epoch = positions.epoch;
        self.legacy = positions.legacy;
    }
}

impl Member {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not wedge the source: the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn fail(&self, why: String) {
        tracing::warn!(error = %why, "Kafka group member stopped");
        let mut state = self.lock();
        state.failed.get_or_insert(why);
        state.stopped = true;
        self.stop.cancel();
    }
}

/// The consumer's context: repositions every assigned partition at the offsets in bronze.
struct GroupContext {
    lake: Lake,
    name: String,
    member: Arc<Member>,
    runtime: tokio::runtime::Handle,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                // The callback runs inside the reading loop's poll; bronze is read right here
                // so that no message of the new assignment is fetched from a wrong offset.
                let stored = tokio::task::block_in_place(|| {
                    self.runtime
                        .block_on(positions(&self.lake, &self.name, &partitions))
                });
                let positions = match stored {
                    Ok(positions) => positions,
                    Err(e) => {
                        let _ = consumer.unassign();
                        self.member.fail(format!(
                            "source `{}`: reading offsets from bronze: {e}",
                            self.name
                        ));
                        return;
                    }
                };
                for (topic, partitions) in &positions.owned {
                    for (partition, offset) in partitions {
                        let _ = tpl.set_partition_offset(topic, *partition, start_offset(*offset));
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    self.member
                        .fail(format!("source `{}`: assigning partitions: {e}", self.name));
                    return;
                }
                tracing::info!(source = %self.name, partitions = partitions.len(), owned = ?positions.owned, "partitions assigned");
                let mut state = self.member.lock();
                state.positioned(positions);
                state.generation += 1;
                state.assigned_at = Some(Instant::now());
                self.member
                    .generation
                    .store(state.generation, Ordering::Release);
            }
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::warn!(source = %self.name, error = ?other, "rebalance failed; partitions released");
                }
                let _ = consumer.unassign();
                tracing::info!(source = %self.name, "partitions revoked");
                let mut state = self.member.lock();
                state.owned.clear();
                state.generation += 1;
                // Until the next assignment the member cannot be caught up.
                state.assigned_at = None;
                state.unassigned_since = Instant::now();
                self.member
                    .generation
                    .store(state.generation, Ordering::Release);
            }
        }
    }
}

/// Where a member's partitions start, read from bronze's latest version.
struct Positions {
    /// The offsets bronze holds for the partitions.
    owned: Owned,
    /// The source's last full refresh (see [`kafka::reset`]).
    epoch: Option<i64>,
    /// The table predates `row_schema`.
    legacy: bool,
}

async fn positions(
    lake: &Lake,
    name: &str,
    partitions: &[(String, i32)],
) -> medallion_lake::Result<Positions> {
    let snapshot = lake.snapshot(Layer::Bronze, name, None).await?;
    let mut owned = Owned::new();
    for (topic, partition) in partitions {
        let offset = match &snapshot {
            Some(s) => s.app_version(&kafka::app_id(topic, *partition)).await?,
            None => None,
        };
        owned
            .entry(topic.clone())
            .or_default()
            .insert(*partition, offset);
    }
    let epoch = match &snapshot {
        Some(s) => s.app_version(&kafka::refresh_app_id(name)).await?,
        None => None,
    };
    Ok(Positions {
        owned,
        epoch,
        legacy: kafka::is_legacy(snapshot.as_ref()),
    })
}

/// The source's last full refresh as bronze's latest version records it.
async fn refresh_epoch(lake: &Lake, name: &str) -> medallion_lake::Result<Option<i64>> {
    match lake.snapshot(Layer::Bronze, name, None).await? {
        Some(s) => s.app_version(&kafka::refresh_app_id(name)).await,
        None => Ok(None),
    }
}

fn start_offset(stored: Option<i64>) -> Offset {
    stored.map_or(Offset::Beginning, |o| Offset::Offset(o + 1))
}

/// The settings that make a member's consumer: a task with others starts a new member. The
/// rest (batch sizes and waits, key and sequence fields) reach the running member instead, so
/// that tuning a pipeline does not make its replicas leave and rejoin the group.
fn fingerprint(task: &TaskRequest, name: &str, kafka: &KafkaSourceSpec) -> String {
    format!(
        "{}\u{1}{}\u{1}{:?}\u{1}{:?}",
        kafka::group_id(task, name, kafka),
        kafka.brokers,
        kafka.topics,
        kafka.settings
    )
}

/// The host name and the listen port: unique among replicas, and kept across a restart of the
/// same replica (a Kubernetes pod keeps its name when its container restarts).
pub fn default_instance_id(listen: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ingestor".into());
    let port = listen.rsplit(':').next().unwrap_or_default();
    format!("{host}:{port}")
}

impl Members {
    pub fn new(instance: String) -> Members {
        Members {
            instance,
            members: tokio::sync::Mutex::default(),
        }
    }

    /// The running member for the task's source, started if there is none (or the running one
    /// stopped or has other settings, in which case it is first stopped and awaited, so that
    /// two members of one replica never read the same source).
    async fn member(
        &self,
        lake: &Lake,
        task: &TaskRequest,
        name: &str,
        kafka: &KafkaSourceSpec,
    ) -> Result<(Arc<Member>, bool), TaskError> {
        let key = member_key(task, name);
        let fingerprint = fingerprint(task, name, kafka);
        let mut members = self.members.lock().await;
        if let Some(running) = members.remove(&key) {
            {
                let state = running.member.lock();
                if !state.stopped
                    && !running.member.stop.is_cancelled()
                    && running.member.fingerprint == fingerprint
                {
                    drop(state);
                    let member = running.member.clone();
                    members.insert(key, running);
                    return Ok((member, false));
                }
                if let Some(why) = &state.failed {
                    tracing::info!(source = name, previous = %why, "starting a new group member");
                }
            }
            running.stop().await;
        }
        let instance = (!self.instance.is_empty()).then(|| format!("{}/{key}", self.instance));
        let running = start(lake, task, name, kafka, fingerprint, instance)?;
        let member = running.member.clone();
        members.insert(key, running);
        Ok((member, true))
    }

    /// Stops every member and waits for each to leave its group.
    pub async fn leave_all(&self) {
        let members: Vec<Running> = self.members.lock().await.drain().map(|(_, r)| r).collect();
        if members.is_empty() {
            return;
        }
        tracing::info!(members = members.len(), "leaving Kafka consumer groups");
        futures::future::join_all(members.into_iter().map(Running::stop)).await;
    }
}

fn member_key(task: &TaskRequest, name: &str) -> String {
    format!("{}/{name}", task.pipeline.spec.name)
}

/// A member and its reading loop.
struct Running {
    member: Arc<Member>,
    reading: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the loop and waits for it (at most [`LEAVE_WAIT`]): an in-flight commit lands or
    /// fails before this returns, and the consumer has left its group.
    async fn stop(self) {
        self.member.stop.cancel();
        if tokio::time::timeout(LEAVE_WAIT, self.reading)
            .await
            .is_err()
        {
            tracing::warn!(
                "a Kafka group member did not stop within {}s",
                LEAVE_WAIT.as_secs()
            );
        }
    }
}

fn start(
    lake: &Lake,
    task: &TaskRequest,
    name: &str,
    kafka: &KafkaSourceSpec,
    fingerprint: String,
    instance: Option<String>,
) -> Result<Running, TaskError> {
    if kafka.settings.iter().any(|(k, v)| {
        k == "partition.assignment.strategy" && v.to_ascii_lowercase().contains("cooperative")
    }) {
        return Err(TaskError::Invalid(format!(
            "source `{name}`: kafka.settings.partition.assignment.strategy: cooperative assignment is not supported (every rebalance repositions all partitions at bronze's offsets); use range or roundrobin"
        )));
    }
    let mut config = kafka::client_config(task, name, kafka)?;
    if let Some(instance) = &instance
        && !kafka.settings.contains_key("group.instance.id")
    {
        config.set("group.instance.id", instance);
    }
    // A member that stalls this long loses its partitions; its next commit is then refused.
    for (key, value) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        ("max.poll.interval.ms", "300000"),
    ] {
        if !kafka.settings.contains_key(key) {
            config.set(key, value);
        }
    }
    let member = Arc::new(Member {
        fingerprint,
        state: Mutex::new(State {
            owned: Owned::new(),
            generation: 0,
            assigned_at: None,
            unassigned_since: Instant::now(),
            epoch: None,
            legacy: false,
            committed_rows: 0,
            commits: 0,
            reported: (0, 0),
            last_outcome: None,
            tag: CommitTag::of(task),
            kafka: kafka.clone(),
            last_asked: Instant::now(),
            failed: None,
            last_error: None,
            stopped: false,
        }),
        epoch: Instant::now(),
        last_message_ms: AtomicU64::new(0),
        pending: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        settings: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });
    let context = GroupContext {
        lake: lake.clone(),
        name: name.to_string(),
        member: member.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let consumer: StreamConsumer<GroupContext> = config
        .create_with_context(context)
        .map_err(|e| TaskError::Invalid(format!("source `{name}`: Kafka client: {e}")))?;
    let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| TaskError::Invalid(format!("source `{name}`: subscribe: {e}")))?;
    tracing::info!(
        source = name,
        group = %kafka::group_id(task, name, kafka),
        "joining the consumer group"
    );
    let reader = Reader {
        lake: lake.clone(),
        name: name.to_string(),
        member: member.clone(),
    };
    let reading = tokio::spawn(async move {
        let _stopped = StopGuard(reader.member.clone());
        let consumer = Arc::new(consumer);
        reader.read(&consumer).await;
        // Leaving the group waits for the broker; not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    });
    Ok(Running { member, reading })
}

/// Marks the member stopped when its loop ends, however it ends (a panic included), so that
/// the next task starts a new one instead of waiting on a dead loop.
struct StopGuard(Arc<Member>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.stopped = true;
        if std::thread::panicking() {
            state
                .failed
                .get_or_insert_with(|| "the Kafka reading loop panicked".into());
        }
        self.0.stop.cancel();
    }
}

/// The member's reading loop.
struct Reader {
    lake: Lake,
    name: String,
    member: Arc<Member>,
}

/// The loop's settings, from the source's spec.
struct Tuning {
    options: debezium::Options,
    idle: Duration,
    /// The longest a micro-batch stays uncommitted.
    max_age: Duration,
    max_batch_rows: usize,
}

impl Tuning {
    fn of(kafka: &KafkaSourceSpec) -> Tuning {
        Tuning {
            options: debezium::Options::of(kafka),
            idle: Duration::from_millis(kafka.idle_ms),
            max_age: if kafka.max_task_ms > 0 {
                Duration::from_millis(kafka.max_task_ms)
            } else {
                BATCH_AGE
            },
            max_batch_rows: kafka.max_batch_rows,
        }
    }
}

impl Reader {
    async fn read(&self, consumer: &StreamConsumer<GroupContext>) {
        let member = &self.member;
        let mut settings = member.settings.load(Ordering::Acquire);
        let mut tuning = Tuning::of(&member.lock().kafka);
        let mut batch = BatchBuilder::new();
        let mut batch_started: Option<Instant> = None;
        let mut last_message = Instant::now();
        let (mut generation, mut owned, mut legacy) = (0u64, Owned::new(), false);
        let mut epoch_checked = Instant::now();
        // Commits that failed in a row; a lasting failure (a schema mismatch, say) stops the
        // member with its error instead of reading the same rows forever.
        let mut failures = 0;
        loop {
            if member.settings.load(Ordering::Acquire) != settings {
                let state = member.lock();
                settings = member.settings.load(Ordering::Acquire);
                tuning = Tuning::of(&state.kafka);
            }
            let Tuning {
                options,
                idle,
                max_age,
                max_batch_rows,
            } = &tuning;
            let (idle, max_age) = (*idle, *max_age);
            let now = Instant::now();
            // Wake up for the batch's idle or age deadline, else now and then to look around.
            let wait = match batch_started {
                Some(started) => (last_message + idle)
                    .min(started + max_age)
                    .saturating_duration_since(now),
                None => Duration::from_secs(1),
            };
            let message = tokio::select! {
                m = consumer.recv() => Some(m),
                _ = tokio::time::sleep(wait) => None,
                _ = member.stop.cancelled() => break,
            };
            // A rebalance runs inside `recv`: rows read before it may be of partitions this
            // member no longer owns, and every partition was repositioned at bronze's offsets.
            if member.generation.load(Ordering::Acquire) != generation {
                let state = member.lock();
                generation = state.generation;
                owned = state.owned.clone();
                legacy = state.legacy;
                drop(state);
                if !batch.last.is_empty() {
                    tracing::info!(source = %self.name, rows = batch.rows, "rebalanced: dropping uncommitted rows, read again from bronze's offsets");
                    batch = BatchBuilder::new();
                    batch_started = None;
                    member.pending.store(false, Ordering::Release);
                }
            }
            match message {
                Some(Ok(message)) => {
                    let stored = owned
                        .get(message.topic())
                        .and_then(|p| p.get(&message.partition()));
                    // A message of a partition not owned, or one bronze already holds, is a
                    // leftover of an earlier assignment.
                    if let Some(stored) = stored
                        && stored.is_none_or(|s| message.offset() > s)
                    {
                        batch.push(&message, options);
                        last_message = Instant::now();
                        member
                            .last_message_ms
                            .store(member.since_epoch(), Ordering::Release);
                        if batch_started.is_none() {
                            batch_started = Some(last_message);
                            member.pending.store(true, Ordering::Release);
                        }
                    }
                }
                Some(Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                    member.fail(format!("source `{}`: reading Kafka: {e}", self.name));
                    return;
                }
                // librdkafka recovers from the rest (a broker restarting, say) on its own,
                // keeping the member in its group.
                Some(Err(e)) => {
                    let error = e.to_string();
                    let mut state = member.lock();
                    if state.last_error.as_ref() != Some(&error) {
                        tracing::warn!(source = %self.name, %error, "reading Kafka");
                        state.last_error = Some(error);
                    }
                }
                None => {}
            }
            let now = Instant::now();
            let due = batch_started.is_some_and(|started| {
                batch.rows >= *max_batch_rows
                    || now >= last_message + idle
                    || now >= started + max_age
            });
            if due {
                match self.commit(&mut batch, &mut owned, legacy).await {
                    Ok(None) => failures = 0,
                    // Refused: the rows are dropped and every partition starts again at the
                    // offsets bronze holds now.
                    Ok(Some(why)) => {
                        tracing::warn!(source = %self.name, %why, "commit refused; repositioning at bronze's offsets");
                        batch = BatchBuilder::new();
                        if let Err(e) = self.reposition(consumer, &mut owned, &mut legacy).await {
                            member.fail(e);
                            return;
                        }
                    }
                    // A failed commit (a conflict, the store unreachable) may or may not have
                    // landed: bronze says which, so start again from its offsets.
                    Err(e) => {
                        failures += 1;
                        if failures >= COMMIT_ATTEMPTS {
                            member.fail(e.to_string());
                            return;
                        }
                        tracing::warn!(source = %self.name, error = %e, "commit failed; repositioning at bronze's offsets");
                        batch = BatchBuilder::new();
                        if let Err(e) = self.reposition(consumer, &mut owned, &mut legacy).await {
                            member.fail(e);
                            return;
                        }
                    }
                }
                batch_started = None;
                member.pending.store(false, Ordering::Release);
            } else if batch_started.is_none() && epoch_checked.elapsed() >= EPOCH_CHECK {
                // Idle: has a full refresh reset bronze since the partitions were positioned?
                epoch_checked = Instant::now();
                match refresh_epoch(&self.lake, &self.name).await {
                    Ok(epoch) if epoch != member.lock().epoch => {
                        tracing::info!(source = %self.name, ?epoch, "bronze was reset by a full refresh; reading the partitions again");
                        if let Err(e) = self.reposition(consumer, &mut owned, &mut legacy).await {
                            member.fail(e);
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(source = %self.name, error = %e, "reading bronze's refresh epoch")
                    }
                }
            }
            if batch_started.is_none() {
                // Decided under the lock, so that no task starts waiting on a leaving member.
                let mut state = member.lock();
                if state.last_asked.elapsed() >= MEMBER_IDLE {
                    state.stopped = true;
                    tracing::info!(source = %self.name, "no task asked for this source lately; leaving the group");
                    break;
                }
            }
        }
    }

    /// Starts every owned partition again just after the offset bronze holds for it now.
    async fn reposition(
        &self,
        consumer: &StreamConsumer<GroupContext>,
        owned: &mut Owned,
        legacy: &mut bool,
    ) -> Result<(), String> {
        let partitions: Vec<(String, i32)> = owned
            .iter()
            .flat_map(|(t, ps)| ps.keys().map(move |p| (t.clone(), *p)))
            .collect();
        let fresh = positions(&self.lake, &self.name, &partitions)
            .await
            .map_err(|e| format!("source `{}`: reading offsets from bronze: {e}", self.name))?;
        for (topic, partitions) in &fresh.owned {
            for (partition, offset) in partitions {
                // librdkafka waits for the fetcher to take the new position.
                tokio::task::block_in_place(|| {
                    consumer.seek(
                        topic,
                        *partition,
                        start_offset(*offset),
                        Duration::from_secs(10),
                    )
                })
                .unwrap_or_else(|e| {
                    // Not fetching yet (just assigned): it starts where the assignment said;
                    // anything bronze already holds is skipped by the offset filter.
                    tracing::warn!(source = %self.name, %topic, partition, error = %e, "seek failed");
                });
            }
        }
        *owned = fresh.owned.clone();
        *legacy = fresh.legacy;
        let mut state = self.member.lock();
        state.positioned(fresh);
        // Waiting tasks give the first fetch from the new positions time to arrive.
        if state.assigned_at.is_some() {
            state.assigned_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Commits the batch, continuing from the offsets this member holds for its partitions.
    /// `Some(why)` if bronze refused it (another writer moved the offsets).
    async fn commit(
        &self,
        batch: &mut BatchBuilder,
        owned: &mut Owned,
        legacy: bool,
    ) -> Result<Option<String>, TaskError> {
        let member = &self.member;
        let mut expected = Vec::new();
        for (topic, partitions) in &batch.last {
            for partition in partitions.keys() {
                let stored = owned
                    .get(topic)
                    .and_then(|p| p.get(partition))
                    .copied()
                    .flatten();
                expected.push((kafka::app_id(topic, *partition), stored));
            }
        }
        let (tag, epoch) = {
            let state = member.lock();
            (state.tag.clone(), state.epoch)
        };
        // A full refresh since the partitions were positioned refuses the commit too, even
        // where it left an offset as it was.
        expected.push((kafka::refresh_app_id(&self.name), epoch));
        let last = batch.last.clone();
        let rows = batch.rows as u64;
        let outcome =
            match kafka::commit(&self.lake, &tag, &self.name, batch, legacy, expected).await? {
                kafka::Committed::Done(outcome) => outcome,
                kafka::Committed::Moved(why) => return Ok(Some(why)),
            };
        for (topic, partitions) in last {
            let entry = owned.entry(topic).or_default();
            for (partition, offset) in partitions {
                entry.insert(partition, Some(offset));
            }
        }
        let mut state = member.lock();
        // The shared view follows, unless a rebalance replaced it meanwhile.
        for (topic, partitions) in owned.iter() {
            if let Some(shared) = state.owned.get_mut(topic) {
                for (partition, offset) in partitions {
                    if let Some(slot) = shared.get_mut(partition) {
                        *slot = *offset;
                    }
                }
            }
        }
        state.committed_rows += rows;
        state.commits += 1;
        state.last_outcome = Some(outcome);
        Ok(None)
    }
}

/// One bronze task of a Kafka source: wait for this replica's group member to catch up, then
/// report the table.
pub async fn run(
    members: &Members,
    lake: &Lake,
    task: &TaskRequest,
    name: &str,
    kafka: &KafkaSourceSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest, TaskError> {
    let (member, new) = members.member(lake, task, name, kafka).await?;
    if new {
        // A topic the brokers do not know would only show as no partitions: say so.
        let probe: BaseConsumer = kafka::client_config(task, name, kafka)?
            .create()
            .map_err(|e| TaskError::Invalid(format!("source `{name}`: Kafka client: {e}")))?;
        if let Err(e) = kafka::topic_partitions(Arc::new(probe), name, kafka).await {
            member.stop.cancel();
            return Err(e);
        }
    }
    {
        let mut state = member.lock();
        state.tag = CommitTag::of(task);
        state.last_asked = Instant::now();
        if state.kafka != *kafka {
            state.kafka = kafka.clone();
            member.settings.fetch_add(1, Ordering::AcqRel);
        }
    }
    // A full refresh resets bronze (once for all replicas) and waits until this replica's
    // member has noticed and read its partitions again.
    let refresh = task.full_refresh.then(|| kafka::refresh_epoch(task));
    let mut reset = false;
    if task.full_refresh {
        progress.report("resetting bronze for a full refresh", 0, 0, true);
        reset = kafka::reset(lake, task, name, kafka).await?;
    }
    let started = Instant::now();
    let idle = Duration::from_millis(kafka.idle_ms);
    let budget = (kafka.max_task_ms > 0).then(|| Duration::from_millis(kafka.max_task_ms));
    progress.report("joining the consumer group", 0, 0, true);
    let mut reported_rows = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TASK_TICK) => {}
            _ = cancel.cancelled() => return Err(TaskError::Cancelled),
        }
        let now = Instant::now();
        let mut state = member.lock();
        // A waiting task keeps the member from leaving as idle.
        state.last_asked = now;
        if let Some(why) = &state.failed {
            return Err(TaskError::Internal(why.clone()));
        }
        if state.stopped {
            return Err(TaskError::Internal(format!(
                "source `{name}`: the group member stopped while the task waited (a full refresh, a new spec or a shutdown); retry"
            )));
        }
        let rows = state.committed_rows - state.reported.0;
        if reported_rows != Some(rows) {
            reported_rows = Some(rows);
            let commits = state.commits - state.reported.1;
            progress.report(&format!("{commits} commits"), rows, 0, false);
        }
        let Some(assigned_at) = state.assigned_at else {
            if started.elapsed().min(state.unassigned_since.elapsed()) >= JOIN_WAIT {
                let last = state
                    .last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default();
                return Err(TaskError::Internal(format!(
                    "source `{name}`: the consumer group assigned no partitions within {}s (is the broker's group coordinator reachable?){last}",
                    JOIN_WAIT.as_secs()
                )));
            }
            continue;
        };
        drop(state);
        // Caught up: nothing uncommitted and no message since the task began (or since a
        // fresh assignment's first fetch could have arrived) for `idle_ms`.
        let last_message =
            member.epoch + Duration::from_millis(member.last_message_ms.load(Ordering::Acquire));
        let quiet_from = last_message
            .max(started)
            .max(assigned_at + FIRST_WAIT.saturating_sub(idle));
        let repositioned = refresh.is_none_or(|r| member.lock().epoch.is_some_and(|e| e >= r));
        let caught_up =
            repositioned && !member.pending.load(Ordering::Acquire) && now >= quiet_from + idle;
        if caught_up || budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
    }
    let (rows, commits, last_outcome, owned) = {
        let mut state = member.lock();
        let (rows, commits) = (
            state.committed_rows - state.reported.0,
            state.commits - state.reported.1,
        );
        state.reported = (state.committed_rows, state.commits);
        (
            rows,
            commits,
            state.last_outcome.clone(),
            state.owned.clone(),
        )
    };
    let snapshot = lake
        .snapshot(Layer::Bronze, name, None)
        .await
        .map_err(TaskError::internal)?;
    let mut manifest = match (snapshot, last_outcome) {
        (Some(_), Some(outcome)) if commits > 0 => {
            let mut manifest = Manifest::after_commit(lake, &task.table, &outcome).await?;
            manifest.committed = true;
            manifest.rows_written = rows;
            manifest
        }
        // A reset with nothing read since still rewrote the table.
        (Some(snapshot), _) => Manifest::of_snapshot(&snapshot, reset),
        // Nothing to read yet: an empty table, so downstream tables have their input.
        (None, _) => {
            kafka::create_empty(lake, task, name, medallion_lake::WriteMode::Append).await?
        }
    };
    let mut assignment = TopicPartitionList::new();
    for (topic, partitions) in &owned {
        for (partition, offset) in partitions {
            let start = offset.map_or(Offset::Beginning, |o| Offset::Offset(o + 1));
            let _ = assignment.add_partition_offset(topic, *partition, start);
        }
    }
    manifest.source_lag = partition_lag(kafka, task, name, assignment).await;
    Ok(manifest)
}

/// Messages the member's partitions hold beyond what bronze holds, asked through a short-lived
/// client (the member's own consumer belongs to its reading loop).
async fn partition_lag(
    kafka: &KafkaSourceSpec,
    task: &TaskRequest,
    name: &str,
    assignment: TopicPartitionList,
) -> Option<u64> {
    if assignment.count() == 0 {
        return Some(0);
    }
    let consumer: BaseConsumer = kafka::client_config(task, name, kafka)
        .ok()?
        .create()
        .ok()?;
    kafka::source_lag(Arc::new(consumer), assignment).await
}
