//! The Arrow → PostgreSQL type map.

use arrow::datatypes::{DECIMAL128_MAX_PRECISION, DataType, TimeUnit};

/// The PostgreSQL column type for an Arrow type, spelled exactly as `format_type()` renders
/// it, so the same string serves for DDL and for comparing against an existing table.
pub(crate) fn pg_type(data_type: &DataType) -> Option<String> {
    let name = match data_type {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "text",
        DataType::Boolean => "boolean",
        DataType::Int16 => "smallint",
        DataType::Int32 => "integer",
        DataType::Int64 => "bigint",
        DataType::Float32 => "real",
        DataType::Float64 => "double precision",
        DataType::Date32 => "date",
        DataType::Timestamp(
            TimeUnit::Second | TimeUnit::Millisecond | TimeUnit::Microsecond,
            tz,
        ) => {
            if tz.is_some() {
                "timestamp with time zone"
            } else {
                "timestamp without time zone"
            }
        }
        // Arrow allows a negative scale and a scale above the precision; PostgreSQL's
        // numeric(p,s) column type does not, and our encoder relies on 0 <= s <= p <= 38.
        DataType::Decimal128(precision, scale)
            if (1..=DECIMAL128_MAX_PRECISION).contains(precision)
                && *scale >= 0
                && scale.unsigned_abs() <= *precision =>
        {
            return Some(format!("numeric({precision},{scale})"));
        }
        _ => return None,
    };
    Some(name.to_owned())
}

/// The Amazon Redshift column type for an Arrow type (the ones [`pg_type`] accepts). Strings
/// get Redshift's widest VARCHAR: its `TEXT` is only VARCHAR(256).
pub(crate) fn redshift_type(data_type: &DataType) -> Option<String> {
    let name = match data_type {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "VARCHAR(65535)",
        DataType::Boolean => "BOOLEAN",
        DataType::Int16 => "SMALLINT",
        DataType::Int32 => "INTEGER",
        DataType::Int64 => "BIGINT",
        DataType::Float32 => "REAL",
        DataType::Float64 => "DOUBLE PRECISION",
        DataType::Date32 => "DATE",
        DataType::Timestamp(
            TimeUnit::Second | TimeUnit::Millisecond | TimeUnit::Microsecond,
            tz,
        ) => {
            if tz.is_some() {
                "TIMESTAMPTZ"
            } else {
                "TIMESTAMP"
            }
        }
        DataType::Decimal128(precision, scale)
            if (1..=DECIMAL128_MAX_PRECISION).contains(precision)
                && *scale >= 0
                && scale.unsigned_abs() <= *precision =>
        {
            return Some(format!("DECIMAL({precision},{scale})"));
        }
        _ => return None,
    };
    Some(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_supported_types() {
        let cases = [
            (DataType::Utf8, "text"),
            (DataType::Utf8View, "text"),
            (DataType::LargeUtf8, "text"),
            (DataType::Int32, "integer"),
            (DataType::Int64, "bigint"),
            (DataType::Float64, "double precision"),
            (DataType::Boolean, "boolean"),
            (DataType::Date32, "date"),
            (
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                "timestamp with time zone",
            ),
            (
                DataType::Timestamp(TimeUnit::Microsecond, None),
                "timestamp without time zone",
            ),
            (DataType::Decimal128(38, 10), "numeric(38,10)"),
        ];
        for (arrow, pg) in cases {
            assert_eq!(pg_type(&arrow).as_deref(), Some(pg), "{arrow}");
        }
    }

    #[test]
    fn rejects_what_postgres_cannot_hold_exactly() {
        for arrow in [
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            DataType::Decimal128(10, -2),
            DataType::Decimal128(5, 6),
            DataType::Decimal128(39, 0),
            DataType::Binary,
            DataType::UInt64,
        ] {
            assert_eq!(pg_type(&arrow), None, "{arrow}");
        }
    }
}
