//! PostgreSQL binary COPY encoding of Arrow record batches.
//!
//! Each batch's columns are downcast once; the row loop then writes straight into one
//! `BytesMut` (no per-row allocation). Format: <https://www.postgresql.org/docs/current/sql-copy.html>.

use arrow::array::{
    Array, AsArray, BooleanArray, LargeStringArray, RecordBatch, StringArray, StringViewArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Schema, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampSecondType,
};
use bytes::{BufMut, BytesMut};

use crate::QualifiedName;
use crate::error::{Error, Result};

/// Signature, flags (no OIDs) and an empty header extension.
pub(crate) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The file trailer: a tuple field count of -1.
pub(crate) const TRAILER: &[u8] = &(-1i16).to_be_bytes();

/// Days from 1970-01-01 (Arrow) to 2000-01-01 (PostgreSQL).
pub(crate) const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
pub(crate) const PG_EPOCH_MICROS: i64 = PG_EPOCH_DAYS as i64 * 86_400 * 1_000_000;

enum Values<'a> {
    Utf8(&'a StringArray),
    LargeUtf8(&'a LargeStringArray),
    Utf8View(&'a StringViewArray),
    Bool(&'a BooleanArray),
    I16(&'a [i16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    F32(&'a [f32]),
    F64(&'a [f64]),
    /// Days since the Unix epoch.
    Date(&'a [i32]),
    /// Timestamps since the Unix epoch in units of `micros_per_unit` microseconds.
    Timestamp {
        values: &'a [i64],
        micros_per_unit: i64,
    },
    Decimal {
        values: &'a [i128],
        scale: u32,
    },
}

struct Column<'a> {
    name: &'a str,
    nulls: Option<&'a NullBuffer>,
    values: Values<'a>,
}

/// Appends the binary COPY tuples for every row of `batch` to `buf`.
///
/// `schema` is the declared load schema; the batch must have the same column count and types.
pub(crate) fn encode_batch(
    table: &QualifiedName,
    schema: &Schema,
    batch: &RecordBatch,
    buf: &mut BytesMut,
) -> Result<()> {
    let mismatch = |column: &str, detail: String| Error::BatchSchema {
        table: table.clone(),
        column: column.to_owned(),
        detail,
    };
    if batch.num_columns() != schema.fields().len() {
        return Err(mismatch(
            "",
            format!(
                "batch has {} columns, schema has {}",
                batch.num_columns(),
                schema.fields().len()
            ),
        ));
    }
    let field_count = i16::try_from(schema.fields().len())
        .map_err(|_| mismatch("", "too many columns for PostgreSQL".to_owned()))?;

    let mut columns = Vec::with_capacity(schema.fields().len());
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let name = field.name().as_str();
        if array.data_type() != field.data_type() {
            return Err(mismatch(
                name,
                format!(
                    "batch has type {}, schema declares {}",
                    array.data_type(),
                    field.data_type()
                ),
            ));
        }
        let values = column_values(array.as_ref()).ok_or_else(|| Error::UnsupportedType {
            table: table.clone(),
            column: name.to_owned(),
            data_type: field.data_type().clone(),
        })?;
        columns.push(Column {
            name,
            nulls: array.nulls(),
            values,
        });
    }

    // A rough lower bound: field count plus a length word per cell.
    buf.reserve(batch.num_rows() * (2 + 8 * columns.len()));
    for row in 0..batch.num_rows() {
        buf.put_i16(field_count);
        for column in &columns {
            if column.nulls.is_some_and(|nulls| nulls.is_null(row)) {
                buf.put_i32(-1);
                continue;
            }
            let out_of_range = |detail| Error::ValueOutOfRange {
                table: table.clone(),
                column: column.name.to_owned(),
                row,
                detail,
            };
            match &column.values {
                Values::Utf8(a) => put_text(buf, a.value(row)).map_err(out_of_range)?,
                Values::LargeUtf8(a) => put_text(buf, a.value(row)).map_err(out_of_range)?,
                Values::Utf8View(a) => put_text(buf, a.value(row)).map_err(out_of_range)?,
                Values::Bool(a) => {
                    buf.put_i32(1);
                    buf.put_u8(u8::from(a.value(row)));
                }
                Values::I16(v) => {
                    buf.put_i32(2);
                    buf.put_i16(v[row]);
                }
                Values::I32(v) => {
                    buf.put_i32(4);
                    buf.put_i32(v[row]);
                }
                Values::I64(v) => {
                    buf.put_i32(8);
                    buf.put_i64(v[row]);
                }
                Values::F32(v) => {
                    buf.put_i32(4);
                    buf.put_f32(v[row]);
                }
                Values::F64(v) => {
                    buf.put_i32(8);
                    buf.put_f64(v[row]);
                }
                Values::Date(v) => {
                    let days = v[row]
                        .checked_sub(PG_EPOCH_DAYS)
                        .ok_or_else(|| out_of_range("date out of PostgreSQL's range"))?;
                    buf.put_i32(4);
                    buf.put_i32(days);
                }
                Values::Timestamp {
                    values,
                    micros_per_unit,
                } => {
                    let micros = values[row]
                        .checked_mul(*micros_per_unit)
                        .and_then(|us| us.checked_sub(PG_EPOCH_MICROS))
                        .ok_or_else(|| out_of_range("timestamp out of PostgreSQL's range"))?;
                    buf.put_i32(8);
                    buf.put_i64(micros);
                }
                Values::Decimal { values, scale } => put_numeric(buf, values[row], *scale),
            }
        }
    }
    Ok(())
}

fn column_values(array: &dyn Array) -> Option<Values<'_>> {
    Some(match array.data_type() {
        DataType::Utf8 => Values::Utf8(array.as_string_opt::<i32>()?),
        DataType::LargeUtf8 => Values::LargeUtf8(array.as_string_opt::<i64>()?),
        DataType::Utf8View => Values::Utf8View(array.as_string_view_opt()?),
        DataType::Boolean => Values::Bool(array.as_boolean_opt()?),
        DataType::Int16 => Values::I16(array.as_primitive_opt::<Int16Type>()?.values()),
        DataType::Int32 => Values::I32(array.as_primitive_opt::<Int32Type>()?.values()),
        DataType::Int64 => Values::I64(array.as_primitive_opt::<Int64Type>()?.values()),
        DataType::Float32 => Values::F32(array.as_primitive_opt::<Float32Type>()?.values()),
        DataType::Float64 => Values::F64(array.as_primitive_opt::<Float64Type>()?.values()),
        DataType::Date32 => Values::Date(array.as_primitive_opt::<Date32Type>()?.values()),
        DataType::Timestamp(TimeUnit::Second, _) => Values::Timestamp {
            values: array.as_primitive_opt::<TimestampSecondType>()?.values(),
            micros_per_unit: 1_000_000,
        },
        DataType::Timestamp(TimeUnit::Millisecond, _) => Values::Timestamp {
            values: array
                .as_primitive_opt::<TimestampMillisecondType>()?
                .values(),
            micros_per_unit: 1_000,
        },
        DataType::Timestamp(TimeUnit::Microsecond, _) => Values::Timestamp {
            values: array
                .as_primitive_opt::<TimestampMicrosecondType>()?
                .values(),
            micros_per_unit: 1,
        },
        // The type map only admits 0 <= scale <= precision <= 38.
        DataType::Decimal128(precision, scale)
            if *precision <= 38 && *scale >= 0 && scale.unsigned_abs() <= *precision =>
        {
            Values::Decimal {
                values: array.as_primitive_opt::<Decimal128Type>()?.values(),
                scale: u32::from(scale.unsigned_abs()),
            }
        }
        _ => return None,
    })
}

fn put_text(buf: &mut BytesMut, value: &str) -> Result<(), &'static str> {
    let len = i32::try_from(value.len()).map_err(|_| "string longer than 2 GiB")?;
    buf.put_i32(len);
    buf.put_slice(value.as_bytes());
    Ok(())
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;

/// Writes a length-prefixed PostgreSQL `numeric` in binary form for the decimal
/// `value * 10^-scale` (`scale <= 38`).
///
/// The wire form is `ndigits, weight, sign, dscale` (each 16 bits) followed by `ndigits`
/// base-10000 digits, most significant first, where the value is
/// `sum(digit[i] * 10000^(weight - i))`. Like PostgreSQL itself we strip leading and trailing
/// zero digits, so the bytes equal `numeric_send()` of the same value.
pub(crate) fn put_numeric(buf: &mut BytesMut, value: i128, scale: u32) {
    // |i128| < 2^127 ≈ 1.7e38: at most 39 decimal digits, i.e. 10 base-10000 groups on each
    // side of the point.
    const GROUPS: usize = 10;
    let magnitude = value.unsigned_abs();
    let pow = 10u128.pow(scale);
    let mut int_part = magnitude / pow;
    let mut frac_part = magnitude % pow;

    // Integer groups, least significant first.
    let mut int_groups = [0i16; GROUPS];
    let mut n_int = 0;
    while int_part > 0 {
        int_groups[n_int] = (int_part % 10_000) as i16;
        int_part /= 10_000;
        n_int += 1;
    }

    // Fraction groups, most significant first. The last group holds the `scale % 4` lowest
    // digits shifted left to fill four places (0.01 → group 0100).
    let n_frac = scale.div_ceil(4) as usize;
    let mut frac_groups = [0i16; GROUPS];
    let mut idx = n_frac;
    let partial = scale % 4;
    if partial != 0 {
        let p = 10u128.pow(partial);
        idx -= 1;
        frac_groups[idx] = ((frac_part % p) * 10u128.pow(4 - partial)) as i16;
        frac_part /= p;
    }
    while idx > 0 {
        idx -= 1;
        frac_groups[idx] = (frac_part % 10_000) as i16;
        frac_part /= 10_000;
    }

    let mut digits = [0i16; 2 * GROUPS];
    let mut n = 0;
    for &group in int_groups[..n_int].iter().rev() {
        digits[n] = group;
        n += 1;
    }
    for &group in &frac_groups[..n_frac] {
        digits[n] = group;
        n += 1;
    }

    let mut weight = n_int as i16 - 1;
    let mut start = 0;
    while start < n && digits[start] == 0 {
        start += 1;
        weight -= 1;
    }
    let mut end = n;
    while end > start && digits[end - 1] == 0 {
        end -= 1;
    }
    let (weight, sign) = if start == end {
        (0, NUMERIC_POS)
    } else if value < 0 {
        (weight, NUMERIC_NEG)
    } else {
        (weight, NUMERIC_POS)
    };
    let ndigits = end - start;

    buf.put_i32(8 + 2 * ndigits as i32);
    buf.put_i16(ndigits as i16);
    buf.put_i16(weight);
    buf.put_u16(sign);
    buf.put_u16(scale as u16);
    for &digit in &digits[start..end] {
        buf.put_i16(digit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(value: i128, scale: u32) -> Vec<u8> {
        let mut buf = BytesMut::new();
        put_numeric(&mut buf, value, scale);
        // Drop the length prefix, checking it.
        let body = buf.split_off(4);
        assert_eq!(buf.as_ref(), (body.len() as i32).to_be_bytes());
        body.to_vec()
    }

    fn words(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(ndigits.to_be_bytes());
        out.extend(weight.to_be_bytes());
        out.extend(sign.to_be_bytes());
        out.extend(dscale.to_be_bytes());
        for d in digits {
            out.extend(d.to_be_bytes());
        }
        out
    }

    #[test]
    fn numeric_layout_by_hand() {
        assert_eq!(numeric(0, 2), words(0, 0, 0, 2, &[]));
        assert_eq!(numeric(-1, 2), words(1, -1, 0x4000, 2, &[100]));
        assert_eq!(numeric(1, 4), words(1, -1, 0, 4, &[1]));
        assert_eq!(
            numeric(123_456_789_012_345_678, 4),
            words(5, 3, 0, 4, &[12, 3456, 7890, 1234, 5678])
        );
        assert_eq!(numeric(100, 2), words(1, 0, 0, 2, &[1]));
        assert_eq!(numeric(100_000_000, 4), words(1, 1, 0, 4, &[1]));
        assert_eq!(numeric(1234, 8), words(1, -2, 0, 8, &[1234]));
    }

    #[test]
    fn epoch_constants_match_chrono() {
        let unix = chrono::DateTime::UNIX_EPOCH;
        let pg = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|dt| dt.and_utc());
        let Some(pg) = pg else {
            panic!("2000-01-01 is a valid date");
        };
        assert_eq!((pg - unix).num_days(), i64::from(PG_EPOCH_DAYS));
        assert_eq!((pg - unix).num_microseconds(), Some(PG_EPOCH_MICROS));
    }

    /// Compares our bytes with `numeric_send()` — PostgreSQL's own encoder — for the same
    /// literal. Needs the local test server (MEDALLION_TEST_PG_URL overrides the default).
    #[tokio::test]
    async fn numeric_matches_postgres_numeric_send() -> Result<(), Box<dyn std::error::Error>> {
        let url = std::env::var("MEDALLION_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        let nines38: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999;
        let cases: &[(i128, u32, &str)] = &[
            (0, 0, "0"),
            (0, 2, "0.00"),
            (-1, 2, "-0.01"),
            (1, 4, "0.0001"),
            (123_456_789_012_345_678, 4, "12345678901234.5678"),
            (-123_456_789_012_345_678, 4, "-12345678901234.5678"),
            (100, 2, "1.00"),
            (100_000_000, 0, "100000000"),
            (1_000_000_010_000, 6, "1000000.010000"),
            (1234, 8, "0.00001234"),
            (5, 1, "0.5"),
            (nines38, 0, "99999999999999999999999999999999999999"),
            (-nines38, 4, "-9999999999999999999999999999999999.9999"),
            (nines38, 38, "0.99999999999999999999999999999999999999"),
            (1, 38, "0.00000000000000000000000000000000000001"),
            (i128::MAX, 0, "170141183460469231731687303715884105727"),
            (i128::MIN, 3, "-170141183460469231731687303715884105.728"),
        ];
        for &(value, scale, text) in cases {
            let row = client
                .query_one("SELECT numeric_send($1::text::numeric)", &[&text])
                .await?;
            let expected: Vec<u8> = row.try_get(0)?;
            assert_eq!(numeric(value, scale), expected, "{text}");
        }
        drop(client);
        connection.await??;
        Ok(())
    }
}
