//! Parquet data files of the landing zone: encoding Arrow record batches into files of bounded size,
//! numbering them contiguously and handing each finished file to the target for atomic publication.
//! Pure (no PostgreSQL); runs on the encoder thread of a worker, never on the thread that calls
//! PostgreSQL.

use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{GzipLevel, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, ErrorKind, Result};
use crate::names;
use crate::target::{Target, TempFile};

/// Rows per Parquet row group: large enough to compress well, small enough to bound encoder memory.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Compression codec of data files (`azure_cdc.parquet_compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Snappy,
    Gzip,
    Uncompressed,
}

impl Compression {
    pub const NAMES: [&'static str; 4] = ["zstd", "snappy", "gzip", "uncompressed"];

    fn codec(self) -> parquet::basic::Compression {
        use parquet::basic::Compression as C;
        match self {
            Compression::Zstd => C::ZSTD(ZstdLevel::default()),
            Compression::Snappy => C::SNAPPY,
            Compression::Gzip => C::GZIP(GzipLevel::default()),
            Compression::Uncompressed => C::UNCOMPRESSED,
        }
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" => Ok(Compression::Zstd),
            "snappy" => Ok(Compression::Snappy),
            "gzip" => Ok(Compression::Gzip),
            "uncompressed" | "none" => Ok(Compression::Uncompressed),
            _ => Err(Error::new(ErrorKind::InvalidParameter, format!("unknown Parquet compression \"{s}\""))
                .with_hint(format!("Use one of: {}.", Compression::NAMES.join(", ")))),
        }
    }
}

/// Most bytes of one row group held in memory while it is encoded. Encoder memory is bounded by this,
/// whatever the file size.
pub const ROW_GROUP_MAX_BYTES: usize = 64 * 1024 * 1024;

/// One Parquet file being encoded into `W` (the target's temporary file).
pub struct DataFileWriter<W: Write + Send> {
    writer: ArrowWriter<W>,
    rows: u64,
}

impl<W: Write + Send> DataFileWriter<W> {
    pub fn new(sink: W, schema: SchemaRef, compression: Compression, metadata: &[(String, String)]) -> Result<Self> {
        let kv: Vec<KeyValue> = metadata.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
        let props = WriterProperties::builder()
            .set_compression(compression.codec())
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_max_row_group_bytes(Some(ROW_GROUP_MAX_BYTES))
            .set_created_by(format!("azure_cdc {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(if kv.is_empty() { None } else { Some(kv) })
            .build();
        let writer = ArrowWriter::try_new(sink, schema, Some(props))?;
        Ok(DataFileWriter { writer, rows: 0 })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch)?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Bytes encoded so far, including the row group still being built.
    pub fn estimated_size(&self) -> usize {
        self.writer.bytes_written() + self.writer.in_progress_size()
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the footer and returns the sink.
    pub fn finish(self) -> Result<W> {
        Ok(self.writer.into_inner()?)
    }
}

/// A file that has been published into a table's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedFile {
    pub number: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// Takes turns publishing into one table folder across writers that run at once (snapshot workers
/// scanning parts of one table, in several processes): the numbers of a folder must be contiguous
/// and published in order, so a complete file takes the next number and waits until every lower
/// number is published (Fabric's replicator applies a folder's files strictly in sequence: fabric-docs
/// `docs/mirroring/open-mirroring-landing-zone-format.md`).
pub trait PublishTurns: Send {
    /// Takes the next number, waits until every lower one is published, then runs `publish` with it
    /// and records the number published. A failure (of `publish`, or of another writer) is final for
    /// the folder: every writer waiting or coming later gets an error.
    fn publish(&mut self, publish: &mut dyn FnMut(u64) -> Result<()>) -> Result<u64>;
}

/// How a [`TableFileSink`] numbers its files.
pub enum Numbering {
    /// The sink is the folder's only writer: contiguous numbers from `first`.
    Own { first: u64 },
    /// The folder has several writers; this one is `writer` (distinct among them). Files are
    /// written under staging names ([`names::staging_number`]) and numbered when complete.
    Shared { turns: Box<dyn PublishTurns>, writer: u32 },
}

/// Splits a stream of record batches of one table into data files of at most about `max_file_bytes`
/// and publishes them with contiguous numbers ([`Numbering`]). Never publishes an empty file.
pub struct TableFileSink {
    target: Arc<Target>,
    folder: String,
    schema: SchemaRef,
    compression: Compression,
    max_file_bytes: usize,
    numbering: Numbering,
    /// Own numbering: the next number; shared: the next staging sequence.
    next: u64,
    metadata: Vec<(String, String)>,
    current: Option<(u64, DataFileWriter<TempFile>)>,
    published: Vec<PublishedFile>,
}

impl TableFileSink {
    pub fn new(
        target: Arc<Target>,
        folder: String,
        schema: SchemaRef,
        compression: Compression,
        max_file_bytes: usize,
        numbering: Numbering,
        metadata: Vec<(String, String)>,
    ) -> Self {
        let next = match &numbering {
            Numbering::Own { first } => *first,
            Numbering::Shared { .. } => 0,
        };
        TableFileSink {
            target,
            folder,
            schema,
            compression,
            max_file_bytes: max_file_bytes.max(1),
            numbering,
            next,
            metadata,
            current: None,
            published: Vec::new(),
        }
    }

    /// Adds rows. A batch larger than an eighth of the file limit is split (without copying) so that a
    /// file closes within about 1/8 of `max_file_bytes` past the limit.
    pub fn push(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let step = self.max_file_bytes / 8;
        let size = batch.get_array_memory_size().max(1);
        let chunk_rows = if size <= step { rows } else { (rows * step / size).max(1) };
        let mut offset = 0;
        while offset < rows {
            let n = chunk_rows.min(rows - offset);
            self.push_chunk(&batch.slice(offset, n))?;
            offset += n;
        }
        Ok(())
    }

    fn push_chunk(&mut self, batch: &RecordBatch) -> Result<()> {
        if self.current.is_none() {
            let temp = match &self.numbering {
                Numbering::Own { .. } => self.next,
                Numbering::Shared { writer, .. } => names::staging_number(*writer, self.next as u32),
            };
            let file = self.target.create_temp_data_file(&self.folder, temp)?;
            let writer = DataFileWriter::new(file, self.schema.clone(), self.compression, &self.metadata)?;
            self.current = Some((temp, writer));
        }
        let full = match self.current.as_mut() {
            Some((_, w)) => {
                w.write(batch)?;
                w.estimated_size() >= self.max_file_bytes
            }
            None => false,
        };
        if full {
            self.publish_current()?;
        }
        Ok(())
    }

    fn publish_current(&mut self) -> Result<()> {
        let Some((temp, writer)) = self.current.take() else { return Ok(()) };
        let rows = writer.rows();
        let file = writer.finish()?;
        if rows == 0 {
            return self.target.discard_temp_data_file(&self.folder, temp);
        }
        let bytes = file.sync()?;
        let (target, folder) = (&self.target, &self.folder);
        let number = match &mut self.numbering {
            Numbering::Own { .. } => {
                target.publish_temp_data_file(folder, temp, self.next)?;
                self.next
            }
            Numbering::Shared { turns, .. } => {
                turns.publish(&mut |number| target.publish_temp_data_file(folder, temp, number))?
            }
        };
        self.published.push(PublishedFile { number, rows, bytes });
        self.next += 1;
        Ok(())
    }

    /// Publishes what is left and returns every file published, in number order.
    pub fn close(mut self) -> Result<Vec<PublishedFile>> {
        self.publish_current()?;
        Ok(self.published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("v", DataType::Utf8, true)]))
    }

    fn batch(from: i64, n: i64) -> RecordBatch {
        let ids = Int64Array::from_iter_values(from..from + n);
        let vs = StringArray::from_iter((from..from + n).map(|i| {
            if i % 7 == 0 {
                None
            } else {
                Some(format!("row {i} {}", i * 7919))
            }
        }));
        RecordBatch::try_new(schema(), vec![Arc::new(ids), Arc::new(vs)]).unwrap()
    }

    #[test]
    fn compression_names() {
        for n in Compression::NAMES {
            assert!(n.parse::<Compression>().is_ok());
        }
        assert_eq!("ZSTD".parse::<Compression>().unwrap(), Compression::Zstd);
        assert_eq!("lz4".parse::<Compression>().unwrap_err().kind, ErrorKind::InvalidParameter);
    }

    #[test]
    fn splits_into_bounded_contiguous_files_that_read_back() {
        let dir = crate::target::tests::temp_dir("sink");
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        for compression in [Compression::Zstd, Compression::Snappy, Compression::Gzip, Compression::Uncompressed] {
            let folder = format!("public.schema/t_{compression:?}");
            let mut sink = TableFileSink::new(
                target.clone(),
                folder.clone(),
                schema(),
                compression,
                64 * 1024,
                Numbering::Own { first: 1 },
                vec![],
            );
            let mut from = 0;
            for _ in 0..10 {
                sink.push(&batch(from, 4000)).unwrap();
                from += 4000;
            }
            sink.push(&batch(from, 0)).unwrap();
            let files = sink.close().unwrap();
            assert!(files.len() > 1, "{compression:?} made {} files", files.len());
            for f in &files[..files.len() - 1] {
                // the limit applies to the encoder's estimate (the open row group counted uncompressed),
                // so a file never exceeds it by more than an eighth; uncompressed files also reach it
                assert!(f.bytes <= 64 * 1024 * 9 / 8 + 16 * 1024, "{compression:?}: {} bytes", f.bytes);
                if compression == Compression::Uncompressed {
                    assert!(f.bytes >= 64 * 1024, "{} bytes", f.bytes);
                }
            }
            assert_eq!(files.iter().map(|f| f.rows).sum::<u64>(), 40_000);
            let mut expect = 0i64;
            for (i, f) in files.iter().enumerate() {
                assert_eq!(f.number, i as u64 + 1);
                let path = dir.join(&folder).join(crate::names::data_file_name(f.number));
                let data = std::fs::read(&path).unwrap();
                assert_eq!(data.len() as u64, f.bytes);
                let reader =
                    ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(data)).unwrap().build().unwrap();
                for b in reader {
                    let b = b.unwrap();
                    let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    for id in ids.values() {
                        assert_eq!(*id, expect);
                        expect += 1;
                    }
                }
            }
            assert_eq!(expect, 40_000);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Turns kept in one process, as the snapshot workers keep theirs in shared memory.
    struct Turns {
        next: Arc<std::sync::atomic::AtomicU64>,
        published: Arc<std::sync::atomic::AtomicU64>,
        failed: Arc<std::sync::atomic::AtomicBool>,
    }

    impl PublishTurns for Turns {
        fn publish(&mut self, publish: &mut dyn FnMut(u64) -> Result<()>) -> Result<u64> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.next.fetch_add(1, SeqCst);
            while self.published.load(SeqCst) != n - 1 {
                if self.failed.load(SeqCst) {
                    return Err(Error::new(ErrorKind::Internal, "another writer failed"));
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            match publish(n) {
                Ok(()) => {
                    self.published.store(n, SeqCst);
                    Ok(n)
                }
                Err(e) => {
                    self.failed.store(true, SeqCst);
                    Err(e)
                }
            }
        }
    }

    #[test]
    fn writers_sharing_a_folder_publish_contiguous_numbers_in_order() {
        let dir = crate::target::tests::temp_dir("shared");
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        let folder = "public.schema/t".to_string();
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3u32)
            .map(|w| {
                let turns = Turns { next: next.clone(), published: published.clone(), failed: failed.clone() };
                let (target, folder) = (target.clone(), folder.clone());
                std::thread::spawn(move || {
                    let mut sink = TableFileSink::new(
                        target,
                        folder,
                        schema(),
                        Compression::Zstd,
                        16 * 1024,
                        Numbering::Shared { turns: Box::new(turns), writer: w },
                        vec![],
                    );
                    // each writer its own range of ids, in batches of 500
                    let from = i64::from(w) * 1_000_000;
                    for k in 0..20 {
                        sink.push(&batch(from + k * 500, 500)).unwrap();
                    }
                    sink.close().unwrap()
                })
            })
            .collect();
        let mut files: Vec<PublishedFile> = writers.into_iter().flat_map(|h| h.join().unwrap()).collect();
        files.sort_by_key(|f| f.number);
        assert!(files.len() > 3, "{} files", files.len());
        let numbers: Vec<u64> = files.iter().map(|f| f.number).collect();
        assert_eq!(numbers, (1..=files.len() as u64).collect::<Vec<_>>());
        // every row once; nothing left under a temporary name
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir.join(&folder)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(crate::names::parse_data_file_name(&name).is_some(), "left behind: {name}");
            let data = std::fs::read(dir.join(&folder).join(&name)).unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(data)).unwrap().build().unwrap() {
                let b = b.unwrap();
                ids.extend(b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().iter().copied());
            }
        }
        ids.sort();
        let expect: Vec<i64> = (0..3i64).flat_map(|w| w * 1_000_000..w * 1_000_000 + 10_000).collect();
        assert_eq!(ids, expect);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_publication_fails_every_writer_of_the_folder() {
        let dir = crate::target::tests::temp_dir("shared_fail");
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        let folder = "public.schema/t".to_string();
        // number 1 is taken by someone else: the first publication fails, and the writer holding
        // number 2 must not publish (a gap) but fail
        target.publish_data_file(&folder, 1, b"not ours").unwrap();
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = |w: u32| {
            TableFileSink::new(
                target.clone(),
                folder.clone(),
                schema(),
                Compression::Zstd,
                1 << 20,
                Numbering::Shared {
                    turns: Box::new(Turns { next: next.clone(), published: published.clone(), failed: failed.clone() }),
                    writer: w,
                },
                vec![],
            )
        };
        let mut a = sink(0);
        let mut b = sink(1);
        a.push(&batch(0, 10)).unwrap();
        b.push(&batch(10, 10)).unwrap();
        assert!(a.close().is_err());
        assert!(b.close().is_err());
        assert!(!dir.join(&folder).join(crate::names::data_file_name(2)).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_empty_table_publishes_nothing() {
        let dir = crate::target::tests::temp_dir("empty");
        let target = Arc::new(Target::Local(crate::target::LocalTarget::new(dir.clone())));
        let own = Numbering::Own { first: 1 };
        let sink = TableFileSink::new(target, "s.schema/t".into(), schema(), Compression::Zstd, 1 << 20, own, vec![]);
        assert!(sink.close().unwrap().is_empty());
        assert!(
            !dir.join("s.schema/t").exists() || std::fs::read_dir(dir.join("s.schema/t")).unwrap().next().is_none()
        );
        std::fs::remove_dir_all(dir).ok();
    }
}

#[cfg(test)]
mod property_tests {
    use super::*;
    use crate::batch::{BatchBuilder, ColumnSpec, Value};
    use crate::typemap::ColumnKind;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// Random rows of every column kind go through a Parquet file and come back identical.
    #[test]
    fn arrow_parquet_round_trip_of_random_batches() {
        let kinds = [
            ColumnKind::Bool,
            ColumnKind::Int16,
            ColumnKind::Int32,
            ColumnKind::Int64,
            ColumnKind::Float32,
            ColumnKind::Float64,
            ColumnKind::Decimal { precision: 38, scale: 0 },
            ColumnKind::Text,
            ColumnKind::Bytes,
            ColumnKind::Date,
            ColumnKind::Time,
            ColumnKind::Timestamp,
            ColumnKind::TimestampTz,
            ColumnKind::Uuid,
        ];
        let specs: Vec<ColumnSpec> =
            kinds.iter().enumerate().map(|(i, k)| ColumnSpec { name: format!("c{i}"), kind: *k }).collect();
        let mut rng = Rng(0xC0FF_EE00_1234_5678);
        for compression in [Compression::Zstd, Compression::Snappy, Compression::Gzip, Compression::Uncompressed] {
            let mut b = BatchBuilder::new(&specs).unwrap();
            for _ in 0..3000 {
                for (i, k) in kinds.iter().enumerate() {
                    let r = rng.next();
                    let text: String =
                        (0..(r % 40)).map(|j| char::from_u32(((r >> j) % 0x2FF) as u32 + 32).unwrap_or('?')).collect();
                    let bytes = r.to_le_bytes();
                    let uuid = [(r & 0xFF) as u8; 16];
                    // numeric 0..10^19 in the long format: weight 4, five base-10000 digits
                    let mut num = 0u16.to_ne_bytes().to_vec();
                    num.extend_from_slice(&4i16.to_ne_bytes());
                    for d in 0..5 {
                        num.extend_from_slice(&(((r >> (d * 12)) % 10_000) as i16).to_ne_bytes());
                    }
                    let v = if r % 11 == 0 {
                        Value::Null
                    } else {
                        match k {
                            ColumnKind::Bool => Value::Bool(r & 1 == 1),
                            ColumnKind::Int16 => Value::Int16(r as i16),
                            ColumnKind::Int32 => Value::Int32(r as i32),
                            ColumnKind::Int64 => Value::Int64(r as i64),
                            ColumnKind::Float32 => Value::Float32(f32::from_bits(r as u32)),
                            ColumnKind::Float64 => Value::Float64(f64::from_bits(r)),
                            ColumnKind::Decimal { .. } => Value::Numeric(&num),
                            ColumnKind::Text => Value::Text(&text),
                            ColumnKind::Bytes => Value::Bytes(&bytes[..(r % 9) as usize]),
                            ColumnKind::Date => Value::PgDate((r % 4_000_000) as i32 - 2_000_000),
                            ColumnKind::Time => Value::PgTime((r % 86_400_000_000) as i64),
                            ColumnKind::Timestamp | ColumnKind::TimestampTz => {
                                Value::PgTimestamp((r % (1 << 60)) as i64 - (1 << 59))
                            }
                            ColumnKind::Uuid => Value::Uuid(&uuid),
                            _ => unreachable!(),
                        }
                    };
                    b.append(i, v).unwrap();
                }
                b.end_row().unwrap();
            }
            let batch = b.finish().unwrap();
            let mut w = DataFileWriter::new(Vec::new(), batch.schema(), compression, &[]).unwrap();
            w.write(&batch).unwrap();
            let bytes = w.finish().unwrap();
            let read: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
                .collect();
            let mut offset = 0;
            for back in &read {
                let original = batch.slice(offset, back.num_rows());
                for c in 0..batch.num_columns() {
                    assert_eq!(
                        original.column(c).to_data(),
                        back.column(c).to_data(),
                        "{compression:?} column {c} differs"
                    );
                }
                offset += back.num_rows();
            }
            assert_eq!(offset, batch.num_rows());
        }
    }
}
