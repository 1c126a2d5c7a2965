//! Copying a table's rows, as one snapshot sees them, into numbered snapshot files: the one copy path
//! of the initial snapshot (the snapshot worker and its helpers, [`crate::snapshot`]) and of later
//! copies (reseeds, added and new tables: the copier, [`crate::reseed`]). The main thread scans and
//! converts (it calls PostgreSQL); the process's encoder thread ([`encoder`]) encodes and publishes
//! the files meanwhile, so that scanning and encoding overlap.
//!
//! A table is copied whole, or, when several snapshot workers share it, part by part
//! ([`crate::snapshot::parts`]): its files are then numbered as they complete, in turn with the
//! other workers'.

pub mod encoder;

use azure_cdc_core::batch::{BatchBuilder, ColumnSpec};
use azure_cdc_core::datafile::Numbering;
use azure_cdc_core::parts::Part;
use azure_cdc_core::Result;
use pgrx::prelude::*;

use crate::catalog;
use crate::shmem;
use crate::snapshot::parts;
use crate::tuples::TupleConverter;
use encoder::{Encoder, ToEncoder};

/// Where a copy runs: the mirror's registry entry and the process's progress slot (for live progress
/// and to tell its files from other workers'), and its encoder thread.
pub struct Copy<'a> {
    pub index: usize,
    pub progress_slot: usize,
    pub encoder: &'a Encoder,
}

/// Which rows of the table.
#[derive(Copy, Clone, Debug)]
pub enum Scope {
    Whole,
    /// Parts of split `split`, from `first` on, as long as the split hands them out.
    Parts {
        split: usize,
        first: Part,
    },
}

/// What a copy published.
pub struct Copied {
    pub rows: i64,
    pub files: i64,
    pub bytes: i64,
    /// The columns of its files ([`azure_cdc_core::columns::to_text`]).
    pub columns: String,
    /// A partitioned table: the signature of the partition tree that was copied.
    pub partitions: Option<String>,
}

impl Copy<'_> {
    /// Copies the rows of `rel` that `snapshot` sees into snapshot files of `folder` numbered from 1
    /// (or, for parts, in turn with the other workers). `prepare` runs once the table's columns are
    /// known and before any row is read (a reseed computes its keys and writes `_metadata.json`
    /// there). Run it in a subtransaction: a PostgreSQL error while converting a value ends it. After
    /// any error the caller calls [`Copy::abandon`] (an error may come back as a PostgreSQL error,
    /// past this function), then parks the table or fails; files already published stay for it to
    /// reset.
    ///
    /// # Safety
    /// `rel` must be an open heap or partitioned relation (a heap for parts) and `snapshot` the active
    /// or a registered snapshot; main thread, inside a transaction.
    pub unsafe fn rows(
        &self,
        rel: pg_sys::Relation,
        relid: pg_sys::Oid,
        folder: &str,
        snapshot: pg_sys::Snapshot,
        scope: Scope,
        prepare: &mut dyn FnMut(&[ColumnSpec]) -> Result<()>,
    ) -> Result<Copied> {
        // SAFETY: rel is open (the caller's guarantee).
        let mut conv = unsafe { TupleConverter::new(rel)? };
        prepare(conv.specs())?;
        let mut builder = BatchBuilder::new(conv.specs())?;
        let columns = azure_cdc_core::columns::to_text(&conv.columns());
        // A whole table: the partition tree in the snapshot the rows are read in (parts are of a plain table).
        let (numbering, tree) = match scope {
            Scope::Whole => (Numbering::Own { first: 1 }, catalog::partition_tree(relid)?),
            Scope::Parts { split, .. } => (
                Numbering::Shared {
                    turns: Box::new(parts::Turn::new(self.index, split)),
                    writer: self.progress_slot as u32,
                },
                catalog::PartitionTree::default(),
            ),
        };
        // SAFETY: rel is open.
        let partitioned = unsafe { (*(*rel).rd_rel).relkind } == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
        let partitions = partitioned.then(|| tree.signature.clone());
        self.encoder.send(ToEncoder::Begin {
            folder: folder.to_string(),
            schema: builder.schema(),
            compression: crate::gucs::parquet_compression(),
            max_file_bytes: crate::gucs::snapshot_file_bytes(),
            numbering,
        })?;
        let relid_u32 = relid.to_u32();
        let (encoder, index, slot) = (self.encoder, self.index, self.progress_slot);
        // SAFETY: the caller's guarantees.
        let scanned = unsafe {
            match scope {
                Scope::Parts { split, first } => {
                    let mut total: i64 = 0;
                    let mut part = Some(first);
                    let mut result = Ok(0);
                    while let Some(p) = part {
                        let base = total;
                        result = crate::tuples::scan_heap(
                            rel,
                            snapshot,
                            Some((p.start, p.count)),
                            &mut conv,
                            &mut builder,
                            &mut |batch, rows| {
                                encoder.send(ToEncoder::Batch(batch))?;
                                shmem::set_progress(index, slot, relid_u32, base + rows);
                                Ok(!encoder.has_failed())
                            },
                        );
                        match &result {
                            // The encoder's error comes back with the end of the table.
                            Ok(n) if !encoder.has_failed() => total += n,
                            _ => break,
                        }
                        part = parts::next_part(index, split);
                    }
                    result.map(|_| total)
                }
                Scope::Whole => {
                    crate::tuples::scan_table(rel, snapshot, &tree, &mut conv, &mut builder, &mut |batch, rows| {
                        encoder.send(ToEncoder::Batch(batch))?;
                        shmem::set_progress(index, slot, relid_u32, rows);
                        Ok(!encoder.has_failed())
                    })
                }
            }
        };
        let rows = scanned?;
        shmem::set_progress(index, slot, relid_u32, rows);
        let files = self.encoder.finish_table(ToEncoder::End)?;
        Ok(Copied {
            rows,
            files: files.len() as i64,
            bytes: files.iter().map(|f| f.bytes as i64).sum(),
            columns,
            partitions,
        })
    }

    /// Drops the file of the current table not published yet (after [`Copy::rows`] failed; with no
    /// table begun, or a second time, it changes nothing).
    pub fn abandon(&self) {
        let _ = self.encoder.finish_table(ToEncoder::Abort);
    }
}
