//! One Flight read of a silver input for all the gold tasks queued on this aggregator that
//! need it. The gold tables computed from one silver table arrive together when it commits;
//! the first of them to run reads the columns that all the waiting ones use, and each later
//! one takes its columns from that read instead of reading the table again.
//!
//! What is kept is only what the tasks still to read need: a task's own columns are let go
//! once it has taken them (it holds them itself while it computes), and the read is dropped
//! when no waiting task needs it. A task that never reads (its table was up to date, or only
//! touched groups were recomputed) lets go of its share when it ends.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use medallion_flight::{FlightReader, TableTicket};
use medallion_spec::TableRef;
use medallion_stage::{TaskError, TaskRequest};

/// The columns a task reads from an input; `None` is every column.
type Columns = Option<BTreeSet<String>>;

/// Which read of which input: the tickets of one table version, whatever their columns.
type ReadKey = Vec<Vec<u8>>;

/// The reads shared among the tasks waiting on this aggregator.
#[derive(Default)]
pub struct SharedReads {
    reads: Mutex<HashMap<ReadKey, Arc<SharedRead>>>,
}

/// One input's read and the tasks that will take from it.
#[derive(Default)]
struct SharedRead {
    state: Mutex<ReadState>,
    /// Held by the task reading the input, so that the others wait and take from its read
    /// rather than read it too.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct ReadState {
    /// The columns of each task that has not taken its rows yet, by task id.
    waiting: HashMap<String, Columns>,
    /// The rows read, holding only columns that waiting tasks need.
    read: Option<Kept>,
}

/// Rows read and kept for the tasks still waiting.
#[derive(Clone)]
struct Kept {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    /// Which columns these are (`None`: all the table's).
    columns: Columns,
}

impl Kept {
    /// Whether the rows hold every column of `wanted`.
    fn covers(&self, wanted: &Columns) -> bool {
        match (&self.columns, wanted) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(held), Some(wanted)) => wanted.is_subset(held),
        }
    }

    /// Only the columns in `columns`.
    fn project(&self, columns: &Columns) -> Result<Kept, TaskError> {
        let (schema, batches) = project(&self.schema, &self.batches, columns)?;
        let columns = match (&self.columns, columns) {
            (None, c) | (c, None) => c.clone(),
            (Some(held), Some(wanted)) => Some(held.intersection(wanted).cloned().collect()),
        };
        Ok(Kept {
            schema,
            batches,
            columns,
        })
    }
}

/// A task's place among the waiting tasks of its inputs, given up when dropped.
pub struct Waiting {
    reads: Arc<SharedReads>,
    task_id: String,
    keys: Vec<ReadKey>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        for key in &self.keys {
            self.reads.leave(key, &self.task_id);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent across a panic (every update is one assignment).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_key(tickets: &[TableTicket]) -> ReadKey {
    tickets
        .iter()
        .map(|t| t.with_columns(None).encode().to_vec())
        .collect()
}

fn columns_of(tickets: &[TableTicket]) -> Columns {
    tickets
        .first()
        .and_then(|t| t.columns.as_ref())
        .map(|c| c.iter().cloned().collect())
}

/// Every column that any of `columns` needs.
fn union<'a>(mut columns: impl Iterator<Item = &'a Columns>) -> Columns {
    columns.try_fold(BTreeSet::new(), |mut all, c| {
        all.extend(c.as_ref()?.iter().cloned());
        Some(all)
    })
}

/// The columns of `schema` and `batches` that are in `columns`, in the schema's order (as a
/// read of only those columns returns them).
fn project(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    columns: &Columns,
) -> Result<(SchemaRef, Vec<RecordBatch>), TaskError> {
    let Some(columns) = columns else {
        return Ok((schema.clone(), batches.to_vec()));
    };
    let indices: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| columns.contains(schema.field(i).name()))
        .collect();
    let projected = Arc::new(schema.project(&indices).map_err(TaskError::internal)?);
    let batches = batches
        .iter()
        .map(|b| b.project(&indices).map_err(TaskError::internal))
        .collect::<Result<_, _>>()?;
    Ok((projected, batches))
}

impl SharedReads {
    /// Counts `task` among the tasks that will read its inputs, until the returned value is
    /// dropped.
    pub fn wait(self: &Arc<Self>, task: &TaskRequest) -> Waiting {
        let mut keys = Vec::new();
        let mut reads = lock(&self.reads);
        for input in task.dependencies() {
            let Ok(tickets) = task.input_tickets(&input) else {
                continue;
            };
            let key = read_key(&tickets);
            let read = reads.entry(key.clone()).or_default();
            lock(&read.state)
                .waiting
                .insert(task.task_id.clone(), columns_of(&tickets));
            keys.push(key);
        }
        Waiting {
            reads: self.clone(),
            task_id: task.task_id.clone(),
            keys,
        }
    }

    /// Takes `task_id` off the tasks waiting for the read of `key`; drops the read, or the
    /// columns it no longer needs to keep.
    fn leave(&self, key: &ReadKey, task_id: &str) {
        let mut reads = lock(&self.reads);
        let Some(read) = reads.get(key) else { return };
        let mut state = lock(&read.state);
        if state.waiting.remove(task_id).is_none() {
            return;
        }
        if state.waiting.is_empty() {
            drop(state);
            reads.remove(key);
            return;
        }
        if let Some(kept) = state.read.take() {
            let needed = union(state.waiting.values());
            // Projecting only drops columns, so it cannot fail on the schema it came from.
            state.read = kept.project(&needed).ok();
        }
    }

    /// The rows of `input` that `task` reads: from the read another waiting task made, or
    /// read now over Flight, with the columns of every task still waiting for this input when
    /// there are others.
    pub async fn read(
        &self,
        reader: &FlightReader,
        task: &TaskRequest,
        input: &TableRef,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), TaskError> {
        let tickets = task.input_tickets(input)?;
        let key = read_key(&tickets);
        let mine = columns_of(&tickets);
        let shared = lock(&self.reads).get(&key).cloned();
        let Some(shared) = shared else {
            return reader.read_all(&tickets).await.map_err(TaskError::internal);
        };
        let _reading = shared.reading.lock().await;
        let (kept, wanted) = {
            let state = lock(&shared.state);
            let wanted = union(state.waiting.values().chain([&mine]));
            (state.read.clone(), wanted)
        };
        // A task that arrived after the read was made may need columns it does not hold.
        let kept = match kept.filter(|k| k.covers(&mine)) {
            Some(kept) => kept,
            None => {
                let columns = wanted.clone().map(|c| c.into_iter().collect());
                let tickets: Vec<TableTicket> = tickets
                    .iter()
                    .map(|t| t.with_columns(columns.clone()))
                    .collect();
                let (schema, batches) = reader
                    .read_all(&tickets)
                    .await
                    .map_err(TaskError::internal)?;
                let kept = Kept {
                    schema,
                    batches,
                    columns: wanted,
                };
                lock(&shared.state).read = Some(kept.clone());
                kept
            }
        };
        let taken = kept.project(&mine)?;
        self.leave(&key, &task.task_id);
        Ok((taken.schema, taken.batches))
    }
}
