//! The mapping from PostgreSQL column types to landing-zone (Arrow/Parquet) columns, and the pure value
//! conversions it needs. Used by snapshot files and, later, change files. Pure.
//!
//! | PostgreSQL                     | Arrow / Parquet                          | value                                   |
//! |--------------------------------|------------------------------------------|-----------------------------------------|
//! | bool                           | Boolean                                  | as is                                   |
//! | int2 / int4 / int8             | Int16 / Int32 / Int64                    | as is                                   |
//! | float4 / float8                | Float32 / Float64                        | as is (NaN, ±Infinity, -0 kept)         |
//! | numeric(p,s), 1 ≤ p ≤ 38, 0 ≤ s ≤ p | Decimal128(p,s)                     | exact; NaN parks the table              |
//! | numeric (other)                | Utf8                                     | exactly `numeric_out`'s text            |
//! | text, varchar, char(n)         | Utf8                                     | as stored (char(n) keeps its padding)   |
//! | name                           | Utf8                                     | its text output                         |
//! | bytea                          | Binary                                   | the bytes                               |
//! | date                           | Date32                                   | days since 1970-01-01; ±infinity → i32::MAX / i32::MIN |
//! | time                           | Time64(µs)                               | µs since midnight                       |
//! | timestamp                      | Timestamp(µs)                            | µs since 1970; ±infinity → i64::MAX / i64::MIN |
//! | timestamptz                    | Timestamp(µs, "UTC")                     | same, UTC                               |
//! | uuid                           | Utf8                                     | canonical lower-case text               |
//! | json / jsonb                   | Utf8                                     | JSON text (jsonb normalised by the server) |
//! | arrays (any element type)      | Utf8                                     | JSON array (nested per dimension, NULL elements null) |
//! | composite types                | Utf8                                     | JSON object (field name → value)        |
//! | any other type (domains: their base type) | Utf8                          | the type's text output                  |

use arrow_schema::{DataType, TimeUnit};

use crate::error::{Error, ErrorKind, Result};

/// PostgreSQL type OIDs this module knows (from pg_type.dat; stable across versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// How one column is carried into the landing zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// numeric(p,s) that Parquet's decimal can hold exactly.
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// numeric without a usable declared precision: exact text.
    NumericText,
    /// text-like varlena types stored as the server stores text (text, varchar, char(n), json).
    Text,
    Bytes,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Uuid,
    /// jsonb, through the server's output function (normalised JSON text).
    Jsonb,
    /// An array of any type, as a JSON array (the server's `array_to_json`).
    JsonArray,
    /// A composite (row) type, as a JSON object (the server's `row_to_json`).
    JsonComposite,
    /// Every other type: its text output function.
    OtherText,
}

/// The column kind of a (base) type: arrays and composites (known from the type catalog) as JSON,
/// else by its OID and type modifier.
pub fn kind_for_type(type_oid: u32, typmod: i32, is_array: bool, is_composite: bool) -> ColumnKind {
    if is_array {
        ColumnKind::JsonArray
    } else if is_composite {
        ColumnKind::JsonComposite
    } else {
        kind_for(type_oid, typmod)
    }
}

/// The column kind of a (base) type OID and its type modifier.
pub fn kind_for(type_oid: u32, typmod: i32) -> ColumnKind {
    match type_oid {
        oid::BOOL => ColumnKind::Bool,
        oid::INT2 => ColumnKind::Int16,
        oid::INT4 => ColumnKind::Int32,
        oid::INT8 => ColumnKind::Int64,
        oid::FLOAT4 => ColumnKind::Float32,
        oid::FLOAT8 => ColumnKind::Float64,
        oid::NUMERIC => match numeric_typmod(typmod) {
            Some((p, s)) if (1..=38).contains(&p) && s >= 0 && s <= p => {
                ColumnKind::Decimal { precision: p as u8, scale: s as i8 }
            }
            _ => ColumnKind::NumericText,
        },
        // name is a fixed 64-byte C string, not a varlena: it goes through its output function.
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::JSON => ColumnKind::Text,
        oid::BYTEA => ColumnKind::Bytes,
        oid::DATE => ColumnKind::Date,
        oid::TIME => ColumnKind::Time,
        oid::TIMESTAMP => ColumnKind::Timestamp,
        oid::TIMESTAMPTZ => ColumnKind::TimestampTz,
        oid::UUID => ColumnKind::Uuid,
        oid::JSONB => ColumnKind::Jsonb,
        _ => ColumnKind::OtherText,
    }
}

/// (precision, scale) of a numeric type modifier, None when unconstrained. PostgreSQL 15 allows a scale
/// from -1000 to 1000 stored in 11 bits.
pub fn numeric_typmod(typmod: i32) -> Option<(i32, i32)> {
    const VARHDRSZ: i32 = 4;
    if typmod < VARHDRSZ {
        return None;
    }
    let t = typmod - VARHDRSZ;
    let precision = (t >> 16) & 0xFFFF;
    let scale = ((t & 0x7FF) ^ 1024) - 1024;
    Some((precision, scale))
}

/// The Arrow type of a column kind.
pub fn arrow_type(kind: ColumnKind) -> DataType {
    match kind {
        ColumnKind::Bool => DataType::Boolean,
        ColumnKind::Int16 => DataType::Int16,
        ColumnKind::Int32 => DataType::Int32,
        ColumnKind::Int64 => DataType::Int64,
        ColumnKind::Float32 => DataType::Float32,
        ColumnKind::Float64 => DataType::Float64,
        ColumnKind::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
        ColumnKind::Bytes => DataType::Binary,
        ColumnKind::Date => DataType::Date32,
        ColumnKind::Time => DataType::Time64(TimeUnit::Microsecond),
        ColumnKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        ColumnKind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnKind::NumericText
        | ColumnKind::Text
        | ColumnKind::Uuid
        | ColumnKind::Jsonb
        | ColumnKind::JsonArray
        | ColumnKind::JsonComposite
        | ColumnKind::OtherText => DataType::Utf8,
    }
}

/// A short description of the mapping, for the README and the status views.
pub fn describe(kind: ColumnKind) -> String {
    match kind {
        ColumnKind::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
        ColumnKind::NumericText => "string (exact numeric text)".into(),
        ColumnKind::Uuid => "string (uuid)".into(),
        ColumnKind::Jsonb => "string (json)".into(),
        ColumnKind::JsonArray => "string (json array)".into(),
        ColumnKind::JsonComposite => "string (json object)".into(),
        ColumnKind::OtherText => "string (text output)".into(),
        k => format!("{:?}", arrow_type(k)).to_lowercase(),
    }
}

/// Days between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A PostgreSQL date (days since 2000-01-01) as days since 1970-01-01. ±infinity keep the extreme values.
pub fn date_to_unix_days(pg_days: i32) -> Result<i32> {
    match pg_days {
        i32::MAX | i32::MIN => Ok(pg_days),
        d => d.checked_add(PG_EPOCH_DAYS).ok_or_else(|| out_of_range("date")),
    }
}

/// A PostgreSQL timestamp (µs since 2000-01-01) as µs since 1970-01-01. ±infinity keep the extreme values.
pub fn timestamp_to_unix_micros(pg_micros: i64) -> Result<i64> {
    match pg_micros {
        i64::MAX | i64::MIN => Ok(pg_micros),
        t => t
            .checked_add(PG_EPOCH_MICROS)
            .filter(|v| *v != i64::MAX && *v != i64::MIN)
            .ok_or_else(|| out_of_range("timestamp")),
    }
}

fn out_of_range(what: &str) -> Error {
    Error::new(ErrorKind::DataConversion, format!("{what} value out of range for the landing zone"))
}

/// The canonical text of a 16-byte uuid.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typmod(p: i32, s: i32) -> i32 {
        ((p << 16) | (s & 0x7FF)) + 4
    }

    #[test]
    fn numeric_kinds() {
        assert_eq!(kind_for(oid::NUMERIC, -1), ColumnKind::NumericText);
        assert_eq!(kind_for(oid::NUMERIC, typmod(10, 2)), ColumnKind::Decimal { precision: 10, scale: 2 });
        assert_eq!(kind_for(oid::NUMERIC, typmod(38, 0)), ColumnKind::Decimal { precision: 38, scale: 0 });
        assert_eq!(kind_for(oid::NUMERIC, typmod(39, 0)), ColumnKind::NumericText);
        assert_eq!(kind_for(oid::NUMERIC, typmod(5, -2)), ColumnKind::NumericText);
        assert_eq!(kind_for(oid::NUMERIC, typmod(2, 5)), ColumnKind::NumericText);
        assert_eq!(numeric_typmod(typmod(7, -3)), Some((7, -3)));
        assert_eq!(numeric_typmod(typmod(1000, 1000)), Some((1000, 1000)));
    }

    #[test]
    fn kinds_and_arrow_types() {
        assert_eq!(arrow_type(kind_for(oid::INT8, -1)), DataType::Int64);
        assert_eq!(arrow_type(kind_for(oid::BPCHAR, 14)), DataType::Utf8);
        assert_eq!(arrow_type(kind_for(oid::JSONB, -1)), DataType::Utf8);
        assert_eq!(kind_for(869 /* inet */, -1), ColumnKind::OtherText);
        assert_eq!(kind_for(oid::NAME, -1), ColumnKind::OtherText, "name is not a varlena");
        assert_eq!(kind_for_type(1007 /* int4[] */, -1, true, false), ColumnKind::JsonArray);
        assert_eq!(kind_for_type(16400 /* a row type */, -1, false, true), ColumnKind::JsonComposite);
        assert_eq!(kind_for_type(3904 /* int4range */, -1, false, false), ColumnKind::OtherText);
        assert_eq!(kind_for_type(oid::INT4, -1, false, false), ColumnKind::Int32);
        assert_eq!(arrow_type(ColumnKind::JsonArray), DataType::Utf8);
        assert_eq!(
            arrow_type(kind_for(oid::TIMESTAMPTZ, -1)),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(describe(ColumnKind::Decimal { precision: 12, scale: 3 }), "decimal(12,3)");
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(date_to_unix_days(0).unwrap(), 10_957);
        assert_eq!(date_to_unix_days(-10_957).unwrap(), 0);
        assert_eq!(date_to_unix_days(i32::MAX).unwrap(), i32::MAX);
        assert_eq!(date_to_unix_days(i32::MIN).unwrap(), i32::MIN);
        assert_eq!(timestamp_to_unix_micros(0).unwrap(), PG_EPOCH_MICROS);
        assert_eq!(timestamp_to_unix_micros(i64::MAX).unwrap(), i64::MAX);
        assert_eq!(timestamp_to_unix_micros(i64::MIN).unwrap(), i64::MIN);
        assert!(timestamp_to_unix_micros(i64::MAX - 1).is_err());
        // 4713 BC (PostgreSQL's earliest timestamp) is representable
        assert!(timestamp_to_unix_micros(-211_813_488_000_000_000).is_ok());
    }

    #[test]
    fn uuids() {
        let b = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        assert_eq!(uuid_text(&b), "12345678-9abc-def0-0123-456789abcdef");
    }
}
