//! Reading one CSV file into Arrow batches, in file order.
//!
//! A file with no quote character is cut at line ends into ranges of about [`RANGE_BYTES`]
//! that are decoded on several threads at once: every line end of such a file ends a record,
//! so each range decodes exactly as the rows it holds would in one pass. A file with quotes
//! may hold line ends inside quoted fields and is decoded in one pass. Either way the
//! batches arrive in file order (de-duplication's "first" and "last" depend on it), and an
//! error names the line as a single pass would.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    os::unix::fs::FileExt,
    sync::{Arc, mpsc},
};

use arrow::{
    csv::reader::Format,
    datatypes::{DataType, Field, Schema, SchemaRef},
    record_batch::RecordBatch,
};
use medallion_spec::SourceSpec;

use crate::sources::BATCH_ROWS;

/// Bytes of a quote-free file decoded as one range (rounded up to the next line end).
const RANGE_BYTES: u64 = 32 << 20;

/// Most threads decoding the ranges of one file.
const MAX_DECODERS: usize = 4;

/// Batches a decoding thread may get ahead of the consumer (per thread).
const DECODED_AHEAD: usize = 2;

/// Reads `file`, sending each batch to `send` in file order (the caller names the file in
/// errors).
pub(crate) fn read_csv(
    source: &SourceSpec,
    file: File,
    send: &mut dyn FnMut(RecordBatch) -> Result<(), String>,
) -> Result<(), String> {
    read_csv_in_ranges(source, file, RANGE_BYTES, send)
}

fn read_csv_in_ranges(
    source: &SourceSpec,
    file: File,
    range_bytes: u64,
    send: &mut dyn FnMut(RecordBatch) -> Result<(), String>,
) -> Result<(), String> {
    let file = Arc::new(file);
    let o = &source.options;
    let delimiter = ascii(o.delimiter, "delimiter")?;
    let quote = ascii(o.quote, "quote")?;
    let layout = scan(&file, quote, range_bytes)?;
    let mut format = Format::default()
        .with_header(o.header)
        .with_delimiter(delimiter)
        .with_quote(quote);
    let schema = schema(source, &format, &file)?;
    if !o.null_values.is_empty() {
        let alternatives: Vec<String> = o.null_values.iter().map(|v| regex::escape(v)).collect();
        let null_regex = regex::Regex::new(&format!("^(?:{})$", alternatives.join("|")))
            .map_err(|e| e.to_string())?;
        format = format.with_null_regex(null_regex);
    }
    let decoders = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_DECODERS)
        .min(layout.len());
    if decoders <= 1 {
        for &(start, end) in &layout {
            decode_range(
                &file,
                start,
                end,
                &schema,
                &format,
                o.header && start == 0,
                send,
            )
            .map_err(|e| at_line(&file, start, e))?;
        }
        return Ok(());
    }
    decode_in_parallel(&file, &layout, &schema, &format, o.header, decoders, send)
}

/// What a decoding thread hands over.
enum Decoded {
    Batch(RecordBatch),
    /// The range's last batch has been sent.
    RangeEnd,
    Failed(String),
}

/// Decodes range `i` of `layout` on thread `i % decoders`, handing the batches over range by
/// range in file order. Dropping the receivers (on an error or a cancelled read) stops the
/// threads at their next batch.
fn decode_in_parallel(
    file: &Arc<File>,
    layout: &[(u64, u64)],
    schema: &SchemaRef,
    format: &Format,
    header: bool,
    decoders: usize,
    send: &mut dyn FnMut(RecordBatch) -> Result<(), String>,
) -> Result<(), String> {
    std::thread::scope(|scope| {
        let mut outputs = Vec::with_capacity(decoders);
        for decoder in 0..decoders {
            let (tx, rx) = mpsc::sync_channel::<Decoded>(DECODED_AHEAD);
            outputs.push(rx);
            let ranges: Vec<(u64, u64)> = layout
                .iter()
                .copied()
                .skip(decoder)
                .step_by(decoders)
                .collect();
            let (file, schema, format) = (file.clone(), schema.clone(), format.clone());
            scope.spawn(move || {
                for (start, end) in ranges {
                    let mut forward = |batch| {
                        tx.send(Decoded::Batch(batch))
                            .map_err(|_| "reader stopped".to_string())
                    };
                    let decoded = decode_range(
                        &file,
                        start,
                        end,
                        &schema,
                        &format,
                        header && start == 0,
                        &mut forward,
                    );
                    let last = match decoded {
                        Ok(()) => Decoded::RangeEnd,
                        Err(e) => Decoded::Failed(e),
                    };
                    let failed = matches!(last, Decoded::Failed(_));
                    if tx.send(last).is_err() || failed {
                        return;
                    }
                }
            });
        }
        for (i, &(start, _)) in layout.iter().enumerate() {
            let output = &outputs[i % decoders];
            loop {
                match output.recv() {
                    Ok(Decoded::Batch(batch)) => send(batch)?,
                    Ok(Decoded::RangeEnd) => break,
                    Ok(Decoded::Failed(e)) => return Err(at_line(file, start, e)),
                    Err(_) => return Err("a CSV decoding thread stopped unexpectedly".into()),
                }
            }
        }
        Ok(())
    })
}

/// Decodes bytes `start..end` of `file` (whole records), the first line being a header if
/// `header`.
fn decode_range(
    file: &Arc<File>,
    start: u64,
    end: u64,
    schema: &SchemaRef,
    format: &Format,
    header: bool,
    send: &mut dyn FnMut(RecordBatch) -> Result<(), String>,
) -> Result<(), String> {
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_format(format.clone().with_header(header))
        .with_batch_size(BATCH_ROWS)
        .build_buffered(BufReader::with_capacity(
            1 << 20,
            RangeReader {
                file: file.clone(),
                pos: start,
                end,
            },
        ))
        .map_err(|e| e.to_string())?;
    for batch in reader {
        send(batch.map_err(|e| e.to_string().replace("Csv error: ", ""))?)?;
    }
    Ok(())
}

/// The schema of `file` as bronze stores it: the spec's or the header's column names, as
/// strings unless type inference is asked for.
fn schema(source: &SourceSpec, format: &Format, file: &Arc<File>) -> Result<SchemaRef, String> {
    let o = &source.options;
    let sample = if source.infer_types {
        Some(10_000)
    } else {
        Some(1)
    };
    let mut from_start = BufReader::new(RangeReader {
        file: file.clone(),
        pos: 0,
        end: u64::MAX,
    });
    let (inferred, _) = format
        .infer_schema(&mut from_start, sample)
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = match (&source.columns, o.header) {
        (Some(cols), false) => {
            if cols.len() != inferred.fields().len() {
                return Err(format!(
                    "line 1: {} fields, but the spec declares {} columns",
                    inferred.fields().len(),
                    cols.len()
                ));
            }
            cols.clone()
        }
        (Some(cols), true) => {
            let header: Vec<String> = inferred.fields().iter().map(|f| f.name().clone()).collect();
            if &header != cols {
                return Err(format!(
                    "line 1: header {header:?} differs from the spec's columns {cols:?}"
                ));
            }
            header
        }
        (None, _) => inferred.fields().iter().map(|f| f.name().clone()).collect(),
    };
    let fields: Vec<Field> = inferred
        .fields()
        .iter()
        .zip(names)
        .map(|(f, name)| {
            // As read: strings, like Auto Loader; typed only when inference is asked for.
            let data_type = if source.infer_types {
                f.data_type().clone()
            } else {
                DataType::Utf8
            };
            Field::new(name, data_type, true)
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

fn ascii(c: char, what: &str) -> Result<u8, String> {
    u8::try_from(c)
        .ok()
        .filter(u8::is_ascii)
        .ok_or_else(|| format!("{what} `{c}` must be one ASCII character"))
}

/// Reads bytes `pos..end` of a file by offset, so several readers share one open file.
struct RangeReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// One pass over the file: checks that every opened quote is closed (an unclosed one would
/// swallow the rest of the file into one field), and returns the byte ranges to decode: cut
/// at line ends about every `range_bytes` when the file has no quote at all, else the whole
/// file.
fn scan(file: &Arc<File>, quote: u8, range_bytes: u64) -> Result<Vec<(u64, u64)>, String> {
    let (mut quotes, mut in_quotes, mut opened_at) = (0u64, false, 0u64);
    let size = for_each_chunk(file, u64::MAX, |offset, buf| {
        for at in memchr::memchr_iter(quote, buf) {
            quotes += 1;
            if !in_quotes {
                opened_at = offset + at as u64;
            }
            in_quotes = !in_quotes;
        }
    })?;
    if in_quotes {
        let line = lines_before(file, opened_at)? + 1;
        return Err(format!(
            "line {line}: unterminated quoted field (a {} opened here is never closed)",
            quote as char
        ));
    }
    if quotes > 0 || size <= range_bytes {
        return Ok(vec![(0, size)]);
    }
    let mut ranges = Vec::new();
    let mut start = 0u64;
    while start < size {
        let end = match next_line_start(file, start + range_bytes, size)? {
            Some(end) => end,
            None => size,
        };
        ranges.push((start, end));
        start = end;
    }
    Ok(ranges)
}

/// The offset just after the first line end at or after `from`, `None` if there is none
/// before `size`.
fn next_line_start(file: &File, from: u64, size: u64) -> Result<Option<u64>, String> {
    let mut window = vec![0u8; 64 << 10];
    let mut pos = from;
    while pos < size {
        let n = file.read_at(&mut window, pos).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if let Some(at) = memchr::memchr(b'\n', &window[..n]) {
            return Ok(Some(pos + at as u64 + 1).filter(|&end| end < size));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// Reads the file from its start up to byte `end` (or its end) in large chunks, handing
/// each to `visit` with its offset; returns the bytes read.
fn for_each_chunk(
    file: &Arc<File>,
    end: u64,
    mut visit: impl FnMut(u64, &[u8]),
) -> Result<u64, String> {
    let mut reader = BufReader::with_capacity(
        1 << 20,
        RangeReader {
            file: file.clone(),
            pos: 0,
            end,
        },
    );
    let mut offset = 0u64;
    loop {
        let buf = reader.fill_buf().map_err(|e| e.to_string())?;
        if buf.is_empty() {
            return Ok(offset);
        }
        visit(offset, buf);
        let n = buf.len();
        offset += n as u64;
        reader.consume(n);
    }
}

/// Line ends before byte `offset` of the file.
fn lines_before(file: &Arc<File>, offset: u64) -> Result<u64, String> {
    let mut lines = 0u64;
    for_each_chunk(file, offset, |_, buf| {
        lines += memchr::memchr_iter(b'\n', buf).count() as u64;
    })?;
    Ok(lines)
}

/// Records that end before byte `offset` of the file, counted as the CSV parser counts them:
/// a `\n` or `\r` ends a record unless it follows another line end (blank lines are skipped).
fn records_before(file: &Arc<File>, offset: u64) -> Result<u64, String> {
    let (mut records, mut after_line_end) = (0u64, true);
    for_each_chunk(file, offset, |_, buf| {
        for &b in buf {
            let line_end = b == b'\n' || b == b'\r';
            if line_end && !after_line_end {
                records += 1;
            }
            after_line_end = line_end;
        }
    })?;
    Ok(records)
}

/// `error` from decoding the range starting at byte `start`, its line numbers counted from
/// the start of the file. The decoder counts records from its range's first line; only the
/// numbers in arrow-csv's own phrases are moved, not text quoted from a field.
fn at_line(file: &Arc<File>, start: u64, error: String) -> String {
    if start == 0 {
        return error;
    }
    let Ok(before) = records_before(file, start) else {
        return error;
    };
    let line_number = regex::Regex::new(
        r"(incorrect number of fields for line |invalid UTF-8 data for line |for column \d+ at line |Error parsing column \d+ at line )(\d+)",
    )
    .expect("a valid pattern");
    line_number
        .replace(&error, |c: &regex::Captures<'_>| {
            let line: u64 = c[2].parse().unwrap_or(0);
            format!("{}{}", &c[1], line + before)
        })
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(content: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut tmp = tempfile::NamedTempFile::new().expect("temp file");
        tmp.write_all(content).expect("write");
        let file = Arc::new(tmp.reopen().expect("reopen"));
        (tmp, file)
    }

    #[test]
    fn a_quote_free_file_is_cut_at_line_ends() {
        let (_tmp, file) = file_with(b"id,name\n1,a\n22,bb\n333,ccc\n");
        let ranges = scan(&file, b'"', 10).expect("scan");
        assert_eq!(ranges, vec![(0, 12), (12, 26)]);
        let ranges = scan(&file, b'"', 3).expect("scan");
        assert_eq!(ranges, vec![(0, 8), (8, 12), (12, 18), (18, 26)]);
        // No line end after the cut: the rest is one range.
        let (_tmp, file) = file_with(b"id,name\n1,a\n22,bb");
        assert_eq!(scan(&file, b'"', 9).expect("scan"), vec![(0, 12), (12, 17)]);
    }

    #[test]
    fn a_file_with_quotes_is_one_range_and_an_unclosed_quote_names_its_line() {
        let (_tmp, file) = file_with(b"id,name\n1,\"a\nb\"\n2,c\n");
        assert_eq!(scan(&file, b'"', 4).expect("scan"), vec![(0, 20)]);
        let (_tmp, file) = file_with(b"id,name\n1,\"ok\"\n2,\"broken\n3,fine\n");
        let e = scan(&file, b'"', 4).expect_err("unterminated");
        assert!(e.starts_with("line 3: unterminated"), "{e}");
    }

    fn source(header: bool) -> SourceSpec {
        let mut spec = serde_json::json!({
            "name": "s", "format": "csv", "path": "s.csv", "options": { "header": header }
        });
        if !header {
            spec["columns"] = serde_json::json!(["id", "name", "amount"]);
        }
        serde_json::from_value(spec).expect("source spec")
    }

    fn read(
        source: &SourceSpec,
        content: &[u8],
        range_bytes: u64,
    ) -> Result<Vec<RecordBatch>, String> {
        let (_tmp, file) = file_with(content);
        let file = Arc::try_unwrap(file).expect("one handle");
        let mut batches = Vec::new();
        read_csv_in_ranges(source, file, range_bytes, &mut |b| {
            batches.push(b);
            Ok(())
        })?;
        Ok(batches)
    }

    fn rows(batches: &[RecordBatch]) -> Vec<String> {
        let mut out = Vec::new();
        for batch in batches {
            for row in 0..batch.num_rows() {
                let cells: Vec<String> = batch
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, row).expect("cell"))
                    .collect();
                out.push(cells.join("|"));
            }
        }
        out
    }

    #[test]
    fn ranges_decoded_on_several_threads_give_the_rows_of_one_pass_in_order() {
        for header in [true, false] {
            let mut content = String::new();
            if header {
                content.push_str("id,name,amount\n");
            }
            for i in 0..5_000 {
                content.push_str(&format!("{i},name {},{}.{:02}\n", i % 97, i * 3, i % 100));
            }
            let source = source(header);
            let whole = read(&source, content.as_bytes(), u64::MAX).expect("one pass");
            let cut = read(&source, content.as_bytes(), 1_000).expect("ranges");
            assert!(
                cut.len() > 20,
                "the file was cut into {} batches",
                cut.len()
            );
            assert_eq!(rows(&whole).len(), 5_000);
            assert_eq!(rows(&cut), rows(&whole), "header: {header}");
            assert_eq!(cut[0].schema(), whole[0].schema());
        }
    }

    #[test]
    fn a_bad_row_in_a_later_range_names_its_line_in_the_file() {
        let mut content = String::from("id,name,amount\n");
        for i in 0..2_000 {
            content.push_str(&format!("{i},n,{i}\n"));
        }
        content.push_str("2000,n,1,extra\n");
        let e = read(&source(true), content.as_bytes(), 500).expect_err("a bad row");
        assert!(e.contains("line 2002") && e.contains("expected 3"), "{e}");
        let mut bad_utf8 = content.into_bytes();
        bad_utf8.truncate(bad_utf8.len() - 15);
        bad_utf8.extend_from_slice(b"2000,\xff\xfe,1\n");
        let e = read(&source(true), &bad_utf8, 500).expect_err("invalid UTF-8");
        assert!(e.contains("line 2002") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn errors_in_later_ranges_name_the_line_in_the_file() {
        let (_tmp, file) = file_with(b"id,name\n1,a\n2,b\n3,c,extra\n");
        let e = at_line(
            &file,
            12,
            "incorrect number of fields for line 2, expected 2 got 3".into(),
        );
        assert_eq!(e, "incorrect number of fields for line 4, expected 2 got 3");
        assert_eq!(at_line(&file, 0, "line 2".into()), "line 2");
        // Blank lines are not records, as the parser counts them; text from a field is kept.
        let (_tmp, file) = file_with(b"id,name\r\n\r\n1,a\n\n2,b\n3,c,extra\n");
        let e = at_line(
            &file,
            16,
            "incorrect number of fields for line 2, expected 2 got 3".into(),
        );
        assert_eq!(e, "incorrect number of fields for line 4, expected 2 got 3");
        let e = at_line(
            &file,
            16,
            "Error while parsing value 'see line 9' as type 'Int64' for column 1 at line 2. Row data: '[3, see line 9]'".into(),
        );
        assert_eq!(
            e,
            "Error while parsing value 'see line 9' as type 'Int64' for column 1 at line 4. Row data: '[3, see line 9]'"
        );
    }
}
