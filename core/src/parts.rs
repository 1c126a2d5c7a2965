//! How one large table is cut into block ranges that several snapshot workers scan at once, and when
//! its outcome is complete. Pure bookkeeping: the extension keeps one [`Split`] per table being
//! scanned in parts in shared memory and changes it under its lock; any thread may call this module.
//!
//! A split hands out parts (consecutive block ranges that together cover the blocks the table had when
//! it was split, each exactly once). A worker holding a part holds the table until the files of all
//! its parts are published, then lets go with its counts ([`Split::release`]); the last holder to let
//! go once every part is handed out gets the table's totals.

/// Tables smaller than this many blocks (8 MB at the default block size) are scanned whole.
pub const MIN_SPLIT_BLOCKS: u32 = 1024;
/// Bounds of a part's size in blocks (1 MB and 128 MB at the default block size).
const MIN_PART_BLOCKS: u32 = 128;
const MAX_PART_BLOCKS: u32 = 16_384;
/// Parts per worker, so that workers that start late or meet slower blocks still share the work.
const PARTS_PER_WORKER: u32 = 8;

/// A table being scanned in parts. Plain data, so that it can live in shared memory.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// 1 + the table's index in the snapshot attempt's list; 0: this split is free.
    pub table: u32,
    pub relid: u32,
    /// The table's storage (`pg_class.relfilenode`) when it was split: a worker that finds another
    /// when it opens the table (a rewrite in between, VACUUM FULL or CLUSTER, which move rows between
    /// blocks) must not scan it.
    pub relfile: u32,
    /// Blocks to scan (the table's size when it was split), the size of a part, the next block to hand out.
    pub nblocks: u32,
    pub part_blocks: u32,
    pub next_block: u32,
    /// Workers holding a part whose files are not all published yet.
    pub holders: u32,
    /// Rows, files and bytes published by holders that have let go.
    pub rows: i64,
    pub files: i64,
    pub bytes: i64,
    /// A value in some part could not be written: the table is parked.
    pub parked: bool,
}

/// A block range of a split table: blocks `start .. start + count`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub start: u32,
    pub count: u32,
}

/// What the holders of a split table published, once the last has let go.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Totals {
    pub rows: i64,
    pub files: i64,
    pub bytes: i64,
    pub parked: bool,
}

/// Whether a table of `nblocks` blocks is scanned in parts by `workers` workers.
pub fn worth_splitting(nblocks: u32, workers: u32) -> bool {
    workers >= 2 && nblocks >= MIN_SPLIT_BLOCKS
}

/// The size of a part of a table of `nblocks` blocks scanned by `workers` workers.
pub fn part_blocks(nblocks: u32, workers: u32) -> u32 {
    (nblocks / (workers.max(1) * PARTS_PER_WORKER)).clamp(MIN_PART_BLOCKS, MAX_PART_BLOCKS)
}

impl Split {
    /// A split of table `table` (index; `relid`, stored in `relfile`) of `nblocks` blocks, held by the
    /// worker that splits it.
    pub fn new(table: usize, relid: u32, relfile: u32, nblocks: u32, workers: u32) -> Split {
        Split {
            table: table as u32 + 1,
            relid,
            relfile,
            nblocks,
            part_blocks: part_blocks(nblocks, workers),
            holders: 1,
            ..Split::default()
        }
    }

    pub fn in_use(&self) -> bool {
        self.table != 0
    }

    /// The table's index in the attempt's list.
    pub fn table_index(&self) -> usize {
        self.table.saturating_sub(1) as usize
    }

    /// The next part, if any is left and the table is not parked.
    pub fn take(&mut self) -> Option<Part> {
        if !self.in_use() || self.parked || self.next_block >= self.nblocks {
            return None;
        }
        let start = self.next_block;
        let count = self.part_blocks.max(1).min(self.nblocks - start);
        self.next_block += count;
        Some(Part { start, count })
    }

    /// The next part for a worker that does not hold the table yet (it then does).
    pub fn join(&mut self) -> Option<Part> {
        let part = self.take()?;
        self.holders += 1;
        Some(part)
    }

    /// Marks the table parked; true for the first to do so.
    pub fn park(&mut self) -> bool {
        !std::mem::replace(&mut self.parked, true)
    }

    /// A holder lets go with what it published. The last holder, once no part is left to hand out,
    /// gets the totals and the split is freed.
    pub fn release(&mut self, rows: i64, files: i64, bytes: i64) -> Option<Totals> {
        self.holders = self.holders.saturating_sub(1);
        self.rows += rows;
        self.files += files;
        self.bytes += bytes;
        if self.holders > 0 || (!self.parked && self.next_block < self.nblocks) {
            return None;
        }
        let totals = Totals { rows: self.rows, files: self.files, bytes: self.bytes, parked: self.parked };
        *self = Split::default();
        Some(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_tables_with_company_are_split() {
        assert!(!worth_splitting(1_000_000, 1));
        assert!(!worth_splitting(MIN_SPLIT_BLOCKS - 1, 4));
        assert!(worth_splitting(MIN_SPLIT_BLOCKS, 2));
    }

    #[test]
    fn parts_are_bounded() {
        assert_eq!(part_blocks(1024, 2), 128);
        assert_eq!(part_blocks(160_000, 2), 10_000);
        assert_eq!(part_blocks(u32::MAX, 2), 16_384);
        assert_eq!(part_blocks(5000, 0), 625);
    }

    #[test]
    fn parts_cover_every_block_once_whoever_takes_them() {
        for nblocks in [1024u32, 1025, 4097, 100_000, 1_000_003] {
            let mut s = Split::new(3, 42, 9, nblocks, 3);
            let mut seen = vec![false; nblocks as usize];
            // the splitter, then two workers joining, taking in turns
            let mut holders = vec![true, false, false];
            let mut w = 0;
            loop {
                let part = if holders[w] { s.take() } else { s.join() };
                let Some(p) = part else { break };
                holders[w] = true;
                for b in p.start..p.start + p.count {
                    assert!(!std::mem::replace(&mut seen[b as usize], true), "block {b} twice");
                }
                w = (w + 1) % 3;
            }
            assert!(seen.iter().all(|b| *b), "{nblocks}: a block was never handed out");
        }
    }

    #[test]
    fn the_last_holder_gets_the_totals_only_once_every_part_is_out() {
        let mut s = Split::new(0, 7, 9, 2048, 2);
        assert_eq!(s.table_index(), 0);
        assert!(s.take().is_some());
        // the only holder lets go with parts left: someone will still join
        assert_eq!(s.release(10, 1, 100), None);
        let p = s.join().unwrap();
        assert_eq!(p.start, s.part_blocks);
        assert!(s.join().is_some());
        while s.take().is_some() {}
        assert_eq!(s.release(5, 1, 50), None);
        let t = s.release(7, 2, 70).unwrap();
        assert_eq!(t, Totals { rows: 22, files: 4, bytes: 220, parked: false });
        assert!(!s.in_use());
    }

    #[test]
    fn a_parked_table_hands_out_nothing_and_ends_with_its_holders() {
        let mut s = Split::new(1, 7, 9, 100_000, 2);
        s.take().unwrap();
        s.join().unwrap();
        assert!(s.park());
        assert!(!s.park());
        assert_eq!(s.take(), None);
        assert_eq!(s.join(), None);
        assert_eq!(s.release(0, 0, 0), None);
        assert!(s.release(3, 1, 30).unwrap().parked);
    }
}
