//! Reseeding one table while the mirror's decoder streams the others: how the copy and the change
//! stream meet without losing or repeating a transaction. Pure logic; the decoder
//! ([`crate::lifecycle`] state Reseeding) drives it.
//!
//! A table is reseeded when `resync_table` asks for it, when it is truncated, when its columns change
//! in a way its files cannot express, or when the mirror's slot was lost. Its folder is rebuilt:
//! everything in it is removed, then new snapshot files are published from number 1, then its change
//! files follow.
//!
//! The hand-off, in the decoder's process:
//! 1. **Hold.** Between two decoded records, at WAL position `D`, the decoder starts to drop the
//!    table's changes and stops confirming the slot past `D`. It notes the transactions running now
//!    (`S1`, a snapshot of the server).
//! 2. **Wait.** It goes on decoding (the other tables are shipped) until every transaction of `S1` has
//!    ended. Every transaction whose commit the decoder had read before `D` has then ended.
//! 3. **Copy.** It waits for the shipper to publish everything handed to it, clears the table's folder
//!    and copies the table in a new snapshot `S`; it records `S` (its xmin, xmax and running
//!    transactions) with the table, which is Replicating again.
//! 4. **Rewind.** It reopens the slot at its confirmed position `C` (at most `D`). Decoding from `C`,
//!    it drops the table's changes from transactions `S` sees (they are in the copy) and ships the
//!    others. Other tables skip what they have already published (their files record it).
//!
//! Why it is exact: a transaction that committed before `C` is not decoded again; it ended before `S`
//! was taken (step 2), so `S` sees it and the copy holds it. A transaction decoded after `C` is either
//! seen by `S` (dropped: in the copy) or not (shipped after the copy). Nothing is in both, nothing in
//! neither. The price: the slot holds WAL from `D` until the copy is published, and the other tables'
//! changes wait while the table is copied (they are not lost, and not reseeded).

use std::collections::HashSet;

use crate::error::{Error, ErrorKind, Result};
use crate::verify::Visibility;

/// Why a table is reseeded (the events table says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `resync_table` asked for it.
    Requested,
    /// The table was truncated: its mirror becomes empty, then follows the changes after it.
    Truncated,
    /// Its columns or key changed in a way change files cannot express (rename, type, primary key, default
    /// values written without WAL).
    ColumnsChanged,
    /// The mirror's slot was lost: the changes it held are gone, every table is copied again.
    SlotLost,
    /// `add_tables` added it to a running mirror.
    Added,
    /// It was created while the mirror mirrors all tables of the database.
    NewTable,
    /// A partitioned table whose partitions changed (attached, detached, created or dropped): rows
    /// came or went without a change of their own in the stream.
    PartitionsChanged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Requested => "requested by resync_table",
            Reason::Truncated => "the table was truncated",
            Reason::ColumnsChanged => "the table's columns changed",
            Reason::SlotLost => "the replication slot was lost",
            Reason::Added => "added by add_tables",
            Reason::NewTable => "a new table of a mirror of all tables",
            Reason::PartitionsChanged => "its partitions changed",
        }
    }
}

/// Where a reseed is: holding since `hold_lsn` and waiting for `waiting` (full transaction ids) to end,
/// out of `running_at_hold`, the transactions running when the hold began (the copy's snapshot must
/// see every one of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub hold_lsn: u64,
    pub waiting: Vec<u64>,
    pub running_at_hold: Vec<u64>,
}

/// Whether a copy taken in snapshot `s` may be used for a hold: it sees every transaction that was
/// running when the hold began.
pub fn sees_all(s: &Visibility, running_at_hold: &[u64]) -> bool {
    running_at_hold.iter().all(|x| s.sees(*x))
}

impl Hold {
    /// The LSN the slot may be confirmed to while holding: never past the hold point.
    pub fn cap(&self, lsn: u64) -> u64 {
        lsn.min(self.hold_lsn)
    }
}

/// How long a reset table whose folder held files waits, at least, for the landing zone's reader to
/// notice the deletion when the reader was never seen holding the table (it may have been reading
/// the folder without having created the table yet). Capped by `azure_cdc.table_reset_timeout`.
pub const RESET_SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

/// What is known of a table being reset (its folder deleted) downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetWait {
    /// The folder held something when it was deleted (now or by an earlier attempt whose copy is
    /// not published).
    pub existed: bool,
    /// The reader was seen holding the table after the deletion.
    pub seen_held: bool,
}

impl ResetWait {
    /// Whether the table may be published again, given whether the reader holds it now (None:
    /// nothing downstream is known) and how long ago the folder was deleted. Seeing the table held
    /// and then gone is proof that the reader dropped it; a table never seen held is taken as gone
    /// only `settle` after the deletion, when the folder held files the reader may have read.
    pub fn done(&mut self, held: Option<bool>, waited: std::time::Duration, settle: std::time::Duration) -> bool {
        match held {
            None => true,
            Some(true) => {
                self.seen_held = true;
                false
            }
            Some(false) => !self.existed || self.seen_held || waited >= settle,
        }
    }
}

/// Parses PostgreSQL's text form of a snapshot (`pg_snapshot`, full transaction ids):
/// `xmin:xmax:xip1,xip2,…`.
pub fn parse_snapshot(text: &str) -> Result<Visibility> {
    let bad = || Error::new(ErrorKind::Internal, format!("malformed snapshot \"{text}\""));
    let mut parts = text.trim().splitn(3, ':');
    let xmin = parts.next().and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad)?;
    let xmax = parts.next().and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad)?;
    let rest = parts.next().ok_or_else(bad)?;
    let mut running = HashSet::new();
    for x in rest.split(',').filter(|x| !x.is_empty()) {
        running.insert(x.parse::<u64>().map_err(|_| bad())?);
    }
    if xmin > xmax || running.iter().any(|x| *x < xmin || *x >= xmax) {
        return Err(bad());
    }
    Ok(Visibility { xmin, xmax, running })
}

/// The text form [`parse_snapshot`] reads (running ids sorted).
pub fn snapshot_text(v: &Visibility) -> String {
    let mut running: Vec<u64> = v.running.iter().copied().collect();
    running.sort_unstable();
    let list: Vec<String> = running.iter().map(|x| x.to_string()).collect();
    format!("{}:{}:{}", v.xmin, v.xmax, list.join(","))
}

/// Whether a change of transaction `xid` must be dropped for a table reseeded in snapshot `seed`:
/// the copy already holds it.
pub fn in_copy(seed: Option<&Visibility>, xid: u64) -> bool {
    seed.is_some_and(|s| s.sees(xid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip() {
        let v = parse_snapshot("740:750:741,745").unwrap();
        assert_eq!(v.xmin, 740);
        assert_eq!(v.xmax, 750);
        assert!(v.sees(739) && !v.sees(741) && v.sees(742) && !v.sees(745) && !v.sees(750));
        assert_eq!(snapshot_text(&v), "740:750:741,745");
        assert_eq!(parse_snapshot(&snapshot_text(&v)).unwrap(), v);
        let empty = parse_snapshot("12:12:").unwrap();
        assert!(empty.running.is_empty() && empty.sees(11) && !empty.sees(12));
        assert_eq!(snapshot_text(&empty), "12:12:");
        // Epoch-extended ids beyond 32 bits.
        let big = parse_snapshot("4294967300:4294967310:4294967301").unwrap();
        assert!(!big.sees(4294967301) && big.sees(4294967302));
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        for bad in ["", "1", "1:2", "x:2:", "5:4:", "1:5:7", "1:5:0", "1:5:a"] {
            assert!(parse_snapshot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_reset_waits_for_proof_that_the_reader_dropped_the_table() {
        use std::time::Duration as D;
        let settle = D::from_secs(60);
        // Nothing downstream known: publish again at once.
        assert!(ResetWait { existed: true, seen_held: false }.done(None, D::ZERO, settle));
        // A folder that held nothing: gone is gone.
        assert!(ResetWait { existed: false, seen_held: false }.done(Some(false), D::ZERO, settle));
        // Held, then gone: proof.
        let mut w = ResetWait { existed: true, seen_held: false };
        assert!(!w.done(Some(true), D::from_secs(1), settle));
        assert!(w.done(Some(false), D::from_secs(2), settle));
        // Never seen held although the folder held files: only after the settle time.
        let mut w = ResetWait { existed: true, seen_held: false };
        assert!(!w.done(Some(false), D::from_secs(59), settle));
        assert!(w.done(Some(false), D::from_secs(60), settle));
    }

    #[test]
    fn hold_caps_confirmation() {
        let h = Hold { hold_lsn: 1000, waiting: vec![], running_at_hold: vec![] };
        assert_eq!(h.cap(900), 900);
        assert_eq!(h.cap(1000), 1000);
        assert_eq!(h.cap(5000), 1000);
    }

    #[test]
    fn copy_must_see_what_ran_at_the_hold() {
        let s = parse_snapshot("100:110:103").unwrap();
        assert!(sees_all(&s, &[]));
        assert!(sees_all(&s, &[101, 102]));
        assert!(!sees_all(&s, &[101, 103]), "103 still running: committed before the hold yet not in the copy");
        assert!(!sees_all(&s, &[110]));
    }

    #[test]
    fn copy_filter() {
        let s = parse_snapshot("100:110:103").unwrap();
        assert!(in_copy(Some(&s), 99));
        assert!(in_copy(Some(&s), 104));
        assert!(!in_copy(Some(&s), 103), "running when the copy was taken: shipped after it");
        assert!(!in_copy(Some(&s), 110));
        assert!(!in_copy(None, 1), "a table not reseeded drops nothing");
    }
}
