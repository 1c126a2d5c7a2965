//! The change stream's rules, pure: positions of changes, row markers, when a batch closes, how far
//! the slot may be confirmed, and which changes were already shipped. Any thread may use this module.
//!
//! # Exactly once
//!
//! Every decoded change of a transaction has a **position**: the LSN of its transaction's commit
//! record, and its ordinal among the changes logical decoding hands out for that transaction.
//! Decoding replays a committed transaction as the same sequence of changes each time it is decoded,
//! so a position names one change for good. Commits are decoded in LSN order, so positions grow along
//! the stream.
//!
//! Each change file records, in its Parquet key-value metadata ([`POSITION_KEY`]), the position of
//! the last change it holds. Files of one table are published in position order, so **the landing
//! zone itself is the bookkeeping**: when the decoder starts, it lists each table folder; the highest
//! file number `N` gives the next number (`N + 1`, contiguous whatever happened before), and the
//! position in file `N` tells which changes of that table are already there. Changes at or before it
//! are skipped; later ones are shipped. A snapshot file carries no position: every change in the slot's
//! stream commits after the snapshot's consistent point, so none of them is in a snapshot file.
//!
//! The slot's confirmed position is advanced ([`InFlight`]) only to an LSN before which every
//! decoded transaction has all its changes in published files. A crash anywhere — before a file is
//! written, between writing and publishing, between publishing the files of one batch, after
//! publishing but before confirming — therefore replays from the slot a stretch of the stream whose
//! changes are either published (skipped by position) or not (shipped now, under the next numbers).
//! Nothing is lost, nothing is shipped twice, no number is skipped.
//!
//! A transaction larger than the change buffer is shipped in several batches before its commit is
//! confirmed: its later changes may then wait in the slot while its earlier ones are published. That
//! keeps memory bounded by `azure_cdc.change_batch_buffer_size` whatever the transaction size (the
//! server's reorder buffer spills it to `pg_replslot/` while it is decoded); a reader of the landing
//! zone can see a very large transaction's rows of one table arrive in more than one file.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::batch::ColumnSpec;
use crate::error::{Error, ErrorKind, Result};
use crate::landing_zone::ROW_MARKER_COLUMN;
use crate::typemap::ColumnKind;

/// Key of the Parquet key-value metadata entry holding the position of a change file's last change.
pub const POSITION_KEY: &str = "azure_cdc.last_change";

/// Key of the Parquet key-value metadata entry holding a change file's transaction index: which rows
/// belong to which transaction ([`TxnRun`]). `verify_table` uses it to cut the replay exactly at the
/// transactions a snapshot of the source sees.
pub const TRANSACTIONS_KEY: &str = "azure_cdc.transactions";

/// The rows of one transaction in a change file: rows up to (not including) `end_row`, after the
/// previous run, belong to the transaction with full (epoch-extended) transaction id `xid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnRun {
    pub xid: u64,
    pub end_row: u64,
}

/// Adds `rows_now` (the table's row count in the batch after a change of transaction `xid`) to the
/// index: extends the last run when it is the same transaction, else starts a new one.
pub fn extend_runs(runs: &mut Vec<TxnRun>, xid: u64, rows_now: u64) {
    match runs.last_mut() {
        Some(last) if last.xid == xid => last.end_row = rows_now,
        _ => runs.push(TxnRun { xid, end_row: rows_now }),
    }
}

/// Text form of a transaction index: `<xid hex>:<end row hex>` joined by `,`.
pub fn runs_to_text(runs: &[TxnRun]) -> String {
    let mut s = String::with_capacity(runs.len() * 12);
    for (i, r) in runs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{:x}:{:x}", r.xid, r.end_row));
    }
    s
}

pub fn runs_from_text(text: &str) -> Result<Vec<TxnRun>> {
    let bad = || Error::new(ErrorKind::Internal, "malformed transaction index in a change file");
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<TxnRun> = Vec::new();
    for part in text.split(',') {
        let (x, e) = part.split_once(':').ok_or_else(bad)?;
        let run = TxnRun {
            xid: u64::from_str_radix(x, 16).map_err(|_| bad())?,
            end_row: u64::from_str_radix(e, 16).map_err(|_| bad())?,
        };
        if out.last().is_some_and(|l| l.end_row >= run.end_row) {
            return Err(bad());
        }
        out.push(run);
    }
    Ok(out)
}

/// Where a change is in the stream: its transaction's commit LSN, then its ordinal in the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: u64,
    pub ordinal: u64,
}

impl Position {
    /// Text form stored in a file: `<commit LSN as 16 hex digits>:<ordinal>`.
    pub fn to_text(self) -> String {
        format!("{:016X}:{}", self.commit_lsn, self.ordinal)
    }

    pub fn parse(text: &str) -> Result<Position> {
        let bad = || Error::new(ErrorKind::Internal, format!("malformed change position \"{text}\""));
        let (lsn, ordinal) = text.split_once(':').ok_or_else(bad)?;
        if lsn.len() != 16 {
            return Err(bad());
        }
        Ok(Position {
            commit_lsn: u64::from_str_radix(lsn, 16).map_err(|_| bad())?,
            ordinal: ordinal.parse().map_err(|_| bad())?,
        })
    }
}

/// Whether a change at `p` is already in the landing zone, given the position of the table's last
/// published change (None: the table has no change file yet).
pub fn already_shipped(last_published: Option<Position>, p: Position) -> bool {
    last_published.is_some_and(|last| p <= last)
}

/// The `__rowMarker__` values of the landing zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum RowMarker {
    Insert = 0,
    Update = 1,
    Delete = 2,
    Upsert = 4,
}

/// The columns of a table's change files: its columns, then `__rowMarker__`.
pub fn change_columns(columns: &[ColumnSpec]) -> Vec<ColumnSpec> {
    let mut v = columns.to_vec();
    v.push(ColumnSpec { name: ROW_MARKER_COLUMN.to_string(), kind: ColumnKind::Int32 });
    v
}

/// Whether the open batch must close: it holds at least `limit_bytes`, or its first change was
/// buffered `timeout` ago or earlier.
pub fn batch_due(
    buffered_bytes: usize,
    limit_bytes: usize,
    first_change: Option<Instant>,
    now: Instant,
    timeout: Duration,
) -> bool {
    match first_change {
        None => false,
        Some(t) => buffered_bytes >= limit_bytes || now.saturating_duration_since(t) >= timeout,
    }
}

/// Batches handed to the shipper and not yet acknowledged, each with the LSN the slot may be
/// confirmed to once it and every batch before it are published. The shipper publishes batches in
/// the order it gets them and acknowledges each.
#[derive(Debug, Default)]
pub struct InFlight {
    queue: VecDeque<(u64, u64)>,
    next_seq: u64,
    confirmed: u64,
}

impl InFlight {
    /// Starts from the slot's current confirmed LSN.
    pub fn new(confirmed: u64) -> InFlight {
        InFlight { queue: VecDeque::new(), next_seq: 1, confirmed }
    }

    /// Records a batch handed to the shipper; returns its sequence number.
    pub fn push(&mut self, confirm_lsn: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back((seq, confirm_lsn));
        seq
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// The LSN confirmed so far (never decreases).
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Batch `seq` is published. Returns the new LSN to confirm, if it advanced.
    pub fn ack(&mut self, seq: u64) -> Result<Option<u64>> {
        match self.queue.front() {
            Some(&(s, lsn)) if s == seq => {
                self.queue.pop_front();
                Ok(self.advance(lsn))
            }
            _ => Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "the shipper acknowledged batch {seq} out of order (oldest in flight: {:?})",
                    self.queue.front()
                ),
            )),
        }
    }

    /// With nothing buffered and nothing in flight, every decoded transaction is published: the slot
    /// may be confirmed up to where decoding has read. Returns the new LSN to confirm, if it advanced.
    pub fn idle(&mut self, read_upto: u64) -> Option<u64> {
        if self.queue.is_empty() {
            self.advance(read_upto)
        } else {
            None
        }
    }

    fn advance(&mut self, lsn: u64) -> Option<u64> {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            Some(lsn)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_index_round_trips() {
        let mut runs = Vec::new();
        extend_runs(&mut runs, 700, 1);
        extend_runs(&mut runs, 700, 3);
        extend_runs(&mut runs, 0x1_0000_0002, 4);
        extend_runs(&mut runs, 701, 9);
        assert_eq!(
            runs,
            vec![
                TxnRun { xid: 700, end_row: 3 },
                TxnRun { xid: 0x1_0000_0002, end_row: 4 },
                TxnRun { xid: 701, end_row: 9 }
            ]
        );
        let text = runs_to_text(&runs);
        assert_eq!(text, "2bc:3,100000002:4,2bd:9");
        assert_eq!(runs_from_text(&text).unwrap(), runs);
        assert_eq!(runs_from_text("").unwrap(), vec![]);
        for bad in ["x", "1:2,3", "1:5,2:5", "g:1"] {
            assert!(runs_from_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn positions_round_trip_and_order() {
        let a = Position { commit_lsn: 0x16_B374_D848, ordinal: 0 };
        let b = Position { commit_lsn: 0x16_B374_D848, ordinal: 7 };
        let c = Position { commit_lsn: 0x16_B374_D900, ordinal: 0 };
        for p in [a, b, c, Position { commit_lsn: u64::MAX, ordinal: u64::MAX }] {
            assert_eq!(Position::parse(&p.to_text()).unwrap(), p);
        }
        assert!(a < b && b < c);
        assert_eq!(a.to_text(), "00000016B374D848:0");
        for bad in ["", "16/B374D848:1", "00000016B374D848", "00000016B374D848:x", "0000016B374D848:1"] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shipped_changes_are_those_at_or_before_the_last_published() {
        let last = Position { commit_lsn: 100, ordinal: 5 };
        assert!(!already_shipped(None, Position { commit_lsn: 1, ordinal: 0 }));
        assert!(already_shipped(Some(last), Position { commit_lsn: 100, ordinal: 5 }));
        assert!(already_shipped(Some(last), Position { commit_lsn: 99, ordinal: 900 }));
        assert!(!already_shipped(Some(last), Position { commit_lsn: 100, ordinal: 6 }));
        assert!(!already_shipped(Some(last), Position { commit_lsn: 101, ordinal: 0 }));
    }

    #[test]
    fn batches_close_on_size_or_age() {
        let t0 = Instant::now();
        let s = Duration::from_millis(200);
        assert!(!batch_due(10_000, 100, None, t0, s), "an empty batch never closes");
        assert!(batch_due(100, 100, Some(t0), t0, s));
        assert!(!batch_due(99, 100, Some(t0), t0 + Duration::from_millis(199), s));
        assert!(batch_due(1, 100, Some(t0), t0 + s, s));
    }

    #[test]
    fn confirmation_waits_for_every_earlier_batch() {
        let mut f = InFlight::new(50);
        let a = f.push(100);
        let b = f.push(200);
        assert_eq!(f.idle(300), None, "not idle while batches are in flight");
        assert!(f.ack(b).is_err(), "out-of-order acknowledgement");
        assert_eq!(f.ack(a).unwrap(), Some(100));
        assert_eq!(f.ack(b).unwrap(), Some(200));
        assert!(f.is_empty());
        assert_eq!(f.idle(150), None, "never moves backwards");
        assert_eq!(f.idle(300), Some(300));
        let c = f.push(250);
        assert_eq!(f.ack(c).unwrap(), None);
        assert_eq!(f.confirmed(), 300);
    }

    #[test]
    fn change_files_end_with_the_row_marker() {
        let cols = vec![ColumnSpec { name: "id".into(), kind: ColumnKind::Int64 }];
        let c = change_columns(&cols);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].name, ROW_MARKER_COLUMN);
        assert_eq!(c[1].kind, ColumnKind::Int32);
        assert_eq!(RowMarker::Delete as i32, 2);
        assert_eq!(RowMarker::Upsert as i32, 4);
    }
}
