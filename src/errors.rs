//! The SQL edge of azure_cdc's error type: turns an `azure_cdc_core::Error` into a PostgreSQL error
//! with the matching SQLSTATE, message, detail and hint, and adapts errors of pgrx's SPI layer.
//! Runs on the main thread of a backend or worker (it calls `ereport`).

use azure_cdc_core::{Error, ErrorKind};
use pgrx::prelude::*;

fn sqlstate(kind: ErrorKind) -> PgSqlErrorCode {
    use PgSqlErrorCode::*;
    match kind {
        ErrorKind::InvalidName => ERRCODE_INVALID_NAME,
        ErrorKind::InvalidParameter => ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorKind::DuplicateObject => ERRCODE_DUPLICATE_OBJECT,
        ErrorKind::UndefinedObject => ERRCODE_UNDEFINED_OBJECT,
        ErrorKind::UndefinedTable => ERRCODE_UNDEFINED_TABLE,
        ErrorKind::WrongObjectType => ERRCODE_WRONG_OBJECT_TYPE,
        ErrorKind::InsufficientPrivilege | ErrorKind::OwnerPrivilege | ErrorKind::TablePrivilege => {
            ERRCODE_INSUFFICIENT_PRIVILEGE
        }
        ErrorKind::PrerequisiteNotMet => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        ErrorKind::ConfigurationLimit => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        ErrorKind::ObjectInUse => ERRCODE_OBJECT_IN_USE,
        ErrorKind::TargetIo => ERRCODE_IO_ERROR,
        ErrorKind::TargetAuthentication => ERRCODE_INVALID_PASSWORD,
        ErrorKind::TargetPermission => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        ErrorKind::TargetMissing => ERRCODE_UNDEFINED_FILE,
        ErrorKind::SlotInvalidated => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        ErrorKind::DataConversion => ERRCODE_DATA_EXCEPTION,
        ErrorKind::FeatureNotSupported => ERRCODE_FEATURE_NOT_SUPPORTED,
        ErrorKind::Internal => ERRCODE_INTERNAL_ERROR,
    }
}

thread_local! {
    /// The last error [`raise`] raised in this process, so that a worker catching it again (it may
    /// cross PostgreSQL's code, as from a logical decoding callback) gets back its kind, not only its
    /// SQLSTATE and text.
    static RAISED: std::cell::RefCell<Option<Error>> = const { std::cell::RefCell::new(None) };
}

/// The error [`raise`] raised last, if its message is `message` (else it was another error); taken.
pub fn take_raised(message: &str) -> Option<Error> {
    RAISED.with(|r| r.borrow_mut().take()).filter(|e| e.message == message)
}

/// Raises `e` as a PostgreSQL ERROR. Never returns.
pub fn raise(e: Error) -> ! {
    RAISED.with(|r| *r.borrow_mut() = Some(e.clone()));
    let mut report = pgrx::pg_sys::panic::ErrorReport::new(sqlstate(e.kind), e.message, "azure_cdc");
    if let Some(d) = e.detail {
        report = report.set_detail(d);
    }
    if let Some(h) = e.hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// Unwraps a result at the SQL edge, raising the error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, Error> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}

/// An SPI failure is a bug or a broken catalog: an internal error.
pub fn spi(e: pgrx::spi::SpiError) -> Error {
    Error::new(ErrorKind::Internal, format!("catalog query failed: {e}"))
}
