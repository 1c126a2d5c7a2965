//! Verification of a mirrored table, pure: replays a table's landing zone (file order, `__rowMarker__`)
//! up to exactly the transactions a snapshot of the source sees, and compares the result with the
//! source's rows in that snapshot. Any thread; no PostgreSQL.
//!
//! The cut: the extension takes an MVCC snapshot of the source, scans the table in it, and waits
//! until the mirror has published every transaction the snapshot sees (its slot is confirmed past
//! the WAL position read right after the snapshot was taken). Snapshot files hold only rows the
//! snapshot sees. Each change file carries its transaction index (which rows belong to which
//! transaction, `changes::TRANSACTIONS_KEY`), so the replay applies exactly the rows of transactions
//! the snapshot sees ([`Visibility`]) and leaves out those it does not (still running when it was
//! taken, or later). Both sides are then the same state of the table, however busy it is.
//!
//! Rows are compared in Arrow's row format (`arrow-row`): two values are equal when their bytes are
//! equal, so -0 differs from 0 and every NaN payload counts. A table image keeps, per key, a 64-bit
//! hash of the whole row, not the row.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_row::{RowConverter, SortField};
use arrow_schema::{DataType, SchemaRef, TimeUnit};

use crate::changes::TxnRun;
use crate::error::{Error, ErrorKind, Result};
use crate::landing_zone::ROW_MARKER_COLUMN;

/// Which transactions a snapshot of the source sees, by full transaction id: all before `xmin`, none
/// from `xmax` on, and between them those not `running` when it was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visibility {
    pub xmin: u64,
    pub xmax: u64,
    pub running: HashSet<u64>,
}

impl Visibility {
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.running.contains(&xid))
    }
}

/// The full (epoch-extended) form of a 32-bit transaction id that is at most 2^31 transactions from
/// `next_full` (the server's next full transaction id), as every id of a running or recently
/// decoded transaction is.
pub fn full_xid(next_full: u64, xid: u32) -> u64 {
    let next32 = next_full as u32;
    let behind = next32.wrapping_sub(xid) as i32 as i64;
    (next_full as i64 - behind).max(0) as u64
}

/// One data file of a table, read back from the target.
#[derive(Debug, Clone)]
pub struct FileRead {
    pub number: u64,
    pub batches: Vec<RecordBatch>,
    /// The transaction index of a change file; None for a snapshot file (every row is seen).
    pub txns: Option<Vec<TxnRun>>,
}

/// Reads data file `number` from its bytes: its rows and, for a change file, its transaction index.
pub fn read_file(number: u64, bytes: bytes::Bytes) -> Result<FileRead> {
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let txns = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == crate::changes::TRANSACTIONS_KEY).and_then(|k| k.value.clone()))
        .map(|t| crate::changes::runs_from_text(&t))
        .transpose()?;
    let mut batches = Vec::new();
    for b in builder.build()? {
        batches.push(b?);
    }
    Ok(FileRead { number, batches, txns })
}

/// The state of a table: per key, the hash of its row; or, without key columns, how often each row
/// occurs.
#[derive(Debug, Default)]
pub struct Image {
    keyed: HashMap<Vec<u8>, u64>,
    keyless: HashMap<u64, u64>,
}

impl Image {
    pub fn rows(&self) -> u64 {
        self.keyed.len() as u64 + self.keyless.values().sum::<u64>()
    }
}

/// Encodes a table's rows and keys in row format.
pub struct RowEncoder {
    schema: SchemaRef,
    key_idx: Vec<usize>,
    rows: RowConverter,
    keys: RowConverter,
}

impl RowEncoder {
    /// `schema`: the table's columns (as the source scan builds them); `keys`: key column names
    /// (empty: the table has none).
    pub fn new(schema: SchemaRef, keys: &[String]) -> Result<RowEncoder> {
        let mut key_idx = Vec::with_capacity(keys.len());
        for k in keys {
            let i = schema.index_of(k).map_err(|_| {
                Error::new(ErrorKind::Internal, format!("key column \"{k}\" is not a column of the table"))
            })?;
            key_idx.push(i);
        }
        let field = |i: usize| SortField::new(schema.field(i).data_type().clone());
        let rows = RowConverter::new((0..schema.fields().len()).map(field).collect())?;
        let keys = RowConverter::new(key_idx.iter().map(|&i| field(i)).collect())?;
        Ok(RowEncoder { schema, key_idx, rows, keys })
    }

    pub fn keyed(&self) -> bool {
        !self.key_idx.is_empty()
    }

    /// The table's columns of `batch`, by name, in table order. A column the file lacks is NULL in
    /// its rows (the landing zone's rule: a file written before the column was added, or after it
    /// was dropped); a column of another type is an error: the two sides would not be comparable.
    /// Columns of the file the table no longer has are left out.
    fn project(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let mut out = Vec::with_capacity(self.schema.fields().len());
        for f in self.schema.fields() {
            let Some(col) = batch.column_by_name(f.name()) else {
                out.push(arrow_array::new_null_array(f.data_type(), batch.num_rows()));
                continue;
            };
            if col.data_type() != f.data_type() {
                return Err(Error::new(
                    ErrorKind::DataConversion,
                    format!(
                        "column \"{}\" is {} in a data file but {} in the table",
                        f.name(),
                        col.data_type(),
                        f.data_type()
                    ),
                ));
            }
            out.push(col.clone());
        }
        Ok(out)
    }

    /// Adds the rows of a batch of the source (all inserts).
    pub fn add_source(&self, image: &mut Image, batch: &RecordBatch) -> Result<Vec<String>> {
        let cols = self.project(batch)?;
        let rows = self.rows.convert_columns(&cols)?;
        let mut duplicates = Vec::new();
        if self.keyed() {
            let keys = self.keys.convert_columns(&self.key_idx.iter().map(|&i| cols[i].clone()).collect::<Vec<_>>())?;
            for i in 0..batch.num_rows() {
                if image.keyed.insert(keys.row(i).as_ref().to_vec(), hash(rows.row(i).as_ref())).is_some() {
                    duplicates.push(self.key_text(keys.row(i).as_ref()));
                }
            }
        } else {
            for i in 0..batch.num_rows() {
                *image.keyless.entry(hash(rows.row(i).as_ref())).or_default() += 1;
            }
        }
        Ok(duplicates)
    }

    /// A key in row format as text: `col=value, …`.
    pub fn key_text(&self, key: &[u8]) -> String {
        let parser = self.keys.parser();
        let parsed = parser.parse(key);
        let arrays = match self.keys.convert_rows([parsed]) {
            Ok(a) => a,
            Err(_) => return "(undisplayable key)".into(),
        };
        self.key_idx
            .iter()
            .zip(arrays.iter())
            .map(|(&i, a)| format!("{}={}", self.schema.field(i).name(), value_text(a, 0)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// One value as text, for messages.
fn value_text(a: &ArrayRef, i: usize) -> String {
    if a.is_null(i) {
        return "NULL".into();
    }
    match a.data_type() {
        DataType::Boolean => a.as_boolean().value(i).to_string(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::Float32 => a.as_primitive::<Float32Type>().value(i).to_string(),
        DataType::Float64 => a.as_primitive::<Float64Type>().value(i).to_string(),
        DataType::Utf8 => format!("'{}'", a.as_string::<i32>().value(i)),
        DataType::Decimal128(_, scale) => {
            let v = a.as_primitive::<Decimal128Type>().value(i);
            let (sign, abs) = if v < 0 { ("-", v.unsigned_abs()) } else { ("", v as u128) };
            let s = *scale as u32;
            let p = 10u128.pow(s);
            if s == 0 {
                format!("{sign}{abs}")
            } else {
                format!("{sign}{}.{:0width$}", abs / p, abs % p, width = s as usize)
            }
        }
        DataType::Date32 => format!("date {}", a.as_primitive::<Date32Type>().value(i)),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            format!("timestamp {}", a.as_primitive::<TimestampMicrosecondType>().value(i))
        }
        DataType::Binary => {
            a.as_binary::<i32>().value(i).iter().fold(String::from("\\x"), |s, b| s + &format!("{b:02x}"))
        }
        other => format!("({other} value)"),
    }
}

/// What replaying a table's files gave.
#[derive(Debug, Default)]
pub struct Replay {
    pub image: Image,
    pub files: u64,
    /// Rows of transactions the snapshot does not see, left out.
    pub rows_left_out: u64,
    /// What is wrong with the files themselves (gaps, an insert of an existing key, …), at most 20.
    pub problems: Vec<String>,
    pub problem_count: u64,
}

impl Replay {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// Replays a table's files one at a time (so that only one file is in memory), in number order from
/// 1, up to the transactions `vis` sees.
pub struct Replayer<'a> {
    enc: &'a RowEncoder,
    vis: &'a Visibility,
    out: Replay,
    gap: bool,
}

impl<'a> Replayer<'a> {
    pub fn new(enc: &'a RowEncoder, vis: &'a Visibility) -> Self {
        Replayer { enc, vis, out: Replay::default(), gap: false }
    }

    pub fn finish(self) -> Replay {
        self.out
    }

    pub fn apply(&mut self, f: &FileRead) -> Result<()> {
        let (enc, vis, out) = (self.enc, self.vis, &mut self.out);
        if self.gap {
            return Ok(());
        }
        let expected = out.files + 1;
        if f.number != expected {
            out.problem(format!("file {expected} is missing: the files go on with {} (a gap)", f.number));
            self.gap = true;
            return Ok(());
        }
        out.files += 1;
        let mut row_in_file: u64 = 0;
        let mut run = 0usize;
        for batch in &f.batches {
            let cols = enc.project(batch)?;
            let rows = enc.rows.convert_columns(&cols)?;
            let keys = if enc.keyed() {
                Some(enc.keys.convert_columns(&enc.key_idx.iter().map(|&i| cols[i].clone()).collect::<Vec<_>>())?)
            } else {
                None
            };
            let markers = match batch.column_by_name(ROW_MARKER_COLUMN) {
                Some(m) => Some(m.as_primitive_opt::<Int32Type>().ok_or_else(|| {
                    Error::new(
                        ErrorKind::DataConversion,
                        format!("{ROW_MARKER_COLUMN} is not int32 in file {}", f.number),
                    )
                })?),
                None => None,
            };
            for r in 0..batch.num_rows() {
                let seen = match &f.txns {
                    None => true,
                    Some(runs) => {
                        while run < runs.len() && runs[run].end_row <= row_in_file {
                            run += 1;
                        }
                        match runs.get(run) {
                            Some(tr) => vis.sees(tr.xid),
                            None => {
                                out.problem(format!(
                                    "file {}: row {row_in_file} is beyond its transaction index",
                                    f.number
                                ));
                                true
                            }
                        }
                    }
                };
                row_in_file += 1;
                if !seen {
                    out.rows_left_out += 1;
                    continue;
                }
                let marker = markers.map(|m| if m.is_null(r) { -1 } else { m.value(r) }).unwrap_or(0);
                let h = hash(rows.row(r).as_ref());
                match &keys {
                    Some(k) => {
                        let key = k.row(r).as_ref().to_vec();
                        match marker {
                            0 => {
                                if out.image.keyed.insert(key.clone(), h).is_some() {
                                    out.problem(format!(
                                        "file {}: insert of existing key ({})",
                                        f.number,
                                        enc.key_text(&key)
                                    ));
                                }
                            }
                            1 | 4 => {
                                if out.image.keyed.insert(key.clone(), h).is_none() && marker == 1 {
                                    out.problem(format!(
                                        "file {}: update of missing key ({})",
                                        f.number,
                                        enc.key_text(&key)
                                    ));
                                }
                            }
                            2 => {
                                if out.image.keyed.remove(&key).is_none() {
                                    out.problem(format!(
                                        "file {}: delete of missing key ({})",
                                        f.number,
                                        enc.key_text(&key)
                                    ));
                                }
                            }
                            m => out.problem(format!("file {}: unknown row marker {m}", f.number)),
                        }
                    }
                    None => match marker {
                        0 => *out.image.keyless.entry(h).or_default() += 1,
                        m => out.problem(format!("file {}: row marker {m} in a table without key columns", f.number)),
                    },
                }
            }
        }
        Ok(())
    }
}

/// The numbers missing before the first of `numbers` (sorted ascending): the oldest files of a
/// folder, which its reader deleted after processing them.
pub fn purged_numbers(numbers: &[u64]) -> Vec<u64> {
    (1..numbers.first().copied().unwrap_or(1)).collect()
}

/// `1-3, 7, 9-10` for [1, 2, 3, 7, 9, 10] (sorted ascending).
pub fn number_ranges(numbers: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let mut j = i;
        while j + 1 < numbers.len() && numbers[j + 1] == numbers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { numbers[i].to_string() } else { format!("{}-{}", numbers[i], numbers[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// Replays `files` (in number order, from 1) up to the transactions `vis` sees.
pub fn replay(enc: &RowEncoder, files: &[FileRead], vis: &Visibility) -> Result<Replay> {
    let mut r = Replayer::new(enc, vis);
    for f in files {
        r.apply(f)?;
    }
    Ok(r.finish())
}

/// How the mirror's image differs from the source's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    pub source_rows: u64,
    pub mirror_rows: u64,
    /// Keys (or rows) in the source, not in the mirror.
    pub missing: u64,
    /// Keys (or rows) in the mirror, not in the source.
    pub extra: u64,
    /// Keys in both whose rows differ.
    pub differing: u64,
    /// Up to 10 of the keys concerned, as text.
    pub sample: Vec<String>,
}

impl Comparison {
    pub fn matches(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.differing == 0
    }
}

pub fn compare(enc: &RowEncoder, source: &Image, mirror: &Image) -> Comparison {
    let mut c = Comparison { source_rows: source.rows(), mirror_rows: mirror.rows(), ..Default::default() };
    let note = |c: &mut Comparison, what: &str, key: &[u8]| {
        if c.sample.len() < 10 {
            c.sample.push(format!("{what}: {}", enc.key_text(key)));
        }
    };
    for (k, h) in &source.keyed {
        match mirror.keyed.get(k) {
            None => {
                c.missing += 1;
                note(&mut c, "missing", k);
            }
            Some(m) if m != h => {
                c.differing += 1;
                note(&mut c, "differs", k);
            }
            Some(_) => {}
        }
    }
    for k in mirror.keyed.keys() {
        if !source.keyed.contains_key(k) {
            c.extra += 1;
            note(&mut c, "extra", k);
        }
    }
    for (h, n) in &source.keyless {
        let m = mirror.keyless.get(h).copied().unwrap_or(0);
        c.missing += n.saturating_sub(m);
    }
    for (h, m) in &mirror.keyless {
        let n = source.keyless.get(h).copied().unwrap_or(0);
        c.extra += m.saturating_sub(n);
    }
    if !enc.keyed() && (c.missing > 0 || c.extra > 0) && c.sample.is_empty() {
        c.sample.push(format!("{} rows missing, {} rows extra (the table has no key columns)", c.missing, c.extra));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        assert!(purged_numbers(&[]).is_empty());
        assert!(purged_numbers(&[1, 2, 5]).is_empty(), "a gap is not a purge");
        assert_eq!(purged_numbers(&[4, 5, 8]), vec![1, 2, 3]);
        assert_eq!(number_ranges(&[1, 2, 3, 6, 7, 9]), "1-3, 6-7, 9");
    }
    use crate::batch::{BatchBuilder, ColumnSpec, Value};
    use crate::changes::{change_columns, RowMarker};
    use crate::typemap::ColumnKind;

    fn specs() -> Vec<ColumnSpec> {
        vec![
            ColumnSpec { name: "id".into(), kind: ColumnKind::Int32 },
            ColumnSpec { name: "v".into(), kind: ColumnKind::Text },
            ColumnSpec { name: "f".into(), kind: ColumnKind::Float64 },
        ]
    }

    fn batch(rows: &[(i32, Option<&str>, f64)], markers: Option<&[RowMarker]>) -> RecordBatch {
        let cols = match markers {
            Some(_) => change_columns(&specs()),
            None => specs(),
        };
        let mut b = BatchBuilder::new(&cols).unwrap();
        for (i, (id, v, f)) in rows.iter().enumerate() {
            b.append(0, Value::Int32(*id)).unwrap();
            b.append(1, v.map(Value::Text).unwrap_or(Value::Null)).unwrap();
            b.append(2, Value::Float64(*f)).unwrap();
            if let Some(m) = markers {
                b.append(3, Value::Int32(m[i] as i32)).unwrap();
            }
            b.end_row().unwrap();
        }
        b.finish().unwrap()
    }

    fn encoder(keys: &[&str]) -> RowEncoder {
        let schema = batch(&[], None).schema();
        RowEncoder::new(schema, &keys.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn source(enc: &RowEncoder, rows: &[(i32, Option<&str>, f64)]) -> Image {
        let mut img = Image::default();
        assert!(enc.add_source(&mut img, &batch(rows, None)).unwrap().is_empty());
        img
    }

    #[test]
    fn replays_up_to_what_the_snapshot_sees() {
        use RowMarker::*;
        let enc = encoder(&["id"]);
        let snapshot =
            FileRead { number: 1, batches: vec![batch(&[(1, Some("a"), 1.0), (2, Some("b"), 2.0)], None)], txns: None };
        // Transaction 10 updates 1 and deletes 2; 11 (still running for the snapshot) inserts 3;
        // 12 (after the snapshot) updates 1 again.
        let changes = FileRead {
            number: 2,
            batches: vec![batch(
                &[(1, Some("a1"), 1.0), (2, Some("b"), 2.0), (3, Some("c"), 3.0), (1, Some("a2"), 1.0)],
                Some(&[Update, Delete, Insert, Update]),
            )],
            txns: Some(vec![
                TxnRun { xid: 10, end_row: 2 },
                TxnRun { xid: 11, end_row: 3 },
                TxnRun { xid: 12, end_row: 4 },
            ]),
        };
        let vis = Visibility { xmin: 11, xmax: 12, running: [11].into_iter().collect() };
        let r = replay(&enc, &[snapshot, changes], &vis).unwrap();
        assert_eq!((r.files, r.rows_left_out, r.problem_count), (2, 2, 0));
        let c = compare(&enc, &source(&enc, &[(1, Some("a1"), 1.0)]), &r.image);
        assert!(c.matches(), "{c:?}");
        // The same files against a source that differs: every kind of difference is reported.
        let c = compare(&enc, &source(&enc, &[(1, Some("A"), 1.0), (5, None, 0.0)]), &r.image);
        assert_eq!((c.missing, c.extra, c.differing), (1, 0, 1));
        assert!(c.sample.contains(&"differs: id=1".to_string()) && c.sample.contains(&"missing: id=5".to_string()));
    }

    #[test]
    fn values_compare_exactly() {
        let enc = encoder(&["id"]);
        let a = source(&enc, &[(1, None, 0.0)]);
        let b = source(&enc, &[(1, None, -0.0)]);
        assert_eq!(compare(&enc, &a, &b).differing, 1, "-0 is not 0");
        let n1 = source(&enc, &[(1, Some(""), f64::NAN)]);
        let n2 = source(&enc, &[(1, Some(""), f64::NAN)]);
        assert!(compare(&enc, &n1, &n2).matches());
        let null = source(&enc, &[(1, None, 1.0)]);
        let empty = source(&enc, &[(1, Some(""), 1.0)]);
        assert_eq!(compare(&enc, &null, &empty).differing, 1, "NULL is not ''");
    }

    #[test]
    fn problems_in_the_files_are_reported() {
        use RowMarker::*;
        let enc = encoder(&["id"]);
        let all = Visibility { xmin: 100, xmax: 100, running: HashSet::new() };
        let f1 = FileRead { number: 1, batches: vec![batch(&[(1, None, 1.0)], None)], txns: None };
        let f3 = FileRead { number: 3, batches: vec![batch(&[(2, None, 1.0)], Some(&[Insert]))], txns: None };
        let r = replay(&enc, &[f1.clone(), f3], &all).unwrap();
        assert!(r.problems[0].contains("file 2 is missing"), "{:?}", r.problems);
        let f2 = FileRead {
            number: 2,
            batches: vec![batch(&[(1, None, 1.0), (7, None, 1.0), (8, None, 1.0)], Some(&[Insert, Update, Delete]))],
            txns: None,
        };
        let r = replay(&enc, &[f1, f2], &all).unwrap();
        assert_eq!(r.problem_count, 3);
        assert!(r.problems[0].contains("insert of existing key (id=1)"));
        assert!(r.problems[1].contains("update of missing key (id=7)"));
        assert!(r.problems[2].contains("delete of missing key (id=8)"));
    }

    #[test]
    fn tables_without_keys_compare_as_multisets() {
        let enc = encoder(&[]);
        let f = FileRead { number: 1, batches: vec![batch(&[(1, None, 1.0), (1, None, 1.0)], None)], txns: None };
        let all = Visibility::default();
        let r = replay(&enc, &[f], &all).unwrap();
        assert!(compare(&enc, &source(&enc, &[(1, None, 1.0), (1, None, 1.0)]), &r.image).matches());
        let c = compare(&enc, &source(&enc, &[(1, None, 1.0)]), &r.image);
        assert_eq!((c.missing, c.extra), (0, 1));
    }

    #[test]
    fn full_transaction_ids() {
        let epoch1 = 1u64 << 32;
        assert_eq!(full_xid(epoch1 + 100, 90), epoch1 + 90);
        assert_eq!(full_xid(epoch1 + 5, u32::MAX - 2), epoch1 - 3, "just before the wrap");
        assert_eq!(full_xid(epoch1 + 5, 7), epoch1 + 7, "slightly ahead (a snapshot's xmax)");
        assert_eq!(full_xid(100, 50), 50);
    }

    #[test]
    fn visibility() {
        let v = Visibility { xmin: 10, xmax: 20, running: [12, 15].into_iter().collect() };
        assert!(v.sees(9) && v.sees(11) && v.sees(19));
        assert!(!v.sees(12) && !v.sees(15) && !v.sees(20) && !v.sees(u64::MAX));
    }
}
