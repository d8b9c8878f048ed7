//! Column types from the Debezium schema of change events' row images (the bronze change
//! table's `row_schema`, the JsonConverter's description of the `after` struct), and how each
//! field's JSON value is read: Debezium encodes dates as days, timestamps as milli-, micro- or
//! nanoseconds by logical type, and exact decimals (`decimal.handling.mode=precise`) as base64
//! bytes of the unscaled integer.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Decimal128Array, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::error::ArrowError;
use base64::Engine as _;
use medallion_spec::ColumnType;
use serde_json::Value;

/// How a row-image field's JSON value becomes the column's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decode {
    /// Read as the column's own type.
    AsIs,
    /// A number of this unit since the epoch, stored in microseconds.
    Timestamp(TimeUnit),
    /// Base64 of the big-endian two's-complement unscaled integer, at this scale.
    DecimalBytes { scale: i8 },
}

impl Decode {
    /// The type the JSON reader decodes the field as.
    pub(crate) fn read_type(self, stored: &DataType) -> DataType {
        match self {
            Decode::AsIs => stored.clone(),
            Decode::Timestamp(unit) => DataType::Timestamp(unit, Some("UTC".into())),
            Decode::DecimalBytes { .. } => DataType::Utf8,
        }
    }

    /// Turns a field read as [`Decode::read_type`] into the stored type.
    pub(crate) fn convert(
        self,
        read: &ArrayRef,
        stored: &DataType,
    ) -> Result<ArrayRef, ArrowError> {
        match self {
            Decode::AsIs => Ok(read.clone()),
            Decode::Timestamp(_) => strict_cast(read, stored),
            Decode::DecimalBytes { scale } => {
                let text = read
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| ArrowError::CastError("decimal bytes are not text".into()))?;
                let unscaled = text
                    .iter()
                    .map(|v| v.map(unscaled_decimal).transpose())
                    .collect::<Result<Vec<Option<i128>>, _>>()?;
                let decimals: ArrayRef =
                    Arc::new(Decimal128Array::from(unscaled).with_precision_and_scale(38, scale)?);
                strict_cast(&decimals, stored)
            }
        }
    }
}

/// A cast that fails where a value does not fit (a safe cast would make it null).
fn strict_cast(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, ArrowError> {
    let options = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    cast_with_options(array, to, &options)
}

/// The unscaled value of a Debezium precise decimal: base64 of a big-endian two's-complement
/// integer of at most 16 bytes.
fn unscaled_decimal(encoded: &str) -> Result<i128, ArrowError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| {
            ArrowError::ParseError(format!("decimal bytes `{encoded}` are not base64: {e}"))
        })?;
    if bytes.len() > 16 {
        return Err(ArrowError::ParseError(format!(
            "decimal bytes `{encoded}` hold {} bytes, more than a 38-digit decimal",
            bytes.len()
        )));
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut full = if negative { [0xff; 16] } else { [0; 16] };
    full[16 - bytes.len()..].copy_from_slice(&bytes);
    Ok(i128::from_be_bytes(full))
}

/// One field of a row schema: the column type it maps to and how its values are read, or why
/// it cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldType {
    pub(crate) column: Result<ColumnType, String>,
    pub(crate) decode: Decode,
}

/// The fields of a row schema by name.
#[derive(Debug, Clone, Default)]
pub(crate) struct RowSchema {
    fields: BTreeMap<String, FieldType>,
}

impl RowSchema {
    /// Parses a `row_schema` value (a JSON array of Connect field schemas).
    pub(crate) fn parse(text: &str) -> Result<RowSchema, String> {
        let fields: Vec<Value> = serde_json::from_str(text)
            .map_err(|e| format!("row schema is not a JSON array: {e}"))?;
        let mut out = BTreeMap::new();
        for field in &fields {
            let Some(name) = field.get("field").and_then(Value::as_str) else {
                continue;
            };
            out.insert(name.to_string(), field_type(field));
        }
        Ok(RowSchema { fields: out })
    }

    pub(crate) fn get(&self, field: &str) -> Option<&FieldType> {
        self.fields.get(field)
    }
}

/// The last row schema among change rows (their `row_schema` column), if any.
pub(crate) fn find_last(batch: &RecordBatch) -> Option<&str> {
    let column = batch
        .column_by_name(medallion_spec::ROW_SCHEMA)?
        .as_any()
        .downcast_ref::<StringArray>()?;
    (0..column.len())
        .rev()
        .find(|&i| column.is_valid(i))
        .map(|i| column.value(i))
}

/// Maps one Connect field schema (`type`, logical `name`, `parameters`).
fn field_type(field: &Value) -> FieldType {
    let kind = field.get("type").and_then(Value::as_str).unwrap_or("");
    let logical = field.get("name").and_then(Value::as_str).unwrap_or("");
    // Some(Err) for a parameter that is there but not a small non-negative number.
    let parameter = |name: &str| {
        field.get("parameters").and_then(|p| p.get(name)).map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
                .parse::<u8>()
                .map_err(|_| format!("decimal {name} `{v}` is not a number from 0 to 255"))
        })
    };
    let plain = |t: ColumnType| FieldType {
        column: Ok(t),
        decode: Decode::AsIs,
    };
    let timestamp = |unit| FieldType {
        column: Ok(ColumnType::Timestamp),
        decode: Decode::Timestamp(unit),
    };
    let refused = |why: String| FieldType {
        column: Err(why),
        decode: Decode::AsIs,
    };
    match (kind, logical) {
        ("int32", "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => {
            plain(ColumnType::Date)
        }
        ("int8" | "int16" | "int32", _) => plain(ColumnType::Int32),
        ("int64", "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
            timestamp(TimeUnit::Millisecond)
        }
        ("int64", "io.debezium.time.MicroTimestamp") => timestamp(TimeUnit::Microsecond),
        ("int64", "io.debezium.time.NanoTimestamp") => timestamp(TimeUnit::Nanosecond),
        ("int64", _) => plain(ColumnType::Int64),
        ("float" | "float32" | "float64" | "double", _) => plain(ColumnType::Float64),
        ("boolean", _) => plain(ColumnType::Bool),
        ("string", "io.debezium.time.ZonedTimestamp") => plain(ColumnType::Timestamp),
        ("string", _) => plain(ColumnType::String),
        ("bytes", "org.apache.kafka.connect.data.Decimal") => {
            let (scale, precision) = match (
                parameter("scale").unwrap_or(Ok(0)),
                // Connectors give the column's precision when they know it; 38 holds any.
                parameter("connect.decimal.precision").unwrap_or(Ok(38)),
            ) {
                (Ok(scale), Ok(precision)) => (scale, precision.clamp(1, 38)),
                (Err(why), _) | (_, Err(why)) => return refused(why),
            };
            if scale > precision {
                return refused(format!("decimal scale {scale} above precision {precision}"));
            }
            FieldType {
                column: Ok(ColumnType::Decimal { precision, scale }),
                decode: Decode::DecimalBytes {
                    scale: scale as i8,
                },
            }
        }
        ("bytes", _) => plain(ColumnType::String),
        ("struct", "io.debezium.data.VariableScaleDecimal") => refused(
            "a variable-scale decimal (set decimal.handling.mode=string on the connector and declare the column's type)"
                .into(),
        ),
        (other, _) => refused(format!(
            "Debezium type `{other}` has no column type (declare one)"
        )),
    }
}

/// Converts a batch read with each field's [`Decode::read_type`] into the stored types.
pub(crate) fn convert_batch(
    read: RecordBatch,
    stored: &[Field],
    decode: &[Decode],
) -> Result<RecordBatch, ArrowError> {
    if decode.iter().all(|d| *d == Decode::AsIs) {
        return Ok(read);
    }
    let columns = read
        .columns()
        .iter()
        .zip(stored.iter().zip(decode))
        .map(|(column, (field, d))| d.convert(column, field.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    let fields: Vec<Field> = read
        .schema()
        .fields()
        .iter()
        .zip(stored)
        .map(|(f, s)| Field::new(f.name(), s.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, TimestampMillisecondArray};
    use arrow::datatypes::Decimal128Type;

    #[test]
    fn connect_types_map_to_column_types_and_readers() {
        let schema = RowSchema::parse(
            r#"[{"type":"int64","optional":false,"field":"id"},
                {"type":"int32","optional":true,"name":"io.debezium.time.Date","field":"signup"},
                {"type":"int64","optional":true,"name":"io.debezium.time.Timestamp","field":"seen"},
                {"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"12"},"field":"balance"},
                {"type":"struct","optional":true,"name":"io.debezium.data.VariableScaleDecimal","field":"odd"},
                {"type":"string","optional":true,"field":"name"}]"#,
        )
        .expect("schema");
        let column = |f: &str| schema.get(f).expect("field").column.clone();
        assert_eq!(column("id"), Ok(ColumnType::Int64));
        assert_eq!(column("signup"), Ok(ColumnType::Date));
        assert_eq!(column("seen"), Ok(ColumnType::Timestamp));
        assert_eq!(
            schema.get("seen").map(|f| f.decode),
            Some(Decode::Timestamp(TimeUnit::Millisecond))
        );
        assert_eq!(
            column("balance"),
            Ok(ColumnType::Decimal {
                precision: 12,
                scale: 2
            })
        );
        assert!(column("odd").is_err_and(|e| e.contains("decimal.handling.mode")));
        let negative = RowSchema::parse(
            r#"[{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"-2"},"field":"d"}]"#,
        )
        .expect("schema");
        assert!(
            negative
                .get("d")
                .expect("d")
                .column
                .clone()
                .is_err_and(|e| e.contains("scale"))
        );
        assert_eq!(column("name"), Ok(ColumnType::String));
        assert!(schema.get("missing").is_none());
    }

    #[test]
    fn precise_decimals_and_millisecond_timestamps_are_converted() {
        // 1234.56 is 123456 unscaled: 0x01E240; -1.00 is -100: 0xFF9C.
        let read: ArrayRef = Arc::new(StringArray::from(vec![Some("AeJA"), Some("/5w="), None]));
        let stored = DataType::Decimal128(12, 2);
        let decimals = Decode::DecimalBytes { scale: 2 }
            .convert(&read, &stored)
            .expect("decimals");
        let decimals = decimals.as_primitive::<Decimal128Type>();
        assert_eq!(decimals.value(0), 123_456);
        assert_eq!(decimals.value(1), -100);
        assert!(decimals.is_null(2));
        let bad: ArrayRef = Arc::new(StringArray::from(vec!["not base64!"]));
        assert!(
            Decode::DecimalBytes { scale: 2 }
                .convert(&bad, &stored)
                .is_err()
        );

        let ms: ArrayRef =
            Arc::new(TimestampMillisecondArray::from(vec![1_700_000_000_123]).with_timezone("UTC"));
        let stored = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let us = Decode::Timestamp(TimeUnit::Millisecond)
            .convert(&ms, &stored)
            .expect("timestamps");
        assert_eq!(
            us.as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            1_700_000_000_123_000
        );
    }
}
