//! Debezium change events, as the JsonConverter writes them (schemas on: `{"schema", "payload"}`;
//! schemas off: the envelope itself), turned into bronze change rows.
//!
//! Each event yields its op (`c`, `u`, `d`, `r`, `t`), the row key, the before/after images and
//! `source` block as JSON text, and a `sequence`: a text that sorts in change order for one key.
//! It comes from the source position (Postgres `lsn`, MySQL binlog `file` + `pos` + `row`, SQL
//! Server `change_lsn` + `event_serial_no`), a configured field of `source`, or, as a last
//! resort, `ts_ms`. Numbers are zero-padded so text order is numeric order.

use serde_json::{Map, Value};

use crate::json_fields::{fields, plain_string};

/// One parsed change event; the images and `source` are the message's own text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    pub op: Op,
    /// JSON text of the row key.
    pub key: String,
    pub sequence: String,
    pub before: Option<&'a str>,
    pub after: Option<&'a str>,
    pub source: Option<&'a str>,
    pub ts_ms: Option<i64>,
    /// The envelope's schema as the JsonConverter sent it (schemas on), as its own text.
    pub schema: Option<&'a str>,
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
pub enum Event<'a> {
    Change(Change<'a>),
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

impl Options {
    /// The parsing options a source's spec sets.
    pub fn of(kafka: &medallion_spec::KafkaSourceSpec) -> Options {
        Options {
            key_columns: kafka.key_columns.clone(),
            sequence_field: kafka.sequence_field.clone(),
        }
    }
}

/// The envelope members a change is read from.
const ENVELOPE: [&str; 7] = [
    "schema", "payload", "op", "before", "after", "source", "ts_ms",
];

/// Parses one message (`key` and `value` as Kafka delivered them). The error says what is
/// wrong, for the dead-letter row.
pub fn parse<'a>(
    key: Option<&[u8]>,
    value: Option<&'a [u8]>,
    options: &Options,
) -> Result<Event<'a>, String> {
    let Some(value) = value else {
        return Ok(Event::Tombstone);
    };
    let text = std::str::from_utf8(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let members = fields(text, ENVELOPE).map_err(|e| not_an_object(text, &e))?;
    // With schemas on, the converter wraps the envelope as `{"schema": …, "payload": …}`.
    let (schema, [_, _, op, before, after, source, ts_ms]) = match members {
        [Some(schema), Some(payload), None, ..] => (
            Some(schema).filter(|s| *s != "null"),
            fields(payload, ENVELOPE).map_err(|e| format!("`payload` is not an object: {e}"))?,
        ),
        members => (None, members),
    };
    let op = match op {
        Some(raw) => match plain_string(raw) {
            Some("c") => Op::Create,
            Some("u") => Op::Update,
            Some("d") => Op::Delete,
            Some("r") => Op::Read,
            Some("t") => Op::Truncate,
            Some(other) => return Err(format!("unknown op `{other}`")),
            None => return Err(format!("`op` is not a string: {raw}")),
        },
        None => return Err("no `op` field (not a Debezium change event)".into()),
    };
    // An image is checked to be JSON without building it.
    let image = |name: &str, raw: Option<&'a str>| -> Result<Option<&'a str>, String> {
        match raw {
            None | Some("null") => Ok(None),
            Some(row) if row.starts_with('{') => serde_json::from_str::<serde::de::IgnoredAny>(row)
                .map(|_| Some(row))
                .map_err(|e| format!("`{name}` is not valid JSON: {e}")),
            Some(other) => Err(format!("`{name}` is not an object: {other}")),
        }
    };
    let (before, after) = (image("before", before)?, image("after", after)?);
    match op {
        Op::Create | Op::Read | Op::Update if after.is_none() => {
            return Err(format!("op `{}` without an `after` image", op.as_str()));
        }
        Op::Delete if before.is_none() && options.key_columns.is_empty() && key.is_none() => {
            return Err("delete without a `before` image or a message key".into());
        }
        _ => {}
    }
    let source = image("source", source)?;
    let ts_ms = match ts_ms {
        None | Some("null") => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| format!("`ts_ms` is not an integer: {raw}"))?,
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
        let row: Map<String, Value> =
            serde_json::from_str(row).map_err(|e| format!("row image is not JSON: {e}"))?;
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
        before,
        after,
        source,
        ts_ms,
        schema,
    }))
}

/// The Debezium schema of the row images in an envelope schema: the `fields` of its `after`
/// (else `before`) struct, as JSON text. `None` when the schema does not describe them.
pub fn row_fields(envelope_schema: &str) -> Option<String> {
    let schema: Value = serde_json::from_str(envelope_schema).ok()?;
    let members = schema.get("fields")?.as_array()?;
    let image = |name: &str| {
        members
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(name))
            .and_then(|f| f.get("fields"))
            .filter(|f| f.is_array())
    };
    image("after")
        .or_else(|| image("before"))
        .map(Value::to_string)
}

/// Why a value that is not an object was refused: not JSON at all, or JSON of another kind.
fn not_an_object(text: &str, e: &crate::json_fields::Malformed) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(_) => "value is not a JSON object".into(),
        Err(json) => format!("value is not JSON: {json} ({e})"),
    }
}

/// With schemas on, the converter wraps a key as `{"schema": …, "payload": …}`.
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

/// The members of `source` that order changes, by connector.
const POSITIONS: [&str; 7] = [
    "connector",
    "lsn",
    "file",
    "pos",
    "row",
    "change_lsn",
    "event_serial_no",
];

fn sequence(source: Option<&str>, ts_ms: Option<i64>, options: &Options) -> Result<String, String> {
    if let Some(field) = &options.sequence_field {
        let source = source.ok_or("no `source` block for the sequence field")?;
        let source: Value =
            serde_json::from_str(source).map_err(|e| format!("`source` is not JSON: {e}"))?;
        let mut value = Some(&source);
        for part in field.split('.') {
            value = value.and_then(|v| v.get(part));
        }
        let value = value
            .filter(|v| !v.is_null())
            .ok_or_else(|| format!("sequence field `source.{field}` is missing"))?;
        return padded(value, field);
    }
    if let Some(source) = source {
        let [connector, lsn, file, pos, row, change_lsn, serial] =
            fields(source, POSITIONS).map_err(|e| format!("`source` is not an object: {e}"))?;
        // A member's value, decoded (positions are small: numbers or short strings).
        let value = |raw: Option<&str>, what: &str| -> Result<Option<Value>, String> {
            match raw {
                None | Some("null") => Ok(None),
                Some(raw) => serde_json::from_str(raw)
                    .map(Some)
                    .map_err(|e| format!("`source.{what}` is not JSON: {e}")),
            }
        };
        match connector.and_then(plain_string).unwrap_or("") {
            "postgresql" => {
                if let Some(lsn) = value(lsn, "lsn")? {
                    return padded(&lsn, "source.lsn");
                }
            }
            "mysql" => {
                if let (Some(Value::String(file)), Some(pos)) =
                    (value(file, "file")?, value(pos, "pos")?)
                {
                    // mysql-bin.000042: the numeric suffix orders binlog files.
                    let number = file.rsplit('.').next().unwrap_or(&file);
                    let row = match value(row, "row")? {
                        Some(r) => padded(&r, "source.row")?,
                        None => "0".repeat(20),
                    };
                    return Ok(format!(
                        "{}:{}:{row}",
                        padded(&Value::String(number.to_string()), "source.file")?,
                        padded(&pos, "source.pos")?
                    ));
                }
            }
            "sqlserver" => {
                if let Some(Value::String(lsn)) = value(change_lsn, "change_lsn")? {
                    let serial = match value(serial, "event_serial_no")? {
                        Some(s) => padded(&s, "source.event_serial_no")?,
                        None => "0".repeat(20),
                    };
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

    fn change<'a>(
        key: Option<&str>,
        value: &'a str,
        options: &Options,
    ) -> Result<Change<'a>, String> {
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
        let wrapped = format!(r#"{{"schema":{{"type":"struct"}},"payload":{PG_UPDATE}}}"#);
        let on = change(
            Some(r#"{"schema":{"type":"struct"},"payload":{"id":7}}"#),
            &wrapped,
            &options,
        )
        .unwrap();
        assert_eq!(on.schema, Some(r#"{"type":"struct"}"#));
        assert_eq!(off, Change { schema: None, ..on });
        assert_eq!(off.op, Op::Update);
        assert_eq!(off.key, r#"{"id":7}"#);
        assert_eq!(off.sequence, "00000000000024023128");
        assert_eq!(off.after, Some(r#"{"id":7,"name":"b"}"#));
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
    fn the_row_schema_comes_from_the_after_struct_of_the_envelope_schema() {
        let schema = r#"{"type":"struct","fields":[
            {"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"}],"optional":true,"field":"before"},
            {"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"},
              {"type":"int32","optional":true,"name":"io.debezium.time.Date","field":"signup"}],"optional":true,"field":"after"},
            {"type":"string","optional":false,"field":"op"}],"optional":false,"name":"shop.Envelope"}"#;
        let wrapped = format!(r#"{{"schema":{schema},"payload":{PG_UPDATE}}}"#);
        let c = change(Some("1"), &wrapped, &Options::default()).expect("change");
        let fields = row_fields(c.schema.expect("schema kept")).expect("row fields");
        let fields: Value = serde_json::from_str(&fields).expect("JSON");
        assert_eq!(fields[1]["name"], "io.debezium.time.Date");
        assert_eq!(fields.as_array().map(Vec::len), Some(2));
        assert_eq!(row_fields(r#"{"type":"struct"}"#), None);
        // Schemas off: no schema.
        let off = change(Some("1"), PG_UPDATE, &Options::default()).expect("change");
        assert_eq!(off.schema, None);
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
        assert!(bad(r#"{"after":{1 2 ::},"op":"c","ts_ms":1}"#).contains("not valid JSON"));
    }
}
