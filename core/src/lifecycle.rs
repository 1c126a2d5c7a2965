//! The lifecycle of a mirrored table and of a mirror, as pure state-transition functions.
//!
//! Table states (as users see them in `get_all_tables_mirror_status()`):
//! ```text
//!   Snapshotting --SnapshotPublished--> Replicating
//!   Snapshotting --Failed-------------> Failed
//!   Failed       --SnapshotRestarted--> Snapshotting   (a new attempt of the whole mirror's snapshot)
//!   Snapshotting --SnapshotRestarted--> Snapshotting
//!   Replicating  --SnapshotRestarted--> Snapshotting   (copied by a helper of an attempt that failed:
//!                                                        the mirror was never Running, all is copied again)
//!   Replicating  --ReseedRequested----> Reseeding      (resync_table, TRUNCATE, a column change the
//!   Failed       --ReseedRequested----> Reseeding       files cannot express, a lost slot)
//!   Reseeding    --ReseedRequested----> Reseeding
//!   Reseeding    --SnapshotPublished--> Replicating    (its folder rebuilt, numbers from 1)
//!   Reseeding    --Failed-------------> Failed
//!   Stopped      --Added--------------> Reseeding      (add_tables of a table removed before)
//!   any          --Dropped------------> Dropped        (DROP TABLE; its files are kept)
//!   any          --Stopped------------> Stopped        (stop_mirror, remove_tables)
//! ```
//! Replicating means: the snapshot is published and the mirror's decoder publishes the table's changes
//! from the snapshot's consistent point on. The decoder parks a table it cannot follow
//! (Replicating --Failed--> Failed). Reseeding means: the decoder copies the table again while it
//! streams the others ([`crate::reseed`] says how the hand-off stays exact).

use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableState {
    Snapshotting,
    Replicating,
    Reseeding,
    Stopped,
    Failed,
    /// The source table was dropped; its files are kept as they were.
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEvent {
    SnapshotPublished,
    ReseedRequested,
    Added,
    Dropped,
    SnapshotRestarted,
    Failed,
    Stopped,
}

/// OK / WARNING / ERROR, as in Fabric's status functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Warning,
    Error,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warning => "WARNING",
            Health::Error => "ERROR",
        }
    }
}

impl TableState {
    pub const ALL: [TableState; 6] = [
        TableState::Snapshotting,
        TableState::Replicating,
        TableState::Reseeding,
        TableState::Stopped,
        TableState::Failed,
        TableState::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TableState::Snapshotting => "Snapshotting",
            TableState::Replicating => "Replicating",
            TableState::Reseeding => "Reseeding",
            TableState::Stopped => "Stopped",
            TableState::Failed => "Failed",
            TableState::Dropped => "Dropped",
        }
    }

    pub fn parse(s: &str) -> Result<TableState> {
        TableState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::new(ErrorKind::Internal, format!("unknown table state \"{s}\"")))
    }

    /// The state after `event`, or an error for a transition that must not happen.
    pub fn on(self, event: TableEvent) -> Result<TableState> {
        use TableEvent as E;
        use TableState as S;
        match (self, event) {
            (_, E::Stopped) => Ok(S::Stopped),
            (_, E::Dropped) => Ok(S::Dropped),
            (S::Stopped, E::Added) => Ok(S::Reseeding),
            (S::Snapshotting | S::Reseeding, E::SnapshotPublished) => Ok(S::Replicating),
            (S::Snapshotting | S::Replicating | S::Failed, E::SnapshotRestarted) => Ok(S::Snapshotting),
            (S::Replicating | S::Reseeding | S::Failed, E::ReseedRequested) => Ok(S::Reseeding),
            (S::Snapshotting | S::Replicating | S::Reseeding, E::Failed) => Ok(S::Failed),
            (s, e) => {
                Err(Error::new(ErrorKind::Internal, format!("table state {} cannot take event {e:?}", s.as_str())))
            }
        }
    }

    /// The health shown next to the state: Failed (the table's, or its mirror's) is an error; an
    /// error being retried, or a table without key columns (its rows can be inserted but later
    /// updates and deletes cannot be expressed), is a warning.
    pub fn health(self, has_key_columns: bool, has_error: bool, mirror: MirrorState) -> Health {
        match self {
            TableState::Failed => Health::Error,
            _ if mirror == MirrorState::Failed => Health::Error,
            TableState::Stopped | TableState::Dropped => Health::Ok,
            _ if has_error || !has_key_columns => Health::Warning,
            _ => Health::Ok,
        }
    }
}

/// Mirror states (catalog `azure_cdc.mirrors.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorState {
    /// Recorded; its snapshot has not completed yet.
    Starting,
    /// Its snapshot is published.
    Running,
    /// Its target refused it for good (credential rejected, permission denied, container gone). No
    /// worker runs; the slot is kept and holds WAL. `resume_mirror` takes it back to Starting or
    /// Running once the cause is fixed.
    Failed,
    /// Paused by `pause_mirror`: no worker runs; the slot is kept and holds WAL. `resume_mirror`
    /// takes it back to Starting or Running.
    Paused,
    Stopped,
}

impl MirrorState {
    pub const ALL: [MirrorState; 5] =
        [MirrorState::Starting, MirrorState::Running, MirrorState::Failed, MirrorState::Paused, MirrorState::Stopped];

    pub fn as_str(self) -> &'static str {
        match self {
            MirrorState::Starting => "Starting",
            MirrorState::Running => "Running",
            MirrorState::Failed => "Failed",
            MirrorState::Paused => "Paused",
            MirrorState::Stopped => "Stopped",
        }
    }

    pub fn parse(s: &str) -> Result<MirrorState> {
        MirrorState::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| Error::new(ErrorKind::Internal, format!("unknown mirror state \"{s}\"")))
    }

    /// Whether the mirror holds a place among `max_fabric_mirrors` (it has a slot).
    pub fn is_active(self) -> bool {
        !matches!(self, MirrorState::Stopped)
    }

    /// Whether its workers should run.
    pub fn wants_workers(self) -> bool {
        matches!(self, MirrorState::Starting | MirrorState::Running)
    }

    /// The state `resume_mirror` returns a Failed or Paused mirror to.
    pub fn resumed(snapshot_completed: bool) -> MirrorState {
        if snapshot_completed {
            MirrorState::Running
        } else {
            MirrorState::Starting
        }
    }
}

/// What the events table (`azure_cdc.events`) records, newest last. Only the extension writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `start_mirror` recorded the mirror.
    Started,
    /// The initial snapshot is published; the mirror is Running.
    SnapshotPublished,
    /// A worker's attempt failed; it is retried with back-off.
    Error,
    /// The mirror stopped for good (the target refused it, or its owner lost a right it needs).
    Failed,
    /// Publishing works again after an error.
    Recovered,
    /// `remove_tables` took the table out of the mirror.
    TableRemoved,
    /// The source table was dropped; its files are kept.
    Dropped,
    /// Columns were added or dropped and later files follow them.
    ColumnsChanged,
    /// The table was parked (Failed) with its error.
    TableFailed,
    /// A table of a mirror of all tables was left out (its owner is not the mirror's owner).
    TableSkipped,
    /// The table is to be copied again, with why.
    ReseedRequested,
    /// The table's new copy is published.
    Reseeded,
    /// The slot was invalidated or dropped; it was created again and every table reseeded.
    SlotLost,
    Paused,
    Resumed,
    Stopped,
}

impl Event {
    pub const ALL: [Event; 16] = [
        Event::Started,
        Event::SnapshotPublished,
        Event::Error,
        Event::Failed,
        Event::Recovered,
        Event::TableRemoved,
        Event::Dropped,
        Event::ColumnsChanged,
        Event::TableFailed,
        Event::TableSkipped,
        Event::ReseedRequested,
        Event::Reseeded,
        Event::SlotLost,
        Event::Paused,
        Event::Resumed,
        Event::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Started => "Started",
            Event::SnapshotPublished => "SnapshotPublished",
            Event::Error => "Error",
            Event::Failed => "Failed",
            Event::Recovered => "Recovered",
            Event::TableRemoved => "TableRemoved",
            Event::Dropped => "Dropped",
            Event::ColumnsChanged => "ColumnsChanged",
            Event::TableFailed => "TableFailed",
            Event::TableSkipped => "TableSkipped",
            Event::ReseedRequested => "ReseedRequested",
            Event::Reseeded => "Reseeded",
            Event::SlotLost => "SlotLost",
            Event::Paused => "Paused",
            Event::Resumed => "Resumed",
            Event::Stopped => "Stopped",
        }
    }
}

/// Back-off before restarting a worker that failed `failures` times in a row: 1 s doubling to 5 min.
pub fn restart_backoff_secs(failures: u32) -> u64 {
    let exp = failures.saturating_sub(1).min(9);
    (1u64 << exp).min(300)
}

/// The back-off with jitter: `restart_backoff_secs` stretched by up to a quarter, by `random` in
/// [0, 1), so that workers failing on the same outage do not all retry at the same moment.
pub fn restart_backoff(failures: u32, random: f64) -> std::time::Duration {
    let base = restart_backoff_secs(failures) as f64;
    std::time::Duration::from_secs_f64(base * (1.0 + 0.25 * random.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use TableEvent as E;
    use TableState as S;

    #[test]
    fn transitions() {
        assert_eq!(S::Snapshotting.on(E::SnapshotPublished).unwrap(), S::Replicating);
        assert_eq!(S::Snapshotting.on(E::Failed).unwrap(), S::Failed);
        assert_eq!(S::Failed.on(E::SnapshotRestarted).unwrap(), S::Snapshotting);
        for s in S::ALL {
            assert_eq!(s.on(E::Stopped).unwrap(), S::Stopped);
        }
        assert!(S::Replicating.on(E::SnapshotPublished).is_err());
        assert!(S::Stopped.on(E::SnapshotPublished).is_err());
        // A helper commits its tables Replicating; the attempt may still fail (another table).
        assert_eq!(S::Replicating.on(E::SnapshotRestarted).unwrap(), S::Snapshotting);
        assert!(S::Reseeding.on(E::SnapshotRestarted).is_err());
        assert!(S::Stopped.on(E::Failed).is_err());
        assert_eq!(S::Replicating.on(E::ReseedRequested).unwrap(), S::Reseeding);
        assert_eq!(S::Failed.on(E::ReseedRequested).unwrap(), S::Reseeding, "resync_table recovers a parked table");
        assert_eq!(S::Reseeding.on(E::ReseedRequested).unwrap(), S::Reseeding);
        assert_eq!(S::Reseeding.on(E::SnapshotPublished).unwrap(), S::Replicating);
        assert_eq!(S::Reseeding.on(E::Failed).unwrap(), S::Failed);
        assert!(S::Snapshotting.on(E::ReseedRequested).is_err(), "the initial snapshot covers it");
        assert!(S::Stopped.on(E::ReseedRequested).is_err());
        assert_eq!(S::Stopped.on(E::Added).unwrap(), S::Reseeding, "add_tables of a removed table");
        assert!(S::Replicating.on(E::Added).is_err(), "already mirrored");
        for s in S::ALL {
            assert_eq!(s.on(E::Dropped).unwrap(), S::Dropped);
        }
        assert!(S::Dropped.on(E::ReseedRequested).is_err());
    }

    #[test]
    fn names_round_trip() {
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()).unwrap(), s);
        }
        assert!(S::parse("Running").is_err());
        for m in MirrorState::ALL {
            assert_eq!(MirrorState::parse(m.as_str()).unwrap(), m);
        }
        assert!(!MirrorState::Stopped.is_active());
        assert!(MirrorState::Failed.is_active(), "a failed mirror keeps its slot and its place");
        assert!(!MirrorState::Failed.wants_workers());
        assert!(MirrorState::Paused.is_active() && !MirrorState::Paused.wants_workers());
        assert_eq!(MirrorState::resumed(false), MirrorState::Starting);
        assert_eq!(MirrorState::resumed(true), MirrorState::Running);
        let names: std::collections::HashSet<&str> = Event::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names.len(), Event::ALL.len(), "event names are distinct");
    }

    #[test]
    fn health() {
        let run = MirrorState::Running;
        assert_eq!(S::Failed.health(true, true, run), Health::Error);
        assert_eq!(S::Replicating.health(false, false, run), Health::Warning);
        assert_eq!(S::Snapshotting.health(true, true, run), Health::Warning);
        assert_eq!(S::Replicating.health(true, false, run), Health::Ok);
        assert_eq!(S::Replicating.health(true, true, MirrorState::Failed), Health::Error);
        assert_eq!(S::Stopped.health(false, false, MirrorState::Stopped), Health::Ok);
        assert_eq!(Health::Warning.as_str(), "WARNING");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(restart_backoff_secs(1), 1);
        assert_eq!(restart_backoff_secs(2), 2);
        assert_eq!(restart_backoff_secs(5), 16);
        assert_eq!(restart_backoff_secs(50), 300);
        assert_eq!(restart_backoff_secs(0), 1);
        assert_eq!(restart_backoff(3, 0.0).as_secs_f64(), 4.0);
        assert_eq!(restart_backoff(3, 0.5).as_secs_f64(), 4.5);
        assert!(restart_backoff(50, 0.999).as_secs_f64() < 375.0);
    }
}
