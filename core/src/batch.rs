//! Building Arrow record batches of landing-zone rows from values borrowed from tuples. The extension
//! extracts each column's datum into a [`Value`] (no copy for strings and bytes) and appends it here;
//! all conversions of representation (epochs, numeric digits, uuid text) happen in this module. Pure.

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, StringBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema, SchemaRef};

use crate::error::{Error, ErrorKind, Result};
use crate::numeric;
use crate::typemap::{self, ColumnKind};

/// Rows per record batch handed to the encoder.
pub const BATCH_ROWS: usize = 8192;
/// A batch is also closed when its values reach this many bytes (wide rows).
pub const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// One column value, borrowed from the tuple being converted.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int16(i16),
    Int32(i32),
    Int64(i64),
    Float32(f32),
    Float64(f64),
    /// The payload of a numeric datum (after the varlena header).
    Numeric(&'a [u8]),
    /// UTF-8 text.
    Text(&'a str),
    Bytes(&'a [u8]),
    /// PostgreSQL date: days since 2000-01-01.
    PgDate(i32),
    /// PostgreSQL time: µs since midnight.
    PgTime(i64),
    /// PostgreSQL timestamp or timestamptz: µs since 2000-01-01.
    PgTimestamp(i64),
    Uuid(&'a [u8; 16]),
}

impl Value<'_> {
    /// The name of the value's kind (for error texts, which never carry values).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int16(_) => "int16",
            Value::Int32(_) => "int32",
            Value::Int64(_) => "int64",
            Value::Float32(_) => "float32",
            Value::Float64(_) => "float64",
            Value::Numeric(_) => "numeric",
            Value::Text(_) => "text",
            Value::Bytes(_) => "binary",
            Value::PgDate(_) => "date",
            Value::PgTime(_) => "time",
            Value::PgTimestamp(_) => "timestamp",
            Value::Uuid(_) => "uuid",
        }
    }
}

/// A column of the landing zone: its name and how it is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    pub kind: ColumnKind,
}

/// The Arrow schema of a table's data files.
pub fn schema_of(columns: &[ColumnSpec]) -> SchemaRef {
    Arc::new(Schema::new(
        columns.iter().map(|c| Field::new(&c.name, typemap::arrow_type(c.kind), true)).collect::<Vec<_>>(),
    ))
}

enum ColumnBuilder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl ColumnBuilder {
    fn new(kind: ColumnKind) -> Result<Self> {
        Ok(match kind {
            ColumnKind::Bool => ColumnBuilder::Bool(BooleanBuilder::new()),
            ColumnKind::Int16 => ColumnBuilder::Int16(Int16Builder::new()),
            ColumnKind::Int32 => ColumnBuilder::Int32(Int32Builder::new()),
            ColumnKind::Int64 => ColumnBuilder::Int64(Int64Builder::new()),
            ColumnKind::Float32 => ColumnBuilder::Float32(Float32Builder::new()),
            ColumnKind::Float64 => ColumnBuilder::Float64(Float64Builder::new()),
            ColumnKind::Decimal { precision, scale } => ColumnBuilder::Decimal(
                Decimal128Builder::new().with_precision_and_scale(precision, scale)?,
                precision,
                scale,
            ),
            ColumnKind::NumericText
            | ColumnKind::Text
            | ColumnKind::Uuid
            | ColumnKind::Jsonb
            | ColumnKind::JsonArray
            | ColumnKind::JsonComposite
            | ColumnKind::OtherText => ColumnBuilder::Utf8(StringBuilder::new()),
            ColumnKind::Bytes => ColumnBuilder::Binary(BinaryBuilder::new()),
            ColumnKind::Date => ColumnBuilder::Date(Date32Builder::new()),
            ColumnKind::Time => ColumnBuilder::Time(Time64MicrosecondBuilder::new()),
            ColumnKind::Timestamp => ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new()),
            ColumnKind::TimestampTz => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
        })
    }

    /// Appends one value; returns the number of payload bytes it added.
    fn append(&mut self, v: Value<'_>, column: &str) -> Result<usize> {
        // Names the kind of value, never the value itself: error texts reach users who may not read
        // the table.
        let mismatch = |v: &Value<'_>| {
            Error::new(ErrorKind::Internal, format!("column \"{column}\" cannot take a {} value", v.kind_name()))
        };
        Ok(match (self, v) {
            (ColumnBuilder::Bool(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Int16(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Int32(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Int64(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Float32(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Float64(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Decimal(b, ..), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Utf8(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Binary(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Date(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Time(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Timestamp(b), Value::Null) => {
                b.append_null();
                0
            }
            (ColumnBuilder::Bool(b), Value::Bool(x)) => {
                b.append_value(x);
                1
            }
            (ColumnBuilder::Int16(b), Value::Int16(x)) => {
                b.append_value(x);
                2
            }
            (ColumnBuilder::Int32(b), Value::Int32(x)) => {
                b.append_value(x);
                4
            }
            (ColumnBuilder::Int64(b), Value::Int64(x)) => {
                b.append_value(x);
                8
            }
            (ColumnBuilder::Float32(b), Value::Float32(x)) => {
                b.append_value(x);
                4
            }
            (ColumnBuilder::Float64(b), Value::Float64(x)) => {
                b.append_value(x);
                8
            }
            (ColumnBuilder::Decimal(b, p, s), Value::Numeric(bytes)) => {
                let n = numeric::decode(bytes)?;
                let v = n.to_scaled_i128(*p, *s).map_err(|e| in_column(e, column))?;
                b.append_value(v);
                16
            }
            (ColumnBuilder::Utf8(b), Value::Numeric(bytes)) => {
                let t = numeric::decode(bytes)?.to_text();
                b.append_value(&t);
                t.len()
            }
            (ColumnBuilder::Utf8(b), Value::Text(s)) => {
                b.append_value(s);
                s.len()
            }
            (ColumnBuilder::Utf8(b), Value::Uuid(u)) => {
                b.append_value(typemap::uuid_text(u));
                36
            }
            (ColumnBuilder::Binary(b), Value::Bytes(x)) => {
                b.append_value(x);
                x.len()
            }
            (ColumnBuilder::Date(b), Value::PgDate(d)) => {
                b.append_value(typemap::date_to_unix_days(d).map_err(|e| in_column(e, column))?);
                4
            }
            (ColumnBuilder::Time(b), Value::PgTime(t)) => {
                b.append_value(t);
                8
            }
            (ColumnBuilder::Timestamp(b), Value::PgTimestamp(t)) => {
                b.append_value(typemap::timestamp_to_unix_micros(t).map_err(|e| in_column(e, column))?);
                8
            }
            (_, v) => return Err(mismatch(&v)),
        })
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Int16(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, ..) => Arc::new(b.finish()),
            ColumnBuilder::Utf8(b) => Arc::new(b.finish()),
            ColumnBuilder::Binary(b) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Time(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) => Arc::new(b.finish()),
        }
    }
}

fn in_column(e: Error, column: &str) -> Error {
    let detail = match e.detail {
        Some(d) => format!("Column \"{column}\". {d}"),
        None => format!("Column \"{column}\"."),
    };
    Error { detail: Some(detail), ..e }
}

/// Accumulates rows of one table into record batches.
pub struct BatchBuilder {
    schema: SchemaRef,
    names: Vec<String>,
    columns: Vec<ColumnBuilder>,
    rows: usize,
    bytes: usize,
    row_started: usize,
}

impl BatchBuilder {
    pub fn new(columns: &[ColumnSpec]) -> Result<Self> {
        Ok(BatchBuilder {
            schema: schema_of(columns),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            columns: columns.iter().map(|c| ColumnBuilder::new(c.kind)).collect::<Result<_>>()?,
            rows: 0,
            bytes: 0,
            row_started: 0,
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Appends the value of column `i` of the current row. Columns must be appended in order, each
    /// exactly once per row, then [`BatchBuilder::end_row`] called.
    pub fn append(&mut self, i: usize, v: Value<'_>) -> Result<()> {
        if i != self.row_started {
            return Err(Error::new(ErrorKind::Internal, format!("column {i} appended out of order")));
        }
        let name = &self.names[i];
        self.bytes += self.columns[i].append(v, name)?;
        self.row_started += 1;
        Ok(())
    }

    pub fn end_row(&mut self) -> Result<()> {
        if self.row_started != self.columns.len() {
            return Err(Error::new(ErrorKind::Internal, "row ended before all its columns were appended"));
        }
        self.row_started = 0;
        self.rows += 1;
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of values appended since the last [`BatchBuilder::finish`] (an estimate of the memory held).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the batch should be handed to the encoder now.
    pub fn is_full(&self) -> bool {
        self.rows >= BATCH_ROWS || self.bytes >= BATCH_BYTES
    }

    /// Takes the rows so far as a record batch and starts an empty one. A partly appended row is an error.
    pub fn finish(&mut self) -> Result<RecordBatch> {
        if self.row_started != 0 {
            return Err(Error::new(ErrorKind::Internal, "batch finished in the middle of a row"));
        }
        let arrays: Vec<ArrayRef> = self.columns.iter_mut().map(|c| c.finish()).collect();
        self.rows = 0;
        self.bytes = 0;
        let options =
            arrow_array::RecordBatchOptions::new().with_row_count(Some(arrays.first().map(|a| a.len()).unwrap_or(0)));
        Ok(RecordBatch::try_new_with_options(self.schema.clone(), arrays, &options)?)
    }

    /// Discards everything appended so far, including a partly appended row (after a conversion error).
    pub fn abandon(&mut self) {
        self.row_started = 0;
        self.rows = 0;
        self.bytes = 0;
        for c in &mut self.columns {
            c.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Date32Type, Decimal128Type, Int64Type, TimestampMicrosecondType};
    use arrow_array::Array;

    fn spec(name: &str, kind: ColumnKind) -> ColumnSpec {
        ColumnSpec { name: name.into(), kind }
    }

    #[test]
    fn builds_typed_columns_with_nulls() {
        let cols = vec![
            spec("id", ColumnKind::Int64),
            spec("amount", ColumnKind::Decimal { precision: 10, scale: 2 }),
            spec("note", ColumnKind::Text),
            spec("day", ColumnKind::Date),
            spec("at", ColumnKind::TimestampTz),
            spec("u", ColumnKind::Uuid),
            spec("big", ColumnKind::NumericText),
        ];
        let mut b = BatchBuilder::new(&cols).unwrap();
        // 12.50: short numeric, weight 0, dscale 2, digits [12, 5000]
        let h: u16 = 0x8000 | (2 << 7);
        let mut num = h.to_ne_bytes().to_vec();
        num.extend_from_slice(&12i16.to_ne_bytes());
        num.extend_from_slice(&5000i16.to_ne_bytes());
        let u = [0xab; 16];
        for v in [
            Value::Int64(1),
            Value::Numeric(&num),
            Value::Text("héllo"),
            Value::PgDate(0),
            Value::PgTimestamp(0),
            Value::Uuid(&u),
            Value::Numeric(&num),
        ]
        .into_iter()
        .enumerate()
        {
            b.append(v.0, v.1).unwrap();
        }
        b.end_row().unwrap();
        for i in 0..cols.len() {
            b.append(i, Value::Null).unwrap();
        }
        b.end_row().unwrap();
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column(0).as_primitive::<Int64Type>().value(0), 1);
        assert_eq!(batch.column(1).as_primitive::<Decimal128Type>().value(0), 1250);
        assert_eq!(batch.column(2).as_string::<i32>().value(0), "héllo");
        assert_eq!(batch.column(3).as_primitive::<Date32Type>().value(0), 10_957);
        assert_eq!(batch.column(4).as_primitive::<TimestampMicrosecondType>().value(0), 946_684_800_000_000);
        assert_eq!(batch.column(5).as_string::<i32>().value(0), "abababab-abab-abab-abab-abababababab");
        assert_eq!(batch.column(6).as_string::<i32>().value(0), "12.50");
        for c in batch.columns() {
            assert!(c.is_null(1));
        }
        assert_eq!(b.finish().unwrap().num_rows(), 0);
    }

    #[test]
    fn conversion_errors_name_the_column() {
        let mut b = BatchBuilder::new(&[spec("amount", ColumnKind::Decimal { precision: 5, scale: 0 })]).unwrap();
        let nan = 0xC000u16.to_ne_bytes();
        let e = b.append(0, Value::Numeric(&nan)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DataConversion);
        assert!(e.detail.unwrap().contains("\"amount\""));
        b.abandon();
        b.append(0, Value::Null).unwrap();
        b.end_row().unwrap();
        assert_eq!(b.finish().unwrap().num_rows(), 1);
    }

    #[test]
    fn misuse_is_an_internal_error() {
        let mut b = BatchBuilder::new(&[spec("a", ColumnKind::Int32), spec("b", ColumnKind::Int32)]).unwrap();
        assert_eq!(b.append(1, Value::Int32(1)).unwrap_err().kind, ErrorKind::Internal);
        assert_eq!(b.append(0, Value::Text("x")).unwrap_err().kind, ErrorKind::Internal);
        b.append(0, Value::Int32(1)).unwrap();
        assert!(b.end_row().is_err());
        assert!(b.finish().is_err());
    }

    #[test]
    fn fills_up_by_rows() {
        let mut b = BatchBuilder::new(&[spec("a", ColumnKind::Int32)]).unwrap();
        for i in 0..BATCH_ROWS {
            assert!(!b.is_full());
            b.append(0, Value::Int32(i as i32)).unwrap();
            b.end_row().unwrap();
        }
        assert!(b.is_full());
    }
}
