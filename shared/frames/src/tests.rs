//! Tests for the polars <-> arrow-rs conversion. Expected values are written out literally or
//! computed directly from the input vectors, never through the code under test.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array,
    Int64Array, RecordBatch, StringArray, StringViewArray, TimestampMicrosecondArray,
};
use arrow::compute::concat_batches;
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Field, Float64Type, Int32Type, Int64Type, Schema,
    SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use polars::prelude::{DataType as PlDataType, IntoLazy, TimeUnit as PlTimeUnit, col};

use super::*;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn one_batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> (SchemaRef, RecordBatch) {
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).expect("valid test batch");
    (schema, batch)
}

/// Converts arrow -> polars -> arrow and returns the single output column, concatenated.
fn round_trip_column(field: Field, array: ArrayRef) -> std::result::Result<ArrayRef, Error> {
    let (schema, batch) = one_batch(vec![field], vec![array]);
    let df = frame_from_batches(&schema, &[batch])?;
    let (out_schema, out) = batches_from_frame(&df, 1024)?;
    let out = concat_batches(&out_schema, &out).map_err(Error::RecordBatch)?;
    Ok(Arc::clone(out.column(0)))
}

#[test]
fn utf8_view_round_trips_with_nulls() -> TestResult {
    let input = StringViewArray::from(vec![
        Some("a"),
        None,
        Some("a string longer than twelve bytes"),
        Some(""),
    ]);
    let out = round_trip_column(
        Field::new("s", DataType::Utf8View, true),
        Arc::new(input.clone()),
    )?;
    assert_eq!(out.data_type(), &DataType::Utf8View);
    assert_eq!(out.as_string_view(), &input);
    Ok(())
}

#[test]
fn utf8_becomes_utf8_view_with_same_values() -> TestResult {
    let values = vec![
        Some("x"),
        None,
        Some("a string longer than twelve bytes"),
        Some(""),
    ];
    let out = round_trip_column(
        Field::new("s", DataType::Utf8, true),
        Arc::new(StringArray::from(values.clone())),
    )?;
    assert_eq!(out.data_type(), &DataType::Utf8View);
    assert_eq!(out.as_string_view(), &StringViewArray::from(values));
    Ok(())
}

#[test]
fn primitives_round_trip_with_nulls() -> TestResult {
    let i32s = Int32Array::from(vec![Some(i32::MIN), None, Some(0), Some(i32::MAX)]);
    let out = round_trip_column(
        Field::new("i32", DataType::Int32, true),
        Arc::new(i32s.clone()),
    )?;
    assert_eq!(out.as_primitive::<Int32Type>(), &i32s);

    let i64s = Int64Array::from(vec![Some(i64::MIN), Some(-1), None, Some(i64::MAX)]);
    let out = round_trip_column(
        Field::new("i64", DataType::Int64, true),
        Arc::new(i64s.clone()),
    )?;
    assert_eq!(out.as_primitive::<Int64Type>(), &i64s);

    let f64s = Float64Array::from(vec![
        Some(0.1),
        None,
        Some(-1.5e300),
        Some(f64::MIN_POSITIVE),
    ]);
    let out = round_trip_column(
        Field::new("f64", DataType::Float64, true),
        Arc::new(f64s.clone()),
    )?;
    assert_eq!(out.as_primitive::<Float64Type>(), &f64s);

    let bools = BooleanArray::from(vec![Some(true), None, Some(false), Some(true)]);
    let out = round_trip_column(
        Field::new("b", DataType::Boolean, true),
        Arc::new(bools.clone()),
    )?;
    assert_eq!(out.as_boolean(), &bools);

    let dates = Date32Array::from(vec![Some(0), None, Some(19_723), Some(-719_162)]);
    let out = round_trip_column(
        Field::new("d", DataType::Date32, true),
        Arc::new(dates.clone()),
    )?;
    assert_eq!(out.data_type(), &DataType::Date32);
    assert_eq!(out.as_primitive::<Date32Type>(), &dates);
    Ok(())
}

#[test]
fn timestamps_round_trip_with_and_without_time_zone() -> TestResult {
    let values = vec![Some(1_700_000_000_123_456_i64), None, Some(-1), Some(0)];
    for tz in [Some("UTC"), None] {
        let input = TimestampMicrosecondArray::from(values.clone()).with_timezone_opt(tz);
        let data_type = DataType::Timestamp(TimeUnit::Microsecond, tz.map(Into::into));
        let out = round_trip_column(
            Field::new("ts", data_type.clone(), true),
            Arc::new(input.clone()),
        )?;
        assert_eq!(out.data_type(), &data_type);
        assert_eq!(out.as_primitive::<TimestampMicrosecondType>(), &input);
    }
    Ok(())
}

#[test]
fn decimals_round_trip_exactly() -> TestResult {
    let input = Decimal128Array::from(vec![
        Some(123_456_789_012_345_678_901_234_567_890_i128),
        None,
        Some(-1),
        Some(0),
        Some(10_i128.pow(37) - 1),
    ])
    .with_precision_and_scale(38, 4)?;
    let out = round_trip_column(
        Field::new("amount", DataType::Decimal128(38, 4), true),
        Arc::new(input.clone()),
    )?;
    assert_eq!(out.data_type(), &DataType::Decimal128(38, 4));
    assert_eq!(out.as_primitive::<Decimal128Type>(), &input);

    let small = Decimal128Array::from(vec![Some(1999), None]).with_precision_and_scale(10, 2)?;
    let out = round_trip_column(
        Field::new("price", DataType::Decimal128(10, 2), true),
        Arc::new(small.clone()),
    )?;
    assert_eq!(out.as_primitive::<Decimal128Type>(), &small);
    Ok(())
}

#[test]
fn polars_sees_the_expected_dtypes_and_names() -> TestResult {
    let (schema, batch) = one_batch(
        vec![
            Field::new("Name With Spaces", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(12, 2), true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("day", DataType::Date32, false),
        ],
        vec![
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Decimal128Array::from(vec![1]).with_precision_and_scale(12, 2)?),
            Arc::new(TimestampMicrosecondArray::from(vec![1]).with_timezone("UTC")),
            Arc::new(Date32Array::from(vec![1])),
        ],
    );
    let df = frame_from_batches(&schema, &[batch])?;
    let names: Vec<&str> = df
        .get_column_names()
        .into_iter()
        .map(|n| n.as_str())
        .collect();
    assert_eq!(names, ["Name With Spaces", "amount", "at", "day"]);
    let dtypes = df.dtypes();
    assert_eq!(dtypes[0], PlDataType::String);
    assert_eq!(dtypes[1], PlDataType::Decimal(12, 2));
    assert!(
        matches!(&dtypes[2], PlDataType::Datetime(PlTimeUnit::Microseconds, Some(tz)) if tz.as_str() == "UTC")
    );
    assert_eq!(dtypes[3], PlDataType::Date);

    let (out_schema, _) = batches_from_frame(&df, 10)?;
    let out_names: Vec<&String> = out_schema.fields().iter().map(|f| f.name()).collect();
    assert_eq!(out_names, ["Name With Spaces", "amount", "at", "day"]);
    Ok(())
}

#[test]
fn million_rows_round_trip_without_copying_buffers() -> TestResult {
    const ROWS: usize = 1_000_000;
    // Every string is longer than 12 bytes, so it lives in a data buffer rather than inline.
    let strings: Vec<String> = (0..ROWS).map(|i| format!("customer-{i:012}")).collect();
    let view_input = StringViewArray::from_iter_values(strings.iter());
    let utf8_input = StringArray::from_iter_values(strings.iter());
    let ints = Int64Array::from_iter_values((0..ROWS as i64).map(|i| i * 7));
    let (schema, batch) = one_batch(
        vec![
            Field::new("view", DataType::Utf8View, false),
            Field::new("utf8", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ],
        vec![
            Arc::new(view_input.clone()),
            Arc::new(utf8_input.clone()),
            Arc::new(ints.clone()),
        ],
    );

    let df = frame_from_batches(&schema, &[batch])?;
    assert_eq!(df.height(), ROWS);
    let (out_schema, out) = batches_from_frame(&df, ROWS)?;
    assert_eq!(out.len(), 1);
    let out = &out[0];
    assert_eq!(out_schema.fields().len(), 3);

    let view_out = out.column(0).as_string_view();
    assert_eq!(view_out, &view_input);
    assert_eq!(
        view_out.data_buffers().len(),
        view_input.data_buffers().len()
    );
    for (a, b) in view_out
        .data_buffers()
        .iter()
        .zip(view_input.data_buffers())
    {
        assert_eq!(a.as_ptr(), b.as_ptr(), "Utf8View string bytes were copied");
    }
    assert_eq!(
        view_out.views().inner().as_ptr(),
        view_input.views().inner().as_ptr(),
        "Utf8View views were copied"
    );

    // Utf8 input: polars builds views, but the string bytes stay in the original buffer.
    let utf8_out = out.column(1).as_string_view();
    assert_eq!(utf8_out.len(), ROWS);
    assert!(
        utf8_out
            .iter()
            .zip(&strings)
            .all(|(a, b)| a == Some(b.as_str()))
    );
    assert_eq!(
        utf8_out.data_buffers()[0].as_ptr(),
        utf8_input.values().as_ptr(),
        "Utf8 string bytes were copied"
    );

    let ints_out = out.column(2).as_primitive::<Int64Type>();
    assert_eq!(ints_out, &ints);
    assert_eq!(
        ints_out.values().inner().as_ptr(),
        ints.values().inner().as_ptr()
    );
    Ok(())
}

#[test]
fn zero_rows_give_an_empty_frame_with_the_schema() -> TestResult {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("s", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(18, 3), true),
        Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, None), true),
    ]));
    for batches in [vec![], vec![RecordBatch::new_empty(Arc::clone(&schema))]] {
        let df = frame_from_batches(&schema, &batches)?;
        assert_eq!(df.height(), 0);
        assert_eq!(
            df.dtypes(),
            [
                PlDataType::String,
                PlDataType::Decimal(18, 3),
                PlDataType::Datetime(PlTimeUnit::Microseconds, None)
            ]
        );
        let (out_schema, out) = batches_from_frame(&df, 10)?;
        assert!(out.is_empty());
        let types: Vec<&DataType> = out_schema.fields().iter().map(|f| f.data_type()).collect();
        assert_eq!(
            types,
            [
                &DataType::Utf8View,
                &DataType::Decimal128(18, 3),
                &DataType::Timestamp(TimeUnit::Microsecond, None)
            ]
        );
    }
    Ok(())
}

#[test]
fn batches_respect_max_rows() -> TestResult {
    let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("n", DataType::Int32, true)]));
    let make = |range: std::ops::Range<i32>| {
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int32Array::from_iter_values(range))],
        )
    };
    // Two input batches -> a two-chunk polars frame.
    let df = frame_from_batches(&schema, &[make(0..5)?, make(5..10)?])?;
    let (_, out) = batches_from_frame(&df, 3)?;
    let sizes: Vec<usize> = out.iter().map(RecordBatch::num_rows).collect();
    assert!(
        sizes.iter().all(|&n| (1..=3).contains(&n)),
        "sizes {sizes:?}"
    );
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    let values: Vec<i32> = out
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int32Type>().values().to_vec())
        .collect();
    assert_eq!(values, (0..10).collect::<Vec<_>>());

    // After a rechunk: exactly ceil(10 / 3) batches.
    let mut single = df.clone();
    single.rechunk_mut();
    let (_, out) = batches_from_frame(&single, 3)?;
    let sizes: Vec<usize> = out.iter().map(RecordBatch::num_rows).collect();
    assert_eq!(sizes, [3, 3, 3, 1]);

    assert!(matches!(
        batches_from_frame(&df, 0),
        Err(Error::ZeroBatchSize)
    ));
    Ok(())
}

#[test]
fn lazy_group_by_decimal_sum_converts_out() -> TestResult {
    let keys = ["eu", "us", "eu", "apac", "us", "eu"];
    let cents: [Option<i128>; 6] = [
        Some(1050),
        Some(-250),
        None,
        Some(99_999_999_999),
        Some(1),
        Some(5),
    ];
    let (schema, batch) = one_batch(
        vec![
            Field::new("region", DataType::Utf8, false),
            Field::new("amount", DataType::Decimal128(20, 2), true),
        ],
        vec![
            Arc::new(StringArray::from(keys.to_vec())),
            Arc::new(Decimal128Array::from(cents.to_vec()).with_precision_and_scale(20, 2)?),
        ],
    );
    let df = frame_from_batches(&schema, &[batch])?;
    let summed = df
        .lazy()
        .group_by([col("region")])
        .agg([col("amount").sum().alias("total")])
        .collect()?;

    let mut expected: BTreeMap<&str, i128> = BTreeMap::new();
    for (key, value) in keys.iter().zip(cents) {
        *expected.entry(key).or_default() += value.unwrap_or(0);
    }

    let (out_schema, out) = batches_from_frame(&summed, 2)?;
    let DataType::Decimal128(_, scale) = out_schema.field_with_name("total")?.data_type() else {
        panic!("total is not Decimal128: {out_schema:?}");
    };
    assert_eq!(*scale, 2);
    let mut actual: BTreeMap<String, i128> = BTreeMap::new();
    for batch in &out {
        let regions = batch
            .column_by_name("region")
            .ok_or("no region")?
            .as_string_view();
        let totals = batch
            .column_by_name("total")
            .ok_or("no total")?
            .as_primitive::<Decimal128Type>();
        for (region, total) in regions.iter().zip(totals.iter()) {
            actual.insert(
                region.ok_or("null region")?.to_owned(),
                total.ok_or("null total")?,
            );
        }
    }
    let expected: BTreeMap<String, i128> = expected
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(actual, expected);
    Ok(())
}

#[test]
fn unsupported_types_name_the_column() {
    let (schema, batch) = one_batch(
        vec![Field::new("tiny", DataType::Int8, true)],
        vec![Arc::new(arrow::array::Int8Array::from(vec![1_i8]))],
    );
    let err = frame_from_batches(&schema, &[batch]).expect_err("Int8 is unsupported");
    let message = err.to_string();
    assert!(matches!(err, Error::UnsupportedType { ref column, .. } if column == "tiny"));
    assert!(
        message.contains("tiny") && message.contains("Int8"),
        "{message}"
    );
}

#[test]
fn mismatched_batches_are_rejected() {
    let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
    let (_, other) = one_batch(
        vec![Field::new("n", DataType::Int32, true)],
        vec![Arc::new(Int32Array::from(vec![1]))],
    );
    let err = frame_from_batches(&schema, &[other]).expect_err("types differ");
    assert!(
        matches!(err, Error::SchemaMismatch { batch: 0, .. }),
        "{err}"
    );
}

#[test]
fn scalar_and_misaligned_columns_are_exported() -> TestResult {
    use polars::prelude::{Column, DataFrame, NamedFrom, Series, lit};

    // "a" has two chunks, "b" one: the chunks must be aligned before export.
    let mut a = Series::new("a".into(), &[1_i64, 2, 3]);
    a.append(&Series::new("a".into(), &[4_i64, 5]))?;
    let b = Series::new("b".into(), &["p", "q", "r", "s", "t"]);
    let df = DataFrame::new(5, vec![Column::from(a), Column::from(b)])?;
    // A literal becomes a scalar column in polars.
    let df = df.lazy().with_column(lit(7_i32).alias("c")).collect()?;

    let (schema, out) = batches_from_frame(&df, 2)?;
    let out = concat_batches(&schema, &out)?;
    assert_eq!(
        out.column(0).as_primitive::<Int64Type>().values().to_vec(),
        [1, 2, 3, 4, 5]
    );
    let b_out: Vec<Option<&str>> = out.column(1).as_string_view().iter().collect();
    assert_eq!(
        b_out,
        [Some("p"), Some("q"), Some("r"), Some("s"), Some("t")]
    );
    assert_eq!(
        out.column(2).as_primitive::<Int32Type>().values().to_vec(),
        [7; 5]
    );
    Ok(())
}
