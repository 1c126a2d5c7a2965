//! Health of a server's mirrors, as pure rules: the problems `get_health_status()` reports, each with
//! a stable code (`CDC_ERR_…` / `CDC_WARN_…`), a level and a hint; and the one-minute window the
//! decoder keeps in shared memory for changes/s and bytes/s. Pure: the extension gathers the facts.

use crate::error::ErrorKind;
use crate::lifecycle::{Health, MirrorState};

/// Samples of cumulative counters, one at most every [`RateWindow::STEP_MS`], enough to cover a minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateWindow {
    /// (time in ms, changes so far, bytes so far); time 0 marks an unused sample.
    samples: [(i64, u64, u64); 16],
    next: usize,
}

impl RateWindow {
    pub const STEP_MS: i64 = 5_000;
    pub const SPAN_MS: i64 = 60_000;

    /// Adds a sample of the counters at `now_ms`, unless the last one is younger than a step.
    pub fn record(&mut self, now_ms: i64, changes: u64, bytes: u64) {
        let last = self.samples[(self.next + self.samples.len() - 1) % self.samples.len()];
        if last.0 != 0 && now_ms - last.0 < Self::STEP_MS {
            return;
        }
        self.samples[self.next] = (now_ms, changes, bytes);
        self.next = (self.next + 1) % self.samples.len();
    }

    /// Changes per second and bytes per second between the oldest sample of the last minute and the
    /// counters now. (0, 0) without such a sample.
    pub fn per_second(&self, now_ms: i64, changes: u64, bytes: u64) -> (f64, f64) {
        let oldest = self
            .samples
            .iter()
            .filter(|s| s.0 != 0 && s.0 < now_ms && now_ms - s.0 <= Self::SPAN_MS)
            .min_by_key(|s| s.0);
        match oldest {
            Some(&(t, c, b)) => {
                let secs = (now_ms - t) as f64 / 1000.0;
                (changes.saturating_sub(c) as f64 / secs, bytes.saturating_sub(b) as f64 / secs)
            }
            None => (0.0, 0.0),
        }
    }
}

/// One problem found, at the level of the server, a mirror or a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub scope: &'static str,
    /// The mirror, `schema.table`, or the server's name for system problems.
    pub object: String,
    pub level: Health,
    pub code: &'static str,
    pub message: String,
    pub hint: String,
}

/// What the rules look at for one mirror.
#[derive(Debug, Clone, Default)]
pub struct MirrorFacts {
    pub name: String,
    pub state: Option<MirrorState>,
    /// Code ([`error_code`]) of the error in `last_error`, if any.
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    /// Whether the mirror's worker for its phase runs.
    pub worker_running: bool,
    /// `pg_replication_slots.wal_status` of its slot; None when the slot is missing.
    pub wal_status: Option<String>,
    /// `pg_replication_slots.safe_wal_size`: bytes of WAL that can still be written before the slot
    /// is invalidated; None when `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_size: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes; None when unlimited.
    pub max_slot_wal_keep_size: Option<i64>,
    /// Tables parked (state Failed) with their errors.
    pub failed_tables: Vec<(String, String)>,
    /// Tables without key columns.
    pub keyless_tables: Vec<String>,
}

/// The stable code of a worker's error, by its kind (recorded with the error in the catalog).
pub fn error_code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::TargetAuthentication => "CDC_ERR_TARGET_AUTHENTICATION_FAILED",
        ErrorKind::TargetPermission => "CDC_ERR_TARGET_PERMISSION_DENIED",
        ErrorKind::TargetMissing => "CDC_ERR_TARGET_NOT_FOUND",
        ErrorKind::TargetIo => "CDC_ERR_TARGET_UNREACHABLE",
        ErrorKind::SlotInvalidated => "CDC_ERR_SLOT_INVALIDATED",
        ErrorKind::OwnerPrivilege => "CDC_ERR_OWNER_PRIVILEGE",
        _ => "CDC_ERR_WORKER_FAILED",
    }
}

/// Every code [`error_code`] gives, as a static string.
fn known_code(code: &str) -> Option<&'static str> {
    [
        "CDC_ERR_TARGET_AUTHENTICATION_FAILED",
        "CDC_ERR_TARGET_PERMISSION_DENIED",
        "CDC_ERR_TARGET_NOT_FOUND",
        "CDC_ERR_TARGET_UNREACHABLE",
        "CDC_ERR_SLOT_INVALIDATED",
        "CDC_ERR_OWNER_PRIVILEGE",
        "CDC_ERR_WORKER_FAILED",
    ]
    .into_iter()
    .find(|c| *c == code)
}

/// The share of `max_slot_wal_keep_size` below which the remaining safe WAL is reported.
pub const WAL_RETENTION_WARNING_SHARE: f64 = 0.2;

/// The problems of one mirror and its tables.
pub fn mirror_problems(f: &MirrorFacts) -> Vec<Problem> {
    let mut out = Vec::new();
    let mirror = |level, code, message: String, hint: &str| Problem {
        scope: "mirror",
        object: f.name.clone(),
        level,
        code,
        message,
        hint: hint.to_string(),
    };
    let state = f.state;
    if matches!(state, Some(MirrorState::Stopped)) {
        return out;
    }
    let error = f.last_error.clone().unwrap_or_default();
    if matches!(state, Some(MirrorState::Failed)) {
        let code = f.last_error_code.as_deref().and_then(known_code).unwrap_or("CDC_ERR_WORKER_FAILED");
        let hint = if code == "CDC_ERR_SLOT_INVALIDATED" {
            "The server removed WAL the mirror had not read. Run SELECT azure_cdc.resume_mirror(...): the slot is created again and every table reseeded; consider a larger max_slot_wal_keep_size."
        } else if code == "CDC_ERR_OWNER_PRIVILEGE" {
            "Give the mirror's owner back what it lacks (see the message), then run SELECT azure_cdc.resume_mirror(...); or stop the mirror."
        } else {
            "Fix the cause (credential, permission, container), then run SELECT azure_cdc.resume_mirror(...)."
        };
        out.push(mirror(Health::Error, code, format!("mirror is Failed: {error}"), hint));
    } else if let Some(code) = &f.last_error_code {
        out.push(mirror(
            Health::Warning,
            known_code(code).unwrap_or("CDC_ERR_WORKER_FAILED"),
            format!("retrying after: {error}"),
            "The slot holds the WAL meanwhile; the mirror catches up when the cause goes away.",
        ));
    }
    if matches!(state, Some(MirrorState::Paused)) {
        out.push(mirror(
            Health::Warning,
            "CDC_WARN_MIRROR_PAUSED",
            "mirror is paused; its slot holds WAL".into(),
            "SELECT azure_cdc.resume_mirror(...) resumes it.",
        ));
    }
    let wants_workers = state.is_some_and(|s| s.wants_workers());
    if wants_workers && !f.worker_running && f.last_error_code.is_none() {
        out.push(mirror(
            Health::Warning,
            "CDC_WARN_WORKER_NOT_RUNNING",
            "no worker of this mirror runs at the moment".into(),
            "It starts within seconds; if it does not, check max_worker_processes and the server log.",
        ));
    }
    match f.wal_status.as_deref() {
        None if matches!(state, Some(MirrorState::Running) | Some(MirrorState::Paused)) => out.push(mirror(
            Health::Error,
            "CDC_ERR_SLOT_MISSING",
            "the mirror's replication slot does not exist".into(),
            "When the mirror runs, its decoder creates the slot again and reseeds every table (see the events table).",
        )),
        Some("lost") if !matches!(state, Some(MirrorState::Failed)) => out.push(mirror(
            Health::Error,
            "CDC_ERR_SLOT_INVALIDATED",
            "the mirror's replication slot was invalidated by max_slot_wal_keep_size".into(),
            "When the mirror runs, its decoder creates the slot again and reseeds every table (see the events table); consider a larger max_slot_wal_keep_size.",
        )),
        Some("unreserved") => out.push(mirror(
            Health::Error,
            "CDC_ERR_WAL_RETENTION_LIMIT_REACHED",
            "WAL the mirror has not read is beyond max_slot_wal_keep_size and will be removed at the next checkpoint"
                .into(),
            "Resolve what holds the mirror back (target, paused mirror) at once, or raise max_slot_wal_keep_size.",
        )),
        _ => {
            if let (Some(safe), Some(max)) = (f.safe_wal_size, f.max_slot_wal_keep_size) {
                if max > 0 && (safe as f64) < max as f64 * WAL_RETENTION_WARNING_SHARE {
                    out.push(mirror(
                        Health::Warning,
                        "CDC_WARN_WAL_RETENTION_NEAR_LIMIT",
                        format!("{safe} bytes of WAL remain before the slot reaches max_slot_wal_keep_size"),
                        "Resolve what holds the mirror back (target, paused mirror), or raise max_slot_wal_keep_size.",
                    ));
                }
            }
        }
    }
    for (table, error) in &f.failed_tables {
        out.push(Problem {
            scope: "table",
            object: table.clone(),
            level: Health::Error,
            code: "CDC_ERR_TABLE_FAILED",
            message: format!("table is parked: {error}"),
            hint: "The other tables go on. Once the cause is fixed, SELECT azure_cdc.resync_table(mirror, table) copies it again.".into(),
        });
    }
    for table in &f.keyless_tables {
        out.push(Problem {
            scope: "table",
            object: table.clone(),
            level: Health::Warning,
            code: "CDC_WARN_TABLE_WITHOUT_KEY",
            message: "table has no primary key or replica identity index: updates and deletes park it".into(),
            hint: "Inserts are mirrored. For updates and deletes add a primary key (or a unique index of NOT NULL columns), or set REPLICA IDENTITY FULL to use every column as the key, then SELECT azure_cdc.resync_table(mirror, table).".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_the_last_minute() {
        let mut w = RateWindow::default();
        assert_eq!(w.per_second(1_000, 0, 0), (0.0, 0.0));
        w.record(1_000, 0, 0);
        w.record(3_000, 50, 500); // younger than a step: ignored
        w.record(6_000, 100, 1_000);
        assert_eq!(w.per_second(11_000, 1_000, 10_000), (100.0, 1_000.0));
        // A minute later the first samples are out of the window.
        for t in (11_000..=70_000).step_by(5_000) {
            w.record(t, 1_000, 10_000);
        }
        assert_eq!(w.per_second(71_000, 1_000, 10_000), (0.0, 0.0));
        assert_eq!(w.per_second(71_000, 1_600, 10_000).0, 10.0);
    }

    #[test]
    fn error_codes_follow_the_error_kind() {
        for k in [
            ErrorKind::TargetPermission,
            ErrorKind::TargetAuthentication,
            ErrorKind::TargetMissing,
            ErrorKind::TargetIo,
            ErrorKind::SlotInvalidated,
            ErrorKind::Internal,
        ] {
            assert_eq!(known_code(error_code(k)), Some(error_code(k)), "{k:?}");
        }
        assert_eq!(error_code(ErrorKind::TargetPermission), "CDC_ERR_TARGET_PERMISSION_DENIED");
        assert_eq!(error_code(ErrorKind::Internal), "CDC_ERR_WORKER_FAILED");
        assert_eq!(known_code("nonsense"), None);
    }

    fn facts(state: MirrorState) -> MirrorFacts {
        MirrorFacts {
            name: "m".into(),
            state: Some(state),
            worker_running: true,
            wal_status: Some("reserved".into()),
            ..Default::default()
        }
    }

    fn codes(f: &MirrorFacts) -> Vec<&'static str> {
        mirror_problems(f).iter().map(|p| p.code).collect()
    }

    #[test]
    fn a_healthy_mirror_has_no_problem() {
        assert!(codes(&facts(MirrorState::Running)).is_empty());
        assert!(codes(&facts(MirrorState::Stopped)).is_empty());
    }

    #[test]
    fn problems_and_their_levels() {
        let mut f = facts(MirrorState::Running);
        f.last_error_code = Some(error_code(ErrorKind::TargetIo).into());
        f.last_error = Some("could not upload".into());
        let p = mirror_problems(&f);
        assert_eq!(p[0].code, "CDC_ERR_TARGET_UNREACHABLE");
        assert_eq!(p[0].level, Health::Warning);

        let mut f = facts(MirrorState::Failed);
        f.worker_running = false;
        f.last_error_code = Some(error_code(ErrorKind::TargetPermission).into());
        let p = mirror_problems(&f);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].code, p[0].level), ("CDC_ERR_TARGET_PERMISSION_DENIED", Health::Error));
        assert!(p[0].hint.contains("resume_mirror"));

        let mut f = facts(MirrorState::Paused);
        f.worker_running = false;
        f.safe_wal_size = Some(10 << 20);
        f.max_slot_wal_keep_size = Some(100 << 20);
        assert_eq!(codes(&f), vec!["CDC_WARN_MIRROR_PAUSED", "CDC_WARN_WAL_RETENTION_NEAR_LIMIT"]);
        f.safe_wal_size = Some(30 << 20);
        assert_eq!(codes(&f), vec!["CDC_WARN_MIRROR_PAUSED"]);
        f.wal_status = Some("lost".into());
        assert_eq!(codes(&f), vec!["CDC_WARN_MIRROR_PAUSED", "CDC_ERR_SLOT_INVALIDATED"]);
        f.wal_status = None;
        assert_eq!(codes(&f), vec!["CDC_WARN_MIRROR_PAUSED", "CDC_ERR_SLOT_MISSING"]);

        let mut f = facts(MirrorState::Running);
        f.worker_running = false;
        f.failed_tables = vec![("public.t".into(), "TRUNCATE".into())];
        f.keyless_tables = vec!["public.k".into()];
        let p = mirror_problems(&f);
        assert_eq!(
            p.iter().map(|p| (p.scope, p.code)).collect::<Vec<_>>(),
            vec![
                ("mirror", "CDC_WARN_WORKER_NOT_RUNNING"),
                ("table", "CDC_ERR_TABLE_FAILED"),
                ("table", "CDC_WARN_TABLE_WITHOUT_KEY")
            ]
        );
    }
}
