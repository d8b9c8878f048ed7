//! The pipeline spec: its YAML model, validation that names the offending field path, and
//! the DAG of tables derived from the references between them.
//!
//! This crate is pure (no I/O, no data): the coordinator validates with it at apply time and
//! each layer service re-reads the same spec to run its task.

mod model;
mod validate;

pub use model::*;
pub use validate::{
    Dag, DagNode, column_references, is_row_local, sql_column_references, sql_table_references,
};

/// A spec problem, located by the path of the field at fault (e.g. `silver[1].expectations[0].expr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A spec that parsed and validated, with its DAG.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub spec: PipelineSpec,
    pub dag: Dag,
}

impl Pipeline {
    /// Parses and validates YAML spec text.
    pub fn parse(yaml: &str) -> Result<Pipeline, SpecError> {
        let de = serde_yaml::Deserializer::from_str(yaml);
        let spec: PipelineSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "<root>".to_string()
            } else {
                path
            };
            SpecError::new(path, e.into_inner().to_string())
        })?;
        let dag = validate::validate(&spec)?;
        Ok(Pipeline { spec, dag })
    }

    pub fn source(&self, name: &str) -> Option<&SourceSpec> {
        self.spec.sources.iter().find(|s| s.name == name)
    }

    pub fn silver(&self, name: &str) -> Option<&SilverSpec> {
        self.spec.silver.iter().find(|s| s.name == name)
    }

    pub fn gold(&self, name: &str) -> Option<&GoldSpec> {
        self.spec.gold.iter().find(|s| s.name == name)
    }

    /// The retry/timeout policy of one table's task.
    pub fn policy(&self, table: &TableRef) -> TaskPolicy {
        let base = self.spec.defaults;
        let over = match table.layer {
            Layer::Bronze => self.source(&table.name).map(|s| s.policy),
            Layer::Silver => self.silver(&table.name).map(|s| s.policy),
            Layer::Gold => self.gold(&table.name).map(|s| s.policy),
            Layer::Quarantine => None,
        };
        over.map_or(base, |o| o.apply(base))
    }
}

#[cfg(test)]
mod tests;

impl Pipeline {
    /// The columns `table` reads from its input `input`, so readers can skip the rest;
    /// `None` when it may read any of them.
    pub fn columns_read(&self, table: &TableRef, input: &TableRef) -> Option<Vec<String>> {
        let mut wanted = std::collections::BTreeSet::new();
        match table.layer {
            Layer::Silver => {
                let silver = self.silver(&table.name)?;
                if silver.sql.is_some() {
                    return None;
                }
                if silver.apply_changes.is_some() {
                    return Some(
                        crate::CHANGE_COLUMNS
                            .iter()
                            .map(|c| c.to_string())
                            .collect(),
                    );
                }
                if silver.from.as_ref() == Some(input) {
                    for col in silver.columns.as_ref()? {
                        match &col.expr {
                            Some(expr) => wanted.extend(column_references(expr).ok()?),
                            None => {
                                wanted.insert(col.from.clone().unwrap_or_else(|| col.name.clone()));
                            }
                        }
                    }
                }
                if let Some(join) = silver.join.as_ref().filter(|j| &j.with == input) {
                    wanted.extend(join.on.iter().map(|k| k.right.clone()));
                    wanted.extend(join.columns.clone()?);
                }
            }
            Layer::Gold => {
                wanted = sql_column_references(&self.gold(&table.name)?.query()).ok()??
            }
            Layer::Bronze | Layer::Quarantine => return None,
        }
        Some(wanted.into_iter().collect())
    }
}

impl GoldSpec {
    /// The polars SQL that computes this table: its `sql`, or the group-by form written as SQL.
    pub fn query(&self) -> String {
        if let Some(sql) = &self.sql {
            return sql.clone();
        }
        let from = self.from.as_ref().map_or("", |f| f.name.as_str());
        let mut select: Vec<String> = self.group_by.iter().map(|g| format!("\"{g}\"")).collect();
        select.extend(
            self.aggregations
                .iter()
                .map(|a| format!("{} AS \"{}\"", a.expr, a.name)),
        );
        let mut sql = format!("SELECT {} FROM \"{from}\"", select.join(", "));
        if let Some(filter) = &self.filter {
            sql.push_str(&format!(" WHERE {filter}"));
        }
        if !self.group_by.is_empty() {
            let keys: Vec<String> = self.group_by.iter().map(|g| format!("\"{g}\"")).collect();
            sql.push_str(&format!(
                " GROUP BY {} ORDER BY {}",
                keys.join(", "),
                keys.join(", ")
            ));
        }
        sql
    }
}
