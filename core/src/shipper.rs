//! The shipper: a thread of the decoder worker that never calls PostgreSQL. It takes closed batches of
//! changes (Arrow record batches per table, already numbered by the decoder), encodes one Parquet
//! change file per table per batch, publishes them in order, and acknowledges each batch once all its
//! files are durable in the target. The decoder confirms the slot only from those acknowledgements
//! (see [`crate::changes`] for why this is exactly once).
//!
//! Also here: reading back, when the decoder starts, where each table folder stands (next file
//! number, position of the last published change).

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::changes::{runs_to_text, Position, TxnRun, POSITION_KEY, TRANSACTIONS_KEY};
use crate::datafile::{Compression, PublishedFile, TableFileSink};
use crate::error::{Error, ErrorKind, Result};
use crate::target::Target;

/// The changes of one table in one batch: they become exactly one change file.
pub struct TableChanges {
    pub relid: u32,
    pub folder: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// Position of the last change in `batches`, recorded in the file.
    pub last: Position,
    /// The file number to publish under.
    pub number: u64,
    /// Which rows belong to which transaction, recorded in the file.
    pub txns: Vec<TxnRun>,
}

/// A closed batch.
pub struct ShipBatch {
    pub seq: u64,
    pub compression: Compression,
    pub tables: Vec<TableChanges>,
}

/// What the shipper reports for a batch once all its files are published.
#[derive(Debug)]
pub struct Shipped {
    pub seq: u64,
    /// (relid, file) per table of the batch.
    pub files: Vec<(u32, PublishedFile)>,
}

/// Publishes the files of one batch, in table order. Returns the published files.
pub fn ship(target: &Arc<Target>, batch: ShipBatch) -> Result<Shipped> {
    let mut files = Vec::with_capacity(batch.tables.len());
    for t in batch.tables {
        let mut sink = TableFileSink::new(
            target.clone(),
            t.folder,
            t.schema,
            batch.compression,
            usize::MAX,
            t.number,
            vec![(POSITION_KEY.to_string(), t.last.to_text()), (TRANSACTIONS_KEY.to_string(), runs_to_text(&t.txns))],
        );
        for b in &t.batches {
            sink.push(b)?;
        }
        let published = sink.close()?;
        match published.as_slice() {
            [one] if one.number == t.number => files.push((t.relid, one.clone())),
            other => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("a change batch of table {} produced files {other:?} instead of one", t.relid),
                ))
            }
        }
    }
    Ok(Shipped { seq: batch.seq, files })
}

/// Where a table folder stands: the next file number, and the position of the last published change
/// (None when the folder holds no change file yet). Temporary files of an interrupted write are removed
/// first: they were never published, and their changes are in the slot's stream again. Files the
/// landing zone's reader has moved (see [`crate::target::Place`]) count where they are now; the reader
/// leaves the newest in place, and it is read wherever it is.
pub fn folder_state(target: &Target, folder: &str) -> Result<(u64, Option<Position>)> {
    target.remove_temporary_files(folder)?;
    let files = target.data_files(folder)?;
    let Some(last) = files.last() else { return Ok((1, None)) };
    let bytes = target.read_data_file(folder, last)?.ok_or_else(|| {
        Error::new(
            ErrorKind::TargetIo,
            format!("data file {} of folder \"{folder}\" disappeared while it was read", last.number),
        )
        .with_detail(
            "The landing zone's reader leaves the newest data file of a folder in place; another process removed it.",
        )
    })?;
    let reader = SerializedFileReader::new(bytes)?;
    let position = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == POSITION_KEY).and_then(|k| k.value.clone()))
        .map(|v| Position::parse(&v))
        .transpose()?;
    Ok((last.number + 1, position))
}

/// The shipper thread and the channels to it.
pub struct Shipper {
    tx: Option<SyncSender<ShipBatch>>,
    rx: Receiver<Result<Shipped>>,
    handle: Option<JoinHandle<()>>,
}

impl Shipper {
    /// Starts the thread. `depth` batches may wait for it while it publishes one.
    pub fn start(target: Arc<Target>, depth: usize) -> Result<Shipper> {
        let (tx, work) = sync_channel::<ShipBatch>(depth);
        let (done, rx) = sync_channel::<Result<Shipped>>(depth + 2);
        let handle = std::thread::Builder::new()
            .name("azure_cdc shipper".into())
            .spawn(move || {
                while let Ok(batch) = work.recv() {
                    let seq = batch.seq;
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ship(&target, batch)))
                        .unwrap_or_else(|_| {
                            Err(Error::new(ErrorKind::Internal, format!("the shipper panicked on batch {seq}")))
                        });
                    let failed = r.is_err();
                    if done.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::new(ErrorKind::Internal, format!("could not start the shipper thread: {e}")))?;
        Ok(Shipper { tx: Some(tx), rx, handle: Some(handle) })
    }

    /// Hands a batch over without blocking; gives it back if the queue is full.
    pub fn try_send(&self, batch: ShipBatch) -> Result<Option<ShipBatch>> {
        let gone = || Error::new(ErrorKind::Internal, "the shipper thread stopped");
        match self.tx.as_ref().ok_or_else(gone)?.try_send(batch) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(b)) => Ok(Some(b)),
            Err(TrySendError::Disconnected(_)) => Err(gone()),
        }
    }

    /// The next acknowledgement, waiting at most `wait`. None if none came.
    pub fn recv(&self, wait: Duration) -> Result<Option<Shipped>> {
        match self.rx.recv_timeout(wait) {
            Ok(r) => r.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::new(ErrorKind::Internal, "the shipper thread stopped")),
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, ColumnSpec, Value};
    use crate::changes::{change_columns, RowMarker};
    use crate::names;
    use crate::typemap::ColumnKind;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::fs::File;

    fn batch(ids: std::ops::Range<i64>, marker: RowMarker) -> (SchemaRef, RecordBatch) {
        let cols = change_columns(&[ColumnSpec { name: "id".into(), kind: ColumnKind::Int64 }]);
        let mut b = BatchBuilder::new(&cols).unwrap();
        for i in ids {
            b.append(0, Value::Int64(i)).unwrap();
            b.append(1, Value::Int32(marker as i32)).unwrap();
            b.end_row().unwrap();
        }
        (b.schema(), b.finish().unwrap())
    }

    #[test]
    fn batches_become_numbered_files_that_remember_their_last_position() {
        let dir = std::env::temp_dir().join(format!("azure_cdc_shipper_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        assert_eq!(folder_state(&target, "s.schema/t").unwrap(), (1, None));
        // A temporary file of an interrupted write is not a published file, and is cleared away.
        drop(target.create_temp_data_file("s.schema/t", 1).unwrap());
        assert_eq!(folder_state(&target, "s.schema/t").unwrap(), (1, None));
        assert!(!dir.join("s.schema/t").join(names::temporary_file_name(1)).exists());
        // A snapshot file has no position.
        target.publish_data_file("s.schema/t", 1, b"not parquet, never read").unwrap();
        let shipper = Shipper::start(target.clone(), 1).unwrap();
        let mut expected = 2;
        for (seq, ordinal) in [(1u64, 3u64), (2, 9)] {
            let (schema, rb) = batch(0..10, RowMarker::Insert);
            let last = Position { commit_lsn: 0x1000 * seq, ordinal };
            let table = TableChanges {
                relid: 42,
                folder: "s.schema/t".into(),
                schema,
                batches: vec![rb.clone(), rb],
                last,
                number: expected,
                txns: vec![TxnRun { xid: 7, end_row: 15 }, TxnRun { xid: 9, end_row: 20 }],
            };
            let mut b = Some(ShipBatch { seq, compression: Compression::Zstd, tables: vec![table] });
            while let Some(again) = shipper.try_send(b.take().unwrap()).unwrap() {
                b = Some(again);
                std::thread::sleep(Duration::from_millis(5));
            }
            let ack = loop {
                if let Some(a) = shipper.recv(Duration::from_secs(5)).unwrap() {
                    break a;
                }
            };
            assert_eq!(ack.seq, seq);
            assert_eq!(ack.files.len(), 1);
            assert_eq!(ack.files[0].0, 42);
            assert_eq!(ack.files[0].1.number, expected);
            assert_eq!(ack.files[0].1.rows, 20);
            expected += 1;
            assert_eq!(folder_state(&target, "s.schema/t").unwrap(), (expected, Some(last)));
        }
        let path = dir.join("s.schema/t").join(names::data_file_name(3));
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
        let kv = builder.metadata().file_metadata().key_value_metadata().unwrap().clone();
        let index = kv.iter().find(|k| k.key == TRANSACTIONS_KEY).and_then(|k| k.value.clone()).unwrap();
        assert_eq!(crate::changes::runs_from_text(&index).unwrap()[1], TxnRun { xid: 9, end_row: 20 });
        let reader = builder.build().unwrap();
        let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 20);
        drop(shipper);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_published_number_is_never_reused() {
        let dir = std::env::temp_dir().join(format!("azure_cdc_shipper_dup_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        let (schema, rb) = batch(0..3, RowMarker::Delete);
        let mk = |seq| ShipBatch {
            seq,
            compression: Compression::Snappy,
            tables: vec![TableChanges {
                relid: 1,
                folder: "a.schema/b".into(),
                schema: schema.clone(),
                batches: vec![rb.clone()],
                last: Position { commit_lsn: 1, ordinal: seq },
                number: 1,
                txns: vec![TxnRun { xid: 1, end_row: 3 }],
            }],
        };
        ship(&target, mk(1)).unwrap();
        assert!(ship(&target, mk(2)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
