//! The coordinator's embedded store: pipelines and run history as JSON documents in a state
//! folder, each replaced atomically (write to a temporary file, fsync, rename), so a crash
//! never leaves a half-written record. Everything is also held in memory for reads.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state store {path}: corrupt record: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stored pipeline revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub name: String,
    pub revision: u64,
    pub spec_yaml: String,
    pub base_dir: String,
    pub applied_at_ms: i64,
    /// Last schedule tick that started (or was skipped for) a run, for catch-up after restarts.
    #[serde(default)]
    pub last_tick_ms: Option<i64>,
    /// Paused: neither the schedule nor streaming starts runs.
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

/// What a finished task reported, kept so downstream tasks (and resumed runs) can read it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub committed: bool,
    pub version: i64,
    /// Encoded Flight tickets.
    pub tickets: Vec<String>,
    pub rows_written: u64,
    pub bytes_written: u64,
    pub table_rows: u64,
    pub quarantined_rows: u64,
    pub source_files: Vec<String>,
    pub input_versions: BTreeMap<String, i64>,
    pub expectations: Vec<ExpectationRecord>,
    #[serde(default)]
    pub source_lag: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpectationRecord {
    pub name: String,
    pub action: String,
    pub failed_rows: u64,
    pub checked_rows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    /// `layer.name`.
    pub table: String,
    pub state: TaskState,
    pub attempts: u32,
    pub manifest: Option<ManifestRecord>,
    pub error: Option<String>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

/// One event of a run, as shown by `WatchRun`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    TaskQueued {
        table: String,
    },
    TaskStarted {
        table: String,
        attempt: u32,
    },
    TaskProgress {
        table: String,
        phase: String,
        rows: u64,
        bytes: u64,
    },
    TaskCommitted {
        table: String,
        committed: bool,
        version: i64,
        rows_written: u64,
        bytes_written: u64,
        table_rows: u64,
    },
    Expectation {
        table: String,
        name: String,
        action: String,
        failed_rows: u64,
        checked_rows: u64,
    },
    TaskFailed {
        table: String,
        attempt: u32,
        error: String,
        will_retry: bool,
    },
    RunFinished {
        state: RunState,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub pipeline: String,
    pub pipeline_revision: u64,
    pub sequence: u64,
    pub state: RunState,
    pub full_refresh: bool,
    pub tables: Vec<String>,
    pub created_at_ms: i64,
    pub finished_at_ms: i64,
    pub error: Option<String>,
    pub tasks: Vec<TaskRecord>,
    pub trigger: String,
    /// The spec revision the run executes, so a resumed run runs what it started with.
    pub spec_yaml: String,
    pub base_dir: String,
    /// Every event but progress ticks (those are live only).
    pub events: Vec<EventRecord>,
}

/// The state folder: `pipelines/<name>.json`, `runs/<id>.json`.
pub struct Store {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Store {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store> {
        let dir = dir.into();
        for sub in ["pipelines", "runs"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Store { dir })
    }

    fn write_atomic(&self, path: &Path, value: &impl Serialize) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
            path: path.display().to_string(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(())
    }

    fn read_all<T: for<'de> Deserialize<'de>>(&self, sub: &str) -> Result<Vec<T>> {
        let dir = self.dir.join(sub);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            out.push(
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    pub fn load_pipelines(&self) -> Result<Vec<PipelineRecord>> {
        self.read_all("pipelines")
    }

    pub fn load_runs(&self) -> Result<Vec<RunRecord>> {
        self.read_all("runs")
    }

    pub fn save_pipeline(&self, p: &PipelineRecord) -> Result<()> {
        self.write_atomic(
            &self.dir.join("pipelines").join(format!("{}.json", p.name)),
            p,
        )
    }

    pub fn delete_pipeline(&self, name: &str) -> Result<()> {
        let path = self.dir.join("pipelines").join(format!("{name}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    pub fn save_run(&self, r: &RunRecord) -> Result<()> {
        self.write_atomic(&self.dir.join("runs").join(format!("{}.json", r.id)), r)
    }

    pub fn delete_run(&self, id: &str) -> Result<()> {
        let path = self.dir.join("runs").join(format!("{id}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let p = PipelineRecord {
            name: "p".into(),
            revision: 2,
            spec_yaml: "name: p".into(),
            base_dir: "/x".into(),
            applied_at_ms: 5,
            last_tick_ms: None,
            paused: false,
        };
        store.save_pipeline(&p).expect("save");
        let store = Store::open(dir.path()).expect("reopen");
        let loaded = store.load_pipelines().expect("load");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].revision, 2);
        store.delete_pipeline("p").expect("delete");
        assert!(store.load_pipelines().expect("load").is_empty());
    }
}
