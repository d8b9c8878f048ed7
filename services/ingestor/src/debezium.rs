//! Debezium change events, as the JsonConverter writes them (schemas on: `{"schema", "payload"}`;
//! schemas off: the envelope itself), turned into bronze change rows.
//!
//! Each event yields its op (`c`, `u`, `d`, `r`, `t`), the row key, the before/after images and
//! `source` block as JSON text, and a `sequence`: a text that sorts in change order for one key.
//! It comes from the source position (Postgres `lsn`, MySQL binlog `file` + `pos` + `row`, SQL
//! Server `change_lsn` + `event_serial_no`), a configured field of `source`, or, as a last
//! resort, `ts_ms`. Numbers are zero-padded so text order is numeric order.

use serde_json::{Map, Value};

/// One parsed change event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub op: Op,
    /// JSON text of the row key.
    pub key: String,
    pub sequence: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub source: Option<String>,
    pub ts_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Read,
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// What a message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Change(Change),
    /// A null value after a delete: it only lets Kafka compact the key away.
    Tombstone,
}

/// How keys and sequences are found.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Key columns taken from the after (or, for deletes, before) image; empty: the message key.
    pub key_columns: Vec<String>,
    /// A field of `source` (dotted path below it) ordering changes; empty: by connector.
    pub sequence_field: Option<String>,
}

/// Parses one message (`key` and `value` as Kafka delivered them). The error says what is
/// wrong, for the dead-letter row.
pub fn parse(key: Option<&[u8]>, value: Option<&[u8]>, options: &Options) -> Result<Event, String> {
    let Some(value) = value else {
        return Ok(Event::Tombstone);
    };
    let document: Value =
        serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let envelope = unwrap_schema(&document);
    let Value::Object(envelope) = envelope else {
        return Err("value is not a JSON object".into());
    };
    let op = match envelope.get("op") {
        Some(Value::String(op)) => match op.as_str() {
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "r" => Op::Read,
            "t" => Op::Truncate,
            other => return Err(format!("unknown op `{other}`")),
        },
        Some(other) => return Err(format!("`op` is not a string: {other}")),
        None => return Err("no `op` field (not a Debezium change event)".into()),
    };
    let image = |name: &str| -> Result<Option<&Map<String, Value>>, String> {
        match envelope.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(row)) => Ok(Some(row)),
            Some(other) => Err(format!("`{name}` is not an object: {other}")),
        }
    };
    let (before, after) = (image("before")?, image("after")?);
    match op {
        Op::Create | Op::Read | Op::Update if after.is_none() => {
            return Err(format!("op `{}` without an `after` image", op.as_str()));
        }
        Op::Delete if before.is_none() && options.key_columns.is_empty() && key.is_none() => {
            return Err("delete without a `before` image or a message key".into());
        }
        _ => {}
    }
    let source = match envelope.get("source") {
        None | Some(Value::Null) => None,
        Some(Value::Object(source)) => Some(source),
        Some(other) => return Err(format!("`source` is not an object: {other}")),
    };
    let ts_ms = match envelope.get("ts_ms") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| format!("`ts_ms` is not an integer: {v}"))?,
        ),
    };
    let key_text = if op == Op::Truncate {
        String::new()
    } else if options.key_columns.is_empty() {
        let key = key.ok_or("no message key (configure key_columns)")?;
        let key: Value =
            serde_json::from_slice(key).map_err(|e| format!("message key is not JSON: {e}"))?;
        unwrap_schema(&key).to_string()
    } else {
        let row = after
            .or(before)
            .ok_or("no row image to take key columns from")?;
        let mut picked = Map::new();
        for column in &options.key_columns {
            let value = row
                .get(column)
                .ok_or_else(|| format!("key column `{column}` is missing from the row"))?;
            picked.insert(column.clone(), value.clone());
        }
        Value::Object(picked).to_string()
    };
    let sequence = sequence(source, ts_ms, options)?;
    Ok(Event::Change(Change {
        op,
        key: key_text,
        sequence,
        before: before.map(|r| Value::Object(r.clone()).to_string()),
        after: after.map(|r| Value::Object(r.clone()).to_string()),
        source: source.map(|s| Value::Object(s.clone()).to_string()),
        ts_ms,
    }))
}

/// With schemas on, the converter wraps everything as `{"schema": …, "payload": …}`.
fn unwrap_schema(document: &Value) -> &Value {
    match document {
        Value::Object(o)
            if o.len() == 2 && o.contains_key("schema") && o.contains_key("payload") =>
        {
            &o["payload"]
        }
        other => other,
    }
}

/// A number as 20 zero-padded digits, so that text order is numeric order.
fn padded(v: &Value, what: &str) -> Result<String, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(|n| format!("{n:020}"))
            .ok_or_else(|| format!("`{what}` is not a non-negative integer: {n}")),
        Value::String(s) if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() => {
            Ok(format!("{s:0>20}"))
        }
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("`{what}` is not a number or text: {other}")),
    }
}

fn sequence(
    source: Option<&Map<String, Value>>,
    ts_ms: Option<i64>,
    options: &Options,
) -> Result<String, String> {
    if let Some(field) = &options.sequence_field {
        let source = source.ok_or("no `source` block for the sequence field")?;
        let mut parts = field.split('.');
        let mut value = parts.next().and_then(|first| source.get(first));
        for part in parts {
            value = value.and_then(|v| v.get(part));
        }
        let value = value
            .filter(|v| !v.is_null())
            .ok_or_else(|| format!("sequence field `source.{field}` is missing"))?;
        return padded(value, field);
    }
    if let Some(source) = source {
        let connector = source
            .get("connector")
            .and_then(Value::as_str)
            .unwrap_or("");
        let field = |name: &str| source.get(name).filter(|v| !v.is_null());
        match connector {
            "postgresql" => {
                if let Some(lsn) = field("lsn") {
                    return padded(lsn, "source.lsn");
                }
            }
            "mysql" => {
                if let (Some(Value::String(file)), Some(pos)) = (field("file"), field("pos")) {
                    // mysql-bin.000042: the numeric suffix orders binlog files.
                    let number = file.rsplit('.').next().unwrap_or(file);
                    let row =
                        field("row").map_or(Ok("0".repeat(20)), |r| padded(r, "source.row"))?;
                    return Ok(format!(
                        "{}:{}:{row}",
                        padded(&Value::String(number.to_string()), "source.file")?,
                        padded(pos, "source.pos")?
                    ));
                }
            }
            "sqlserver" => {
                if let Some(Value::String(lsn)) = field("change_lsn") {
                    let serial = field("event_serial_no")
                        .map_or(Ok("0".repeat(20)), |s| padded(s, "source.event_serial_no"))?;
                    return Ok(format!("{lsn}:{serial}"));
                }
            }
            _ => {}
        }
    }
    // Processing time: only when the source gives no position.
    match ts_ms {
        Some(ts) => padded(&Value::from(ts.max(0)), "ts_ms"),
        None => Err("no source position and no `ts_ms` to order the change by".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: Option<&str>, value: &str, options: &Options) -> Result<Change, String> {
        match parse(key.map(str::as_bytes), Some(value.as_bytes()), options)? {
            Event::Change(c) => Ok(c),
            Event::Tombstone => Err("tombstone".into()),
        }
    }

    const PG_UPDATE: &str = r#"{"before":{"id":7,"name":"a"},"after":{"id":7,"name":"b"},
        "source":{"connector":"postgresql","lsn":24023128,"txId":555},"op":"u","ts_ms":1700000000000}"#;

    #[test]
    fn schemas_on_and_off_give_the_same_change() {
        let options = Options::default();
        let off = change(Some(r#"{"id":7}"#), PG_UPDATE, &options).unwrap();
        let on = change(
            Some(r#"{"schema":{"type":"struct"},"payload":{"id":7}}"#),
            &format!(r#"{{"schema":{{"type":"struct"}},"payload":{PG_UPDATE}}}"#),
            &options,
        )
        .unwrap();
        assert_eq!(off, on);
        assert_eq!(off.op, Op::Update);
        assert_eq!(off.key, r#"{"id":7}"#);
        assert_eq!(off.sequence, "00000000000024023128");
        assert_eq!(off.after.as_deref(), Some(r#"{"id":7,"name":"b"}"#));
    }

    #[test]
    fn sequences_sort_in_change_order_per_connector() {
        let mysql = |file: &str, pos: u64, row: u64| {
            let v = format!(
                r#"{{"after":{{"id":1}},"source":{{"connector":"mysql","file":"{file}","pos":{pos},"row":{row}}},"op":"c"}}"#
            );
            change(Some("1"), &v, &Options::default()).unwrap().sequence
        };
        assert!(mysql("mysql-bin.000002", 4, 0) > mysql("mysql-bin.000001", 900_000, 3));
        assert!(mysql("mysql-bin.000001", 1000, 1) > mysql("mysql-bin.000001", 1000, 0));
        assert!(mysql("mysql-bin.000001", 10_000, 0) > mysql("mysql-bin.000001", 9_999, 9));
        let sqlserver = r#"{"after":{"id":1},"source":{"connector":"sqlserver","change_lsn":"00000027:00000758:0005","event_serial_no":2},"op":"c"}"#;
        assert_eq!(
            change(Some("1"), sqlserver, &Options::default())
                .unwrap()
                .sequence,
            "00000027:00000758:0005:00000000000000000002"
        );
        // A configured field wins; ts_ms is the last resort.
        let options = Options {
            sequence_field: Some("txId".into()),
            ..Options::default()
        };
        assert_eq!(
            change(Some("1"), PG_UPDATE, &options).unwrap().sequence,
            "00000000000000000555"
        );
        let bare = r#"{"after":{"id":1},"op":"c","ts_ms":42}"#;
        assert_eq!(
            change(Some("1"), bare, &Options::default())
                .unwrap()
                .sequence,
            "00000000000000000042"
        );
    }

    #[test]
    fn keys_come_from_columns_when_configured() {
        let options = Options {
            key_columns: vec!["id".into()],
            ..Options::default()
        };
        let delete = r#"{"before":{"id":9,"name":"x"},"after":null,"source":{"connector":"postgresql","lsn":5},"op":"d"}"#;
        let c = change(None, delete, &options).unwrap();
        assert_eq!(
            (c.op, c.key.as_str(), c.after),
            (Op::Delete, r#"{"id":9}"#, None)
        );
    }

    #[test]
    fn tombstones_and_malformed_messages_are_told_apart() {
        assert_eq!(
            parse(Some(b"1"), None, &Options::default()),
            Ok(Event::Tombstone)
        );
        let bad = |value: &str| change(Some("1"), value, &Options::default()).unwrap_err();
        assert!(bad("{not json").contains("not JSON"));
        assert!(bad(r#"{"after":{"id":1}}"#).contains("no `op`"));
        assert!(bad(r#"{"after":{"id":1},"op":"x"}"#).contains("unknown op `x`"));
        assert!(bad(r#"{"after":[1],"op":"c","ts_ms":1}"#).contains("`after` is not an object"));
        assert!(bad(r#"{"after":{"id":1},"op":"c","ts_ms":"soon"}"#).contains("`ts_ms`"));
        assert!(bad(r#"{"op":"c","ts_ms":1}"#).contains("without an `after`"));
    }
}
