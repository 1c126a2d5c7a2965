//! The encoder thread of a process that copies tables (snapshot worker, helper, copier): encodes the
//! batches its main thread scans into numbered Parquet files and publishes them, one table (or part
//! of a table) at a time. Never calls PostgreSQL; talks to the main thread over bounded channels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use azure_cdc_core::arrow_array::RecordBatch;
use azure_cdc_core::arrow_schema::SchemaRef;
use azure_cdc_core::cloud;
use azure_cdc_core::datafile::{Compression, Numbering, PublishedFile, TableFileSink};
use azure_cdc_core::target::Target;
use azure_cdc_core::{Error, ErrorKind, Result};

/// Messages from the main thread to the encoder thread.
pub enum ToEncoder {
    Begin {
        folder: String,
        schema: SchemaRef,
        compression: Compression,
        max_file_bytes: usize,
        /// Own numbering from 1 for a whole table; shared with the other workers for a part.
        numbering: Numbering,
    },
    Batch(RecordBatch),
    /// The table is complete: publish what is left and report.
    End,
    /// The table is abandoned: drop the file not published yet and report. Files already published
    /// stay: the caller resets the folder where it records that it did (a parked table), or leaves it
    /// to the next attempt, which deletes the folder and records it.
    Abort,
}

/// The encoder thread: encodes and publishes the files of one table at a time. Never calls PostgreSQL.
pub struct Encoder {
    tx: Option<SyncSender<ToEncoder>>,
    rx: Receiver<Result<Vec<PublishedFile>>>,
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Encoder {
    pub fn start(target: Arc<Target>) -> Result<Encoder> {
        // Two batches in flight: the encoder works on one while the scan fills the next.
        let (tx, work) = sync_channel::<ToEncoder>(2);
        let (done, rx) = sync_channel::<Result<Vec<PublishedFile>>>(1);
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let handle = std::thread::Builder::new()
            .name("azure_cdc encoder".into())
            .spawn(move || {
                cloud::run_thread_start_hook();
                encoder_loop(target, work, done, flag)
            })
            .map_err(|e| Error::new(ErrorKind::Internal, format!("could not start the encoder thread: {e}")))?;
        Ok(Encoder { tx: Some(tx), rx, failed, handle: Some(handle) })
    }

    pub fn send(&self, m: ToEncoder) -> Result<()> {
        if matches!(m, ToEncoder::Begin { .. }) {
            // The previous table's reply has come back (finish_table waits for it): nothing of it
            // can still set the flag, which must not stop the new table's scan.
            self.failed.store(false, Ordering::Relaxed);
        }
        let gone = || Error::new(ErrorKind::Internal, "the encoder thread stopped");
        self.tx.as_ref().ok_or_else(gone)?.send(m).map_err(|_| gone())
    }

    pub fn finish_table(&self, m: ToEncoder) -> Result<Vec<PublishedFile>> {
        self.send(m)?;
        self.rx.recv().map_err(|_| Error::new(ErrorKind::Internal, "the encoder thread stopped"))?
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn encoder_loop(
    target: Arc<Target>,
    work: Receiver<ToEncoder>,
    done: SyncSender<Result<Vec<PublishedFile>>>,
    failed: Arc<AtomicBool>,
) {
    let mut sink: Option<TableFileSink> = None;
    let mut error: Option<Error> = None;
    while let Ok(msg) = work.recv() {
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Option<Result<Vec<PublishedFile>>> {
            match msg {
                ToEncoder::Begin { folder, schema, compression, max_file_bytes, numbering } => {
                    error = None;
                    sink = Some(TableFileSink::new(
                        target.clone(),
                        folder,
                        schema,
                        compression,
                        max_file_bytes,
                        numbering,
                        vec![],
                    ));
                    None
                }
                ToEncoder::Batch(b) => {
                    if error.is_none() {
                        if let Some(s) = sink.as_mut() {
                            if let Err(e) = s.push(&b) {
                                failed.store(true, Ordering::Relaxed);
                                error = Some(e);
                            }
                        }
                    }
                    None
                }
                ToEncoder::End => {
                    let r = match (sink.take(), error.take()) {
                        (_, Some(e)) => Err(e),
                        (Some(s), None) => s.close(),
                        (None, None) => Ok(Vec::new()),
                    };
                    Some(r)
                }
                ToEncoder::Abort => {
                    error = None;
                    sink = None;
                    Some(Ok(Vec::new()))
                }
            }
        }));
        let reply = match step {
            Ok(r) => r,
            Err(_) => {
                failed.store(true, Ordering::Relaxed);
                sink = None;
                Some(Err(Error::new(ErrorKind::Internal, "the encoder thread panicked")))
            }
        };
        if let Some(r) = reply {
            if done.send(r).is_err() {
                return;
            }
        }
    }
}
