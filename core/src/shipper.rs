//! The shipper: a thread of the decoder worker that never calls PostgreSQL. It takes closed batches of
//! changes (Arrow record batches per table, already numbered by the decoder), encodes one Parquet
//! change file per table per batch, publishes them in order, and acknowledges each batch once all its
//! files are durable in the target. The decoder confirms the slot only from those acknowledgements
//! (see [`crate::changes`] for why this is exactly once).
//!
//! Also here: reading back, when the decoder starts, where each table folder stands (next file
//! number, position of the last published change).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::file::metadata::ParquetMetaDataReader;

use crate::changes::{runs_to_text, Position, TxnRun, POSITION_KEY, TRANSACTIONS_KEY};
use crate::datafile::{Compression, Numbering, PublishedFile, TableFileSink};
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
    /// How many of the batch's tables are written at once (at least 1).
    pub parallel: usize,
    pub tables: Vec<TableChanges>,
}

/// What the shipper reports for a batch once all its files are published.
#[derive(Debug)]
pub struct Shipped {
    pub seq: u64,
    /// (relid, file) per table of the batch, in the batch's table order.
    pub files: Vec<(u32, PublishedFile)>,
}

/// Publishes the files of one batch: up to `batch.parallel` tables at once, each by its own thread
/// (encoding and upload), since the files of different tables are independent: the landing zone's
/// order is per table folder, and batches are still published one after another. Returns the
/// published files once all are durable, or the first error (the batch is then not acknowledged; its
/// files already published are recognised when the decoder starts again, see [`folder_state`]).
pub fn ship(target: &Arc<Target>, batch: ShipBatch) -> Result<Shipped> {
    let ShipBatch { seq, compression, parallel, tables } = batch;
    let count = tables.len();
    let threads = parallel.clamp(1, count.max(1));
    if threads == 1 {
        let files = tables
            .into_iter()
            .map(|t| Ok((t.relid, ship_table(target, compression, t)?)))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Shipped { seq, files });
    }
    let queue = Mutex::new(tables.into_iter().enumerate());
    let results: Mutex<Vec<Option<(u32, PublishedFile)>>> = Mutex::new(vec![None; count]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..threads {
            std::thread::Builder::new()
                .name("azure_cdc uploader".into())
                .spawn_scoped(scope, || {
                    crate::cloud::run_thread_start_hook();
                    while !failed.load(Ordering::Relaxed) {
                        let Some((i, t)) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else { return };
                        let relid = t.relid;
                        match ship_table(target, compression, t) {
                            Ok(file) => results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some((relid, file)),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                            }
                        }
                    }
                })
                .map_err(|e| Error::new(ErrorKind::Internal, format!("could not start an uploader thread: {e}")))?;
        }
        Ok(())
    })?;
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let files = results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|f| {
            f.ok_or_else(|| Error::new(ErrorKind::Internal, format!("batch {seq}: a table's file was not written")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Shipped { seq, files })
}

/// Encodes and publishes the one change file of a table in a batch.
fn ship_table(target: &Arc<Target>, compression: Compression, t: TableChanges) -> Result<PublishedFile> {
    let mut sink = TableFileSink::new(
        target.clone(),
        t.folder,
        t.schema,
        compression,
        usize::MAX,
        Numbering::Own { first: t.number },
        vec![(POSITION_KEY.to_string(), t.last.to_text()), (TRANSACTIONS_KEY.to_string(), runs_to_text(&t.txns))],
    );
    for b in &t.batches {
        sink.push(b)?;
    }
    let published = sink.close()?;
    match published.as_slice() {
        [one] if one.number == t.number => Ok(one.clone()),
        other => Err(Error::new(
            ErrorKind::Internal,
            format!("a change batch of table {} produced files {other:?} instead of one", t.relid),
        )),
    }
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
    let gone = || {
        Error::new(
            ErrorKind::TargetIo,
            format!("data file {} of folder \"{folder}\" disappeared while it was read", last.number),
        )
        .with_detail(
            "The landing zone's reader leaves the newest data file of a folder in place; another process removed it.",
        )
    };
    // Only the footer is read (a snapshot file may be gigabytes): first the last FOOTER_GUESS bytes,
    // then, if the metadata is longer, exactly the metadata.
    let mut tail = target.read_data_file_tail(folder, last, FOOTER_GUESS)?.ok_or_else(gone)?;
    let mut footer_len = footer_length(&tail, folder, last.number)?;
    if footer_len + 8 > tail.len() {
        tail = target.read_data_file_tail(folder, last, footer_len as u64 + 8)?.ok_or_else(gone)?;
        footer_len = footer_length(&tail, folder, last.number)?;
        if footer_len + 8 > tail.len() {
            return Err(Error::new(
                ErrorKind::TargetIo,
                format!("data file {} of folder \"{folder}\" is shorter than its footer says", last.number),
            ));
        }
    }
    let metadata = ParquetMetaDataReader::decode_metadata(&tail[tail.len() - 8 - footer_len..tail.len() - 8])?;
    let position = metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == POSITION_KEY).and_then(|k| k.value.clone()))
        .map(|v| Position::parse(&v))
        .transpose()?;
    Ok((last.number + 1, position))
}

/// Bytes read from the end of a data file to find its footer: the metadata of a change file, and of
/// most snapshot files, fits.
const FOOTER_GUESS: u64 = 64 * 1024;

/// The length of the Parquet metadata that `tail`, the end of a data file, says precedes it.
fn footer_length(tail: &[u8], folder: &str, number: u64) -> Result<usize> {
    match tail.len().checked_sub(8).map(|at| &tail[at..]) {
        Some([a, b, c, d, b'P', b'A', b'R', b'1']) => Ok(u32::from_le_bytes([*a, *b, *c, *d]) as usize),
        _ => Err(Error::new(
            ErrorKind::TargetIo,
            format!("data file {number} of folder \"{folder}\" does not end like a Parquet file"),
        )),
    }
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
                crate::cloud::run_thread_start_hook();
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
            // The thread stops after a failed batch: that failure, not the stop, is the error.
            Err(TrySendError::Disconnected(_)) => Err(self.failure().unwrap_or_else(gone)),
        }
    }

    /// The error of the batch that stopped the thread, if it is still waiting to be received.
    fn failure(&self) -> Option<Error> {
        loop {
            match self.rx.try_recv() {
                Ok(Err(e)) => return Some(e),
                // An acknowledgement before it is dropped: the decoder stops on the error and starts
                // again from what the folders hold.
                Ok(Ok(_)) => continue,
                Err(_) => return None,
            }
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
    /// Waits for the batch being published (a decoder that decodes again must not race it), unless
    /// the process is ending: then the thread ends with it, and its batch, never acknowledged, is
    /// decoded again by the next decoder.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            if !crate::cloud::process_exiting() {
                let _ = h.join();
            }
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

    /// Batch `seq`: three rows of table 1 to publish as file number 1 of folder `a.schema/b`.
    fn number_one_of_a_b(seq: u64, marker: RowMarker) -> ShipBatch {
        let (schema, rb) = batch(0..3, marker);
        ShipBatch {
            seq,
            compression: Compression::Snappy,
            parallel: 1,
            tables: vec![TableChanges {
                relid: 1,
                folder: "a.schema/b".into(),
                schema,
                batches: vec![rb],
                last: Position { commit_lsn: 1, ordinal: seq },
                number: 1,
                txns: vec![TxnRun { xid: 1, end_row: 3 }],
            }],
        }
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
            let mut b = Some(ShipBatch { seq, compression: Compression::Zstd, parallel: 4, tables: vec![table] });
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
        let mk = |seq| number_one_of_a_b(seq, RowMarker::Delete);
        ship(&target, mk(1)).unwrap();
        assert!(ship(&target, mk(2)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_tables_of_a_batch_are_written_at_once_and_acknowledged_in_order() {
        let dir = std::env::temp_dir().join(format!("azure_cdc_shipper_wide_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        let (schema, rb) = batch(0..5, RowMarker::Insert);
        let table = |relid: u32, number| TableChanges {
            relid,
            folder: format!("s.schema/t{relid}"),
            schema: schema.clone(),
            batches: vec![rb.clone()],
            last: Position { commit_lsn: 7, ordinal: relid as u64 },
            number,
            txns: vec![TxnRun { xid: 3, end_row: 5 }],
        };
        let tables = (1..=40).map(|r| table(r, 1)).collect();
        let shipped =
            ship(&target, ShipBatch { seq: 1, compression: Compression::Snappy, parallel: 8, tables }).unwrap();
        assert_eq!(shipped.files.iter().map(|f| f.0).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
        for r in 1..=40u32 {
            let (next, last) = folder_state(&target, &format!("s.schema/t{r}")).unwrap();
            assert_eq!((next, last), (2, Some(Position { commit_lsn: 7, ordinal: r as u64 })));
        }
        // A table whose number is taken fails the batch; the others are written all the same and are
        // found by folder_state when the decoder starts again.
        let tables = (1..=40).map(|r| table(r, if r == 20 { 1 } else { 2 })).collect();
        let err = ship(&target, ShipBatch { seq: 2, compression: Compression::Snappy, parallel: 8, tables });
        assert!(err.is_err());
        assert_eq!(folder_state(&target, "s.schema/t20").unwrap().0, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_footer_longer_than_the_first_read_is_read_whole() {
        let dir = std::env::temp_dir().join(format!("azure_cdc_shipper_footer_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        let (schema, rb) = batch(0..30_000, RowMarker::Insert);
        // One transaction per row: the transaction index alone is far longer than the first read.
        let txns: Vec<TxnRun> = (0..30_000u64).map(|i| TxnRun { xid: 1_000_000 + i, end_row: i + 1 }).collect();
        assert!(runs_to_text(&txns).len() as u64 > 2 * FOOTER_GUESS);
        let last = Position { commit_lsn: 0xABCDEF, ordinal: 29_999 };
        let table =
            TableChanges { relid: 5, folder: "s.schema/big".into(), schema, batches: vec![rb], last, number: 1, txns };
        ship(&target, ShipBatch { seq: 1, compression: Compression::Zstd, parallel: 1, tables: vec![table] }).unwrap();
        assert_eq!(folder_state(&target, "s.schema/big").unwrap(), (2, Some(last)));
        // A file that does not end like Parquet is an error, not a folder without position.
        target.publish_data_file("s.schema/big", 2, b"not parquet").unwrap();
        assert_eq!(folder_state(&target, "s.schema/big").unwrap_err().kind, ErrorKind::TargetIo);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_batch_handed_over_after_a_failure_gets_the_failure_back() {
        let dir = std::env::temp_dir().join(format!("azure_cdc_shipper_fail_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        target.publish_data_file("a.schema/b", 1, b"taken").unwrap();
        let mk = |seq| number_one_of_a_b(seq, RowMarker::Insert);
        let expected = ship(&target, mk(0)).unwrap_err();
        let shipper = Shipper::start(target.clone(), 1).unwrap();
        assert!(shipper.try_send(mk(1)).unwrap().is_none());
        // The thread fails the batch and stops; the next hand-over reports why.
        let mut next = Some(mk(2));
        let err = loop {
            match shipper.try_send(next.take().unwrap()) {
                Ok(Some(back)) => {
                    next = Some(back);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => next = Some(mk(3)),
                Err(e) => break e,
            }
        };
        assert_eq!(err, expected);
        drop(shipper);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
