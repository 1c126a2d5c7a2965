//! The one error type of azure_cdc. Its [`ErrorKind`] decides what happens next: report to the SQL
//! caller, park one table, stop the mirror, or retry later. Pure: the extension maps the kind to a
//! PostgreSQL SQLSTATE at the SQL edge.

use std::fmt;

/// What went wrong, in terms of what the caller should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A name does not follow the identifier rules (SQLSTATE 42602).
    InvalidName,
    /// An argument value is not acceptable (22023).
    InvalidParameter,
    /// The object already exists (42710).
    DuplicateObject,
    /// The named object does not exist (42704).
    UndefinedObject,
    /// The named table does not exist (42P01).
    UndefinedTable,
    /// The object is of the wrong kind, e.g. a view where a table is needed (42809).
    WrongObjectType,
    /// The caller lacks a privilege (42501).
    InsufficientPrivilege,
    /// The mirror's owner no longer holds a right the mirror needs (azure_cdc_admin, REPLICATION,
    /// writing server files for a local folder), or the role is gone (42501). Stops the mirror.
    OwnerPrivilege,
    /// The mirror's owner may no longer mirror one table (it does not own it, or row-level security
    /// applies to it) (42501). Parks the table.
    TablePrivilege,
    /// A server prerequisite is not met (55000).
    PrerequisiteNotMet,
    /// A configured limit is reached (53400).
    ConfigurationLimit,
    /// The object is busy (55006).
    ObjectInUse,
    /// Reading or writing the target failed (58030), e.g. it is unreachable. Retried with back-off.
    TargetIo,
    /// The target rejected the credential (28P01). Stops the mirror.
    TargetAuthentication,
    /// The credential is valid but may not write to the target (28000). Stops the mirror.
    TargetPermission,
    /// The container or bucket does not exist (58P01). Stops the mirror.
    TargetMissing,
    /// The mirror's slot was invalidated (`max_slot_wal_keep_size`): WAL it had not read is gone
    /// (55000, as PostgreSQL reports it). Stops the mirror.
    SlotInvalidated,
    /// A value cannot be represented in the landing zone (22000). Parks the table.
    DataConversion,
    /// A change this build cannot mirror for one table (0A000), e.g. an update of a table without key
    /// columns. Parks the table.
    FeatureNotSupported,
    /// A bug or an unexpected state (XX000).
    Internal,
}

/// What the process that hit the error does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Raise it to the SQL caller.
    ReportToCaller,
    /// Mark the one table Failed with the error; the other tables go on.
    ParkTable,
    /// Give up this attempt; the launcher restarts the worker with back-off.
    Retry,
    /// Nothing will change by retrying: mark the mirror Failed until an operator resumes it.
    StopMirror,
}

impl ErrorKind {
    /// The SQLSTATE PostgreSQL reports for this kind.
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorKind::InvalidName => "42602",
            ErrorKind::InvalidParameter => "22023",
            ErrorKind::DuplicateObject => "42710",
            ErrorKind::UndefinedObject => "42704",
            ErrorKind::UndefinedTable => "42P01",
            ErrorKind::WrongObjectType => "42809",
            ErrorKind::InsufficientPrivilege | ErrorKind::OwnerPrivilege | ErrorKind::TablePrivilege => "42501",
            ErrorKind::PrerequisiteNotMet => "55000",
            ErrorKind::ConfigurationLimit => "53400",
            ErrorKind::ObjectInUse => "55006",
            ErrorKind::TargetIo => "58030",
            ErrorKind::TargetAuthentication => "28P01",
            ErrorKind::TargetPermission => "28000",
            ErrorKind::TargetMissing => "58P01",
            ErrorKind::SlotInvalidated => "55000",
            ErrorKind::DataConversion => "22000",
            ErrorKind::FeatureNotSupported => "0A000",
            ErrorKind::Internal => "XX000",
        }
    }

    /// What a background worker does with an error of this kind.
    pub fn disposition(self) -> Disposition {
        match self {
            ErrorKind::DataConversion | ErrorKind::FeatureNotSupported | ErrorKind::TablePrivilege => {
                Disposition::ParkTable
            }
            ErrorKind::TargetIo | ErrorKind::Internal | ErrorKind::ObjectInUse => Disposition::Retry,
            ErrorKind::TargetAuthentication
            | ErrorKind::TargetPermission
            | ErrorKind::TargetMissing
            | ErrorKind::SlotInvalidated
            | ErrorKind::OwnerPrivilege => Disposition::StopMirror,
            _ => Disposition::ReportToCaller,
        }
    }
}

/// An error with a PostgreSQL-style message (lower case, no trailing period), optional detail and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), detail: None, hint: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A target I/O error, keeping the operating system's message and the path involved.
    pub fn io(action: &str, path: &std::path::Path, err: &std::io::Error) -> Self {
        Error::new(ErrorKind::TargetIo, format!("could not {action} \"{}\": {err}", path.display()))
    }

    /// The message followed by detail and hint, for a status column or a log line.
    pub fn full_text(&self) -> String {
        let mut s = self.message.clone();
        if let Some(d) = &self.detail {
            s.push_str("; detail: ");
            s.push_str(d);
        }
        if let Some(h) = &self.hint {
            s.push_str("; hint: ");
            s.push_str(h);
        }
        s
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full_text())
    }
}

impl std::error::Error for Error {}

impl From<parquet::errors::ParquetError> for Error {
    /// A failure of the file being written (a target error carried through the `Write` interface, or
    /// an I/O error) keeps its kind; anything else is an encoding bug.
    fn from(e: parquet::errors::ParquetError) -> Self {
        if let parquet::errors::ParquetError::External(inner) = &e {
            if let Some(io) = inner.downcast_ref::<std::io::Error>() {
                if let Some(ours) = io.get_ref().and_then(|r| r.downcast_ref::<Error>()) {
                    return ours.clone();
                }
                return Error::new(ErrorKind::TargetIo, format!("could not write a data file: {io}"));
            }
        }
        Error::new(ErrorKind::Internal, format!("could not encode a Parquet file: {e}"))
    }
}

impl From<arrow_schema::ArrowError> for Error {
    fn from(e: arrow_schema::ArrowError) -> Self {
        Error::new(ErrorKind::Internal, format!("could not build a column batch: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_five_characters_and_distinct() {
        let kinds = [
            ErrorKind::InvalidName,
            ErrorKind::InvalidParameter,
            ErrorKind::DuplicateObject,
            ErrorKind::UndefinedObject,
            ErrorKind::UndefinedTable,
            ErrorKind::WrongObjectType,
            ErrorKind::InsufficientPrivilege,
            ErrorKind::PrerequisiteNotMet,
            ErrorKind::ConfigurationLimit,
            ErrorKind::ObjectInUse,
            ErrorKind::TargetIo,
            ErrorKind::TargetAuthentication,
            ErrorKind::TargetPermission,
            ErrorKind::TargetMissing,
            ErrorKind::DataConversion,
            ErrorKind::FeatureNotSupported,
            ErrorKind::Internal,
        ];
        let mut seen = std::collections::HashSet::new();
        // SlotInvalidated shares 55000 with PrerequisiteNotMet on purpose: it is PostgreSQL's own
        // SQLSTATE for reading an invalidated slot.
        assert_eq!(ErrorKind::SlotInvalidated.sqlstate(), ErrorKind::PrerequisiteNotMet.sqlstate());
        for k in kinds {
            assert_eq!(k.sqlstate().len(), 5);
            assert!(seen.insert(k.sqlstate()), "{k:?} reuses a SQLSTATE");
        }
    }

    #[test]
    fn conversion_errors_park_only_the_table() {
        assert_eq!(ErrorKind::DataConversion.disposition(), Disposition::ParkTable);
        assert_eq!(ErrorKind::TargetIo.disposition(), Disposition::Retry);
        assert_eq!(ErrorKind::InvalidName.disposition(), Disposition::ReportToCaller);
        assert_eq!(ErrorKind::TargetPermission.disposition(), Disposition::StopMirror);
        assert_eq!(ErrorKind::TablePrivilege.disposition(), Disposition::ParkTable);
        assert_eq!(ErrorKind::OwnerPrivilege.disposition(), Disposition::StopMirror);
        assert_eq!(ErrorKind::InsufficientPrivilege.disposition(), Disposition::ReportToCaller);
        for k in [ErrorKind::OwnerPrivilege, ErrorKind::TablePrivilege] {
            assert_eq!(k.sqlstate(), ErrorKind::InsufficientPrivilege.sqlstate(), "{k:?} is a privilege error");
        }
    }

    #[test]
    fn a_target_error_inside_a_parquet_error_keeps_its_kind() {
        let ours = Error::new(ErrorKind::TargetMissing, "no container");
        let pe = parquet::errors::ParquetError::External(Box::new(std::io::Error::other(ours.clone())));
        assert_eq!(Error::from(pe), ours);
        let pe = parquet::errors::ParquetError::External(Box::new(std::io::Error::other("disk full")));
        assert_eq!(Error::from(pe).kind, ErrorKind::TargetIo);
    }

    #[test]
    fn full_text_joins_detail_and_hint() {
        let e = Error::new(ErrorKind::InvalidParameter, "bad").with_detail("d").with_hint("h");
        assert_eq!(e.full_text(), "bad; detail: d; hint: h");
    }
}
