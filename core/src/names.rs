//! Every name azure_cdc shows to the outside world is generated, and parsed back, here: mirror names,
//! replication slot names, background worker names, and the object keys of the landing zone (table
//! folders, data files, temporary files). Pure; round-trip tested.
//!
//! Folder names are the schemas' and tables' names: Fabric names a mirrored table after its folder.
//! Object keys come from database names only through [`table_folder`], which writes a name as it is
//! except for what cannot be, or must not start or end, a path component; those characters become
//! `%XX` (upper-case hex, per UTF-8 byte):
//! - `/` and `\` (path separators), and control characters;
//! - `%` itself, so that the mapping is injective and [`decode_component`] inverts it;
//! - a leading `_` (readers of the landing zone ignore names starting with `_`);
//! - a trailing `.` (Azure Storage refuses names ending with a dot; `.` and `..` cannot be folders).
//!
//! So a folder can never escape its parent, be `.` or `..`, or be shared by two names.

use crate::error::{Error, ErrorKind, Result};

/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;
/// Prefix of every replication slot azure_cdc creates.
pub const SLOT_PREFIX: &str = "azure_cdc_";
/// Longest mirror name: the slot name `azure_cdc_<mirror>` must fit in 63 bytes.
pub const MAX_MIRROR_NAME_BYTES: usize = MAX_IDENTIFIER_BYTES - SLOT_PREFIX.len();
/// Number of digits of a data file number.
pub const FILE_NUMBER_DIGITS: usize = 20;
/// Suffix of the folder of a schema in the landing zone.
pub const SCHEMA_FOLDER_SUFFIX: &str = ".schema";

/// Checks a mirror name: 1 to 53 bytes of lower-case ASCII letters, digits and `_`, not starting with a
/// digit. The rules of replication slot names, so that the slot can carry the mirror's name.
pub fn validate_mirror_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::new(ErrorKind::InvalidName, format!("invalid mirror name \"{name}\""))
            .with_detail(why.to_string())
            .with_hint(format!(
                "A mirror name has 1 to {MAX_MIRROR_NAME_BYTES} characters: lower-case letters, digits and underscores, not starting with a digit."
            ))
    };
    if name.is_empty() {
        return Err(bad("The name is empty."));
    }
    if name.len() > MAX_MIRROR_NAME_BYTES {
        return Err(bad(&format!("The name is {} bytes long.", name.len())));
    }
    if name.as_bytes()[0].is_ascii_digit() {
        return Err(bad("The name starts with a digit."));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')) {
        return Err(bad(&format!("The name contains \"{c}\".")));
    }
    Ok(())
}

/// The logical replication slot of a mirror.
pub fn slot_name(mirror: &str) -> String {
    format!("{SLOT_PREFIX}{mirror}")
}

/// The mirror a slot belongs to, if the slot is one of ours.
pub fn mirror_of_slot(slot: &str) -> Option<&str> {
    slot.strip_prefix(SLOT_PREFIX).filter(|m| validate_mirror_name(m).is_ok())
}

/// The kinds of background workers, as shown in `pg_stat_activity.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    Launcher,
    Scout,
    Snapshot,
    SnapshotHelper,
    Decoder,
    Copier,
}

impl WorkerKind {
    pub fn backend_type(self) -> &'static str {
        match self {
            WorkerKind::Launcher => "azure_cdc launcher",
            WorkerKind::Scout => "azure_cdc scout",
            WorkerKind::Snapshot => "azure_cdc snapshot",
            WorkerKind::SnapshotHelper => "azure_cdc snapshot helper",
            WorkerKind::Decoder => "azure_cdc decoder",
            WorkerKind::Copier => "azure_cdc copier",
        }
    }
}

/// The name of one background worker (at most 95 bytes, PostgreSQL's BGW_MAXLEN - 1).
pub fn worker_name(kind: WorkerKind, database: &str, mirror: Option<&str>) -> String {
    let mut s = match mirror {
        Some(m) => format!("{} for mirror {m} in database {database}", kind.backend_type()),
        None => format!("{} for database {database}", kind.backend_type()),
    };
    truncate_utf8(&mut s, 95);
    s
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Whether character `c` at position `i` (in characters) of a name of `n` characters must be
/// written as `%XX` in a path component. See the module documentation for the rule.
fn must_encode(c: char, i: usize, n: usize) -> bool {
    matches!(c, '/' | '\\' | '%') || c.is_control() || (i == 0 && c == '_') || (i + 1 == n && c == '.')
}

/// Encodes one database name (schema or table) as one path component of an object key: the name as
/// it is, but for the characters [`must_encode`] picks, which become `%XX` per UTF-8 byte.
pub fn encode_component(name: &str) -> String {
    let n = name.chars().count();
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        if must_encode(c, i, n) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Inverts [`encode_component`]; fails on anything it cannot have produced.
pub fn decode_component(encoded: &str) -> Result<String> {
    let bad = || Error::new(ErrorKind::InvalidParameter, format!("\"{encoded}\" is not an encoded name"));
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut rest = encoded.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            if hex.iter().any(|h| h.is_ascii_lowercase()) {
                return Err(bad());
            }
            let text = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(text, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    let name = String::from_utf8(bytes).map_err(|_| bad())?;
    // Exactly one encoding per name: anything else (a character kept that must be encoded, or one
    // encoded that is kept) was not produced here.
    if encode_component(&name) != encoded {
        return Err(bad());
    }
    Ok(name)
}

/// The folder of a table relative to the landing-zone root: `<schema>.schema/<table>`.
pub fn table_folder(schema: &str, table: &str) -> String {
    format!("{}{SCHEMA_FOLDER_SUFFIX}/{}", encode_component(schema), encode_component(table))
}

/// Parses a table folder back into (schema, table).
pub fn parse_table_folder(folder: &str) -> Result<(String, String)> {
    let bad = || Error::new(ErrorKind::InvalidParameter, format!("\"{folder}\" is not a table folder"));
    let (schema, table) = folder.split_once('/').ok_or_else(bad)?;
    let schema = schema.strip_suffix(SCHEMA_FOLDER_SUFFIX).ok_or_else(bad)?;
    if table.contains('/') {
        return Err(bad());
    }
    Ok((decode_component(schema)?, decode_component(table)?))
}

/// The published name of data file `number` (`00000000000000000001.parquet`).
pub fn data_file_name(number: u64) -> String {
    format!("{number:0width$}.parquet", width = FILE_NUMBER_DIGITS)
}

/// The name a data file is written under before it is published. Readers ignore names starting with `_`.
pub fn temporary_file_name(number: u64) -> String {
    format!("_{}", data_file_name(number))
}

/// Where staging numbers start: far above any number a table's files reach.
const STAGING_BASE: u64 = 10_000_000_000_000_000_000;

/// A temporary name's number for file `seq` of writer `writer`, when several writers (snapshot
/// workers scanning parts of one table) write into one folder and a file's number is known only once
/// it is complete ([`crate::datafile::Numbering::Shared`]). Distinct for distinct pairs, never equal
/// to a data file's number.
pub fn staging_number(writer: u32, seq: u32) -> u64 {
    STAGING_BASE + u64::from(writer) * 1_000_000_000 + u64::from(seq % 1_000_000_000)
}

/// The number of a published data file, or None for any other name (metadata, temporary files).
pub fn parse_data_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".parquet")?;
    if digits.len() != FILE_NUMBER_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names() {
        for ok in ["sales", "a", "_x", "m_1", &"a".repeat(MAX_MIRROR_NAME_BYTES)] {
            assert!(validate_mirror_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "Sales", "a-b", "a b", "ä", &"a".repeat(MAX_MIRROR_NAME_BYTES + 1), "a;drop"] {
            let e = validate_mirror_name(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidName, "{bad}");
        }
    }

    #[test]
    fn slot_name_round_trip_and_length() {
        let longest = "m".repeat(MAX_MIRROR_NAME_BYTES);
        assert_eq!(slot_name(&longest).len(), MAX_IDENTIFIER_BYTES);
        for m in ["sales", &longest] {
            assert_eq!(mirror_of_slot(&slot_name(m)), Some(m));
        }
        assert_eq!(mirror_of_slot("other_slot"), None);
        assert_eq!(mirror_of_slot("azure_cdc_Bad"), None);
    }

    #[test]
    fn worker_names_fit_bgw_maxlen() {
        let db = "d".repeat(63);
        let m = "m".repeat(53);
        assert!(worker_name(WorkerKind::Snapshot, &db, Some(&m)).len() <= 95);
        let uni = "é".repeat(31);
        let n = worker_name(WorkerKind::Snapshot, &uni, Some(&m));
        assert!(n.len() <= 95);
        assert!(n.starts_with("azure_cdc snapshot for mirror"));
    }

    #[test]
    fn component_encoding_is_safe() {
        for (raw, enc) in [
            ("public", "public"),
            ("..", ".%2E"),
            (".", "%2E"),
            ("a.b", "a.b"),
            ("a/b", "a%2Fb"),
            ("Order Lines", "Order Lines"),
            ("\"q\"", "\"q\""),
            ("50%", "50%25"),
            ("Ünïcode_名前", "Ünïcode_名前"),
            ("back\\slash", "back%5Cslash"),
            ("_hidden", "%5Fhidden"),
            ("a_", "a_"),
            ("tab\there", "tab%09here"),
            ("c1\u{85}", "c1%C2%85"),
            ("", ""),
        ] {
            assert_eq!(encode_component(raw), enc);
            assert_eq!(decode_component(enc).unwrap(), raw);
        }
    }

    #[test]
    fn component_round_trip_exhaustive_ascii_pairs() {
        let mut seen = std::collections::HashMap::new();
        for a in 0u8..128 {
            for b in [b'a', b'.', b'%', b'/', 0x7f] {
                let raw = String::from_utf8(vec![a, b]).unwrap();
                let enc = encode_component(&raw);
                assert!(!enc.contains('/') && !enc.contains('\\') && !enc.ends_with('.') && !enc.starts_with('_'));
                assert_eq!(decode_component(&enc).unwrap(), raw);
                if let Some(prev) = seen.insert(enc.clone(), raw.clone()) {
                    panic!("{prev:?} and {raw:?} both encode to {enc}");
                }
            }
        }
    }

    #[test]
    fn decode_rejects_what_encode_never_makes() {
        for bad in ["%2", "%zz", "%41", "%2e", "a.", "a/b", "%C3", "_a", "a%2Eb", "%", "a\tb"] {
            assert!(decode_component(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_folders() {
        let long = "t".repeat(63);
        let f = table_folder("my schema", &long);
        assert_eq!(f, format!("my schema.schema/{long}"));
        assert_eq!(parse_table_folder(&f).unwrap(), ("my schema".to_string(), long));
        // worst case: 63 bytes all encoded stays within one 255-byte path component
        let worst = "\u{1}".repeat(63);
        assert!(encode_component(&worst).len() + SCHEMA_FOLDER_SUFFIX.len() <= 255);
        assert_eq!(parse_table_folder(&table_folder("..", "..")).unwrap(), ("..".into(), "..".into()));
        assert_eq!(table_folder("Sales Dept", "../Orders ü"), "Sales Dept.schema/..%2FOrders ü");
        assert!(parse_table_folder("public/t").is_err());
        assert!(parse_table_folder("public.schema/a/b").is_err());
    }

    #[test]
    fn data_file_names() {
        assert_eq!(data_file_name(1), "00000000000000000001.parquet");
        assert_eq!(temporary_file_name(2), "_00000000000000000002.parquet");
        assert_eq!(temporary_file_name(staging_number(3, 7)), "_10000000003000000007.parquet");
        assert_eq!(temporary_file_name(staging_number(16, 999_999_999)).len(), 29);
        assert_ne!(staging_number(1, 0), staging_number(0, 1_000_000_000 - 1));
        assert_eq!(data_file_name(u64::MAX), "18446744073709551615.parquet");
        for n in [1u64, 42, 99_999, u64::MAX] {
            assert_eq!(parse_data_file_name(&data_file_name(n)), Some(n));
            assert_eq!(parse_data_file_name(&temporary_file_name(n)), None);
        }
        assert_eq!(parse_data_file_name("_metadata.json"), None);
        assert_eq!(parse_data_file_name("1.parquet"), None);
        assert_eq!(parse_data_file_name("0000000000000000000a.parquet"), None);
    }
}

#[cfg(test)]
mod property_tests {
    use super::*;

    /// xorshift64*: deterministic, dependency-free randomness for property tests.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_name(rng: &mut Rng) -> String {
        let pool: Vec<char> = "aZ09_-./\\ %\"'\t\n\0é名☃🙂..".chars().collect();
        let len = rng.below(64) as usize;
        (0..len)
            .map(|_| {
                if rng.below(4) == 0 {
                    char::from_u32(rng.below(0x11000) as u32).filter(|c| *c != '\0').unwrap_or('x')
                } else {
                    pool[rng.below(pool.len() as u64) as usize]
                }
            })
            .collect()
    }

    #[test]
    fn folder_encoding_round_trips_and_never_escapes() {
        let mut rng = Rng(0x5EED_1234_ABCD_0001);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..20_000 {
            let (schema, table) = (random_name(&mut rng), random_name(&mut rng));
            let folder = table_folder(&schema, &table);
            assert_eq!(folder.matches('/').count(), 1, "{folder}");
            assert!(!folder.starts_with('/') && !folder.split('/').any(|c| c == ".." || c == "."), "{folder}");
            assert!(!folder.split('/').any(|c| c.starts_with('_') || c.ends_with('.')), "{folder}");
            assert!(!folder.contains('\0') && !folder.contains('\\'));
            assert_eq!(parse_table_folder(&folder).unwrap(), (schema.clone(), table.clone()));
            if let Some(prev) = seen.insert(folder.clone(), (schema.clone(), table.clone())) {
                assert_eq!(prev, (schema, table), "two names share folder {folder}");
            }
        }
    }
}
