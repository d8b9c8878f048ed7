//! Streaming one parquet data file through the table's object store.

use std::ops::Range;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::{ObjectStore, Path};
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::{DataFile, Error, Result, TableSnapshot};

/// Batches decoded ahead of the consumer; with the one being decoded this bounds memory.
const READ_AHEAD: usize = 1;

pub(crate) fn read_file(
    snapshot: &TableSnapshot,
    file: &DataFile,
    batch_size: usize,
    projection: Option<Vec<usize>>,
) -> BoxStream<'static, Result<RecordBatch>> {
    let (layer, table, file_path) = (snapshot.layer, snapshot.table.clone(), file.path.clone());
    let read_error = {
        let (table, file_path) = (table.clone(), file_path.clone());
        move |source| Error::Read {
            layer,
            table: table.clone(),
            path: file_path.clone(),
            source,
        }
    };
    let task_error = {
        let (table, file_path) = (table.clone(), file_path.clone());
        move |reason: String| Error::ReaderTask {
            layer,
            table,
            path: file_path,
            reason,
        }
    };
    let handle = match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle,
        Err(e) => {
            return futures::stream::once(async move { Err(task_error(e.to_string())) }).boxed();
        }
    };

    let store = snapshot.delta.object_store();
    let location = Path::parse(&file.path).unwrap_or_else(|_| Path::from(file.path.as_str()));
    let reader = StoreReader {
        store,
        location,
        size: u64::try_from(file.size).ok(),
    };
    // Reading with the table schema gives every file the snapshot's types (e.g. Utf8 for
    // strings written as Utf8View).
    let options = ArrowReaderOptions::new().with_schema(snapshot.schema.clone());
    let batch_size = batch_size.max(1);

    let (mut tx, rx) = mpsc::channel::<Result<RecordBatch>>(READ_AHEAD);
    let runtime = handle.clone();
    // Parquet decoding is CPU work: drive the stream on a blocking thread, not a worker.
    let task = handle.spawn_blocking(move || {
        runtime.block_on(async move {
            let stream = match ParquetRecordBatchStreamBuilder::new_with_options(reader, options)
                .await
                .and_then(|b| {
                    // Only the asked-for top-level columns are decoded.
                    let b = match &projection {
                        Some(roots) => {
                            let mask =
                                ProjectionMask::roots(b.parquet_schema(), roots.iter().copied());
                            b.with_projection(mask)
                        }
                        None => b,
                    };
                    b.with_batch_size(batch_size).build()
                }) {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = tx.send(Err(read_error(e))).await;
                    return;
                }
            };
            let mut stream = stream.map(|r| r.map_err(&read_error));
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                // A closed channel means the consumer dropped the stream: stop reading.
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        })
    });

    // Surface a panicked reader task as an error instead of a silently short stream.
    let tail = futures::stream::once(async move {
        match task.await {
            Ok(()) => None,
            Err(e) => Some(Err(task_error(e.to_string()))),
        }
    })
    .filter_map(futures::future::ready);
    rx.chain(tail).boxed()
}

/// Parquet reads through an object store (parquet's own `ParquetObjectReader` is deprecated
/// in 59.3 in favour of implementing [`AsyncFileReader`]).
struct StoreReader {
    store: Arc<dyn ObjectStore>,
    location: Path,
    /// File size from the Add action; saves a HEAD request when known.
    size: Option<u64>,
}

/// Footer bytes fetched in the first request, usually enough for the whole metadata.
const FOOTER_PREFETCH: usize = 64 * 1024;

fn store_error(e: deltalake::ObjectStoreError) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for StoreReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.location, range)
                .await
                .map_err(store_error)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            self.store
                .get_ranges(&self.location, &ranges)
                .await
                .map_err(store_error)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = match self.size {
                Some(size) => size,
                None => {
                    let meta = self.store.head(&self.location).await.map_err(store_error)?;
                    self.size = Some(meta.size);
                    meta.size
                }
            };
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .with_prefetch_hint(Some(FOOTER_PREFETCH))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}
