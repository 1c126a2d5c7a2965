//! Turning tuples of a relation into landing-zone column values: a per-relation plan that knows, for
//! every live column, how to read its datum (by value, varlena bytes, fixed-size bytes, or the type's
//! output function) and hands a borrowed [`Value`] to the pure batch builder; and [`scan_heap`], the
//! one heap scan that feeds it (snapshot workers, and `verify_table` in a backend). Runs on the main
//! thread of a worker or backend; the values it reads must stay valid (buffer pinned, memory context
//! alive) until `append_row` returns.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::CStr;
use std::rc::Rc;

use azure_cdc_core::arrow_array::RecordBatch;
use azure_cdc_core::batch::{BatchBuilder, ColumnSpec, Value};
use azure_cdc_core::typemap::{self, ColumnKind};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::pg_sys;
use pgrx::spi::Spi;

struct ColumnPlan {
    /// Position in the tuple descriptor (0-based), including dropped columns.
    attno: usize,
    kind: ColumnKind,
    /// Output function, for kinds carried as the type's text output.
    output: Option<pg_sys::FmgrInfo>,
}

/// The settings that shape types' text output, fixed so that a value lands the same way whichever
/// process writes or verifies it, whatever the server's or session's defaults: timestamps with time
/// zone in UTC, ISO dates, PostgreSQL's interval style, and floats in their shortest exact form.
pub const OUTPUT_SETTINGS: [(&str, &str); 4] =
    [("TimeZone", "UTC"), ("DateStyle", "ISO, YMD"), ("IntervalStyle", "postgres"), ("extra_float_digits", "1")];

/// Applies [`OUTPUT_SETTINGS`]: for the whole session (`local` false, a worker at start) or to the
/// end of the current transaction (`local` true, a verification in a user's session). Needs a
/// transaction.
pub fn pin_output_settings(local: bool) -> Result<()> {
    for (name, value) in OUTPUT_SETTINGS {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.set_config($1, $2, $3)",
            &[name.into(), value.into(), local.into()],
        )
        .map_err(crate::errors::spi)?;
    }
    Ok(())
}

/// `array_to_json(anyarray)` and `row_to_json(record)` (pg_proc.dat; stable across versions).
const F_ARRAY_TO_JSON: u32 = 3153;
const F_ROW_TO_JSON: u32 = 3155;

/// What a converter was doing when PostgreSQL code it called raised an error: the mirrored table
/// (by relid, to park it) and which column of it ("column … of table …").
#[derive(Clone, Debug)]
pub struct Converting {
    pub relid: u32,
    pub what: Rc<str>,
}

thread_local! {
    /// Set while a value goes through PostgreSQL code that may raise an error quoting it (a cast to
    /// json, which the type's owner may have written; an encoding conversion); still set if it did.
    static CONVERTING: RefCell<Option<Converting>> = const { RefCell::new(None) };
}

/// What a conversion that raised an error was converting, if the last error came from one. Its
/// message may quote the value: callers that record errors where others read them (a worker's
/// `last_error`, the events) say what failed instead, and park that table.
pub fn take_failed_conversion() -> Option<Converting> {
    CONVERTING.with(|c| c.borrow_mut().take())
}

/// Runs `f` with [`CONVERTING`] set to column `i` of `described`; cleared only when `f` returns.
fn converting<T>(relid: u32, what: &Rc<str>, f: impl FnOnce() -> T) -> T {
    CONVERTING.with(|c| *c.borrow_mut() = Some(Converting { relid, what: what.clone() }));
    let r = f();
    CONVERTING.with(|c| c.borrow_mut().take());
    r
}

/// The mirrored table rows belong to: the role its JSON conversions run as, its relid, its name.
#[derive(Clone, Debug)]
pub struct RowsOf {
    pub cast_role: pg_sys::Oid,
    pub relid: u32,
    /// "schema.table"
    pub table: String,
}

fn describe(specs: &[ColumnSpec], table: &str) -> Vec<Rc<str>> {
    specs.iter().map(|c| Rc::from(format!("column \"{}\" of table \"{table}\"", c.name))).collect()
}

/// The owner of relation `relid` as the current (or, during decoding, historic) catalog has it.
///
/// # Safety
/// Main thread, inside a transaction (or a decoding callback).
pub unsafe fn relation_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: as required above; RelationIdGetRelation returns NULL for an unknown relation and a
    // reference-counted relcache entry otherwise, closed right after.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return None;
        }
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::RelationClose(rel);
        Some(owner)
    }
}

/// pg_cast's OID (catalog/pg_cast.h; stable across versions).
const CAST_RELATION: u32 = 2605;

/// Holds off CREATE CAST and DROP CAST until the current transaction ends. A copy (snapshot,
/// reseed) takes it before it plans any conversion: `array_to_json` looks casts up again for every
/// value, in the current catalog, so a cast to json created after [`TupleConverter::new`] checked a
/// table would otherwise be called in the middle of the copy. (The decoder needs no lock: it sees
/// casts as of each point of the stream, and a cast change rebuilds its plans.)
pub fn freeze_casts() {
    // SAFETY: a table lock on a catalog, in the current transaction, on the main thread; released
    // when the transaction ends.
    unsafe { pg_sys::LockRelationOid(pg_sys::Oid::from(CAST_RELATION), pg_sys::ShareLock as i32) };
}

/// pg_language.oid of `internal` and `c` (catalog/pg_language.dat; stable across versions).
const INTERNAL_LANGUAGE: u32 = 12;
const C_LANGUAGE: u32 = 13;

/// The language of function `func` (pg_proc.prolang), if it exists.
///
/// # Safety
/// Main thread, inside a transaction (or a decoding callback).
unsafe fn function_language(func: pg_sys::Oid) -> Option<u32> {
    // SAFETY: a syscache look-up released right after; GETSTRUCT is the tuple header plus t_hoff.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::PROCOID as i32, pg_sys::Datum::from(func));
        if tup.is_null() {
            return None;
        }
        let header = (*tup).t_data;
        let form = (header as *const u8).add((*header).t_hoff as usize) as *const pg_sys::FormData_pg_proc;
        let lang = (*form).prolang.to_u32();
        pg_sys::ReleaseSysCache(tup);
        Some(lang)
    }
}

/// Whether turning a value of type `typ` into JSON (as `array_to_json` / `row_to_json` do: through
/// domains, array elements and composite fields) would call a cast to json written in SQL or a
/// procedural language rather than C. Such a function is code a type's owner wrote; PostgreSQL
/// cannot run it inside logical decoding (there is no snapshot to run queries in: as for its own
/// publication row filters, which take built-in functions only), and azure_cdc never runs it with
/// raised rights. Returns the type and the function, for the error.
///
/// # Safety
/// Main thread, inside a transaction (or a decoding callback).
unsafe fn user_json_cast(typ: pg_sys::Oid, seen: &mut Vec<pg_sys::Oid>) -> Option<(String, String)> {
    // SAFETY: catalog look-ups (syscache, type cache) as json.c makes them; the row type's
    // descriptor is released after use.
    unsafe {
        let t = pg_sys::getBaseType(typ);
        if seen.contains(&t) {
            return None;
        }
        seen.push(t);
        let elem = pg_sys::get_element_type(t);
        if elem != pg_sys::InvalidOid {
            return user_json_cast(elem, seen);
        }
        if pg_sys::type_is_rowtype(t) {
            let desc = pg_sys::lookup_rowtype_tupdesc_noerror(t, -1, true);
            if desc.is_null() {
                return None;
            }
            let attrs = crate::versions::attributes(desc);
            let found = attrs.iter().filter(|a| !a.attisdropped).find_map(|a| user_json_cast(a.atttypid, seen));
            if (*desc).tdrefcount >= 0 {
                pg_sys::DecrTupleDescRefCount(desc);
            }
            return found;
        }
        if t.to_u32() < pg_sys::FirstNormalObjectId {
            return None;
        }
        let mut func = pg_sys::InvalidOid;
        let path =
            pg_sys::find_coercion_pathway(pg_sys::JSONOID, t, pg_sys::CoercionContext::COERCION_EXPLICIT, &mut func);
        if path != pg_sys::CoercionPathType::COERCION_PATH_FUNC || func == pg_sys::InvalidOid {
            return None;
        }
        match function_language(func) {
            Some(INTERNAL_LANGUAGE | C_LANGUAGE) | None => None,
            Some(_) => {
                let tname = CStr::from_ptr(pg_sys::format_type_be(t)).to_string_lossy().into_owned();
                let fname = pg_sys::get_func_name(func);
                let fname = if fname.is_null() {
                    func.to_u32().to_string()
                } else {
                    CStr::from_ptr(fname).to_string_lossy().into_owned()
                };
                Some((tname, fname))
            }
        }
    }
}

/// How to convert the tuples of one relation.
pub struct TupleConverter {
    plans: Vec<ColumnPlan>,
    specs: Vec<ColumnSpec>,
    natts: usize,
    utf8: bool,
    /// The role JSON conversions run as (they may call a cast to json a type's owner wrote): the
    /// mirrored table's owner in workers, the caller in `verify_table`.
    cast_role: pg_sys::Oid,
    /// The mirrored table the rows belong to (a partition's rows belong to its partitioned table).
    mirrored: u32,
    /// Per column, "column … of table …" naming the mirrored table, for errors.
    described: Vec<Rc<str>>,
    /// The mirrored table's name ("schema.table").
    table: String,
}

impl TupleConverter {
    /// Plans the conversion of `rel`'s live columns.
    ///
    /// # Safety
    /// `rel` must be an open relation; call on the main thread inside a transaction.
    pub unsafe fn new(rel: pg_sys::Relation) -> Result<Self> {
        // SAFETY: the caller guarantees an open relation; its tuple descriptor has natts attributes.
        unsafe {
            let desc = (*rel).rd_att;
            let natts = (*desc).natts as usize;
            let attrs = crate::versions::attributes(desc);
            let mut plans = Vec::new();
            let mut specs = Vec::new();
            for (attno, att) in attrs.iter().enumerate() {
                if att.attisdropped {
                    continue;
                }
                let mut typmod = att.atttypmod;
                let base = pg_sys::getBaseTypeAndTypmod(att.atttypid, &mut typmod);
                let is_array = pg_sys::get_element_type(base) != pg_sys::InvalidOid;
                let kind = typemap::kind_for_type(base.to_u32(), typmod, is_array, pg_sys::type_is_rowtype(base));
                let json_fn = match kind {
                    ColumnKind::JsonArray => Some(F_ARRAY_TO_JSON),
                    ColumnKind::JsonComposite => Some(F_ROW_TO_JSON),
                    _ => None,
                };
                let output = if let Some(f) = json_fn {
                    // array_to_json / row_to_json read the value's type from the value itself.
                    let mut info: pg_sys::FmgrInfo = std::mem::zeroed();
                    pg_sys::fmgr_info(pg_sys::Oid::from(f), &mut info);
                    Some(info)
                } else if matches!(kind, ColumnKind::Jsonb | ColumnKind::OtherText) {
                    let mut func = pg_sys::InvalidOid;
                    let mut varlena = false;
                    pg_sys::getTypeOutputInfo(att.atttypid, &mut func, &mut varlena);
                    let mut info: pg_sys::FmgrInfo = std::mem::zeroed();
                    pg_sys::fmgr_info(func, &mut info);
                    Some(info)
                } else {
                    None
                };
                let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned();
                if json_fn.is_some() {
                    if let Some((typ, func)) = user_json_cast(att.atttypid, &mut Vec::new()) {
                        return Err(Error::new(
                            ErrorKind::FeatureNotSupported,
                            format!(
                                "column \"{name}\": its JSON form would call the cast to json of type {typ} (function {func}), which is written in SQL or a procedural language"
                            ),
                        )
                        .with_detail("Arrays and composites land as JSON. Logical decoding cannot run such a function, and azure_cdc runs no code a type's owner wrote with the rights of a mirror.")
                        .with_hint("Drop the cast (or give it a C implementation), or leave the table out of the mirror; then resync_table."));
                    }
                }
                plans.push(ColumnPlan { attno, kind, output });
                specs.push(ColumnSpec { name, kind });
            }
            let utf8 = pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32;
            let cast_role = (*(*rel).rd_rel).relowner;
            let relname = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy().into_owned();
            let nsp = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
            let schema = if nsp.is_null() { String::new() } else { CStr::from_ptr(nsp).to_string_lossy().into_owned() };
            let table = format!("{schema}.{relname}");
            let described = describe(&specs, &table);
            Ok(TupleConverter {
                plans,
                specs,
                natts,
                utf8,
                cast_role,
                mirrored: (*rel).rd_id.to_u32(),
                described,
                table,
            })
        }
    }

    pub fn specs(&self) -> &[ColumnSpec] {
        &self.specs
    }

    /// The same plan, with JSON conversions run as `role` (`verify_table`: the caller).
    pub fn with_cast_role(mut self, role: pg_sys::Oid) -> Self {
        self.cast_role = role;
        self
    }

    /// The mirrored table this plan's rows belong to.
    pub fn rows_of(&self) -> RowsOf {
        RowsOf { cast_role: self.cast_role, relid: self.mirrored, table: self.table.clone() }
    }

    /// A partition's plan converting into the columns `specs` of the partitioned table `of` (see
    /// [`Self::arranged_as`]): its rows belong to that table, whose cast role and names it takes, so
    /// that a type's cast never runs as the owner of a partition.
    pub fn belonging_to(self, specs: &[ColumnSpec], of: &RowsOf) -> Option<Self> {
        let mut me = self.arranged_as(specs)?;
        me.cast_role = of.cast_role;
        me.mirrored = of.relid;
        me.described = describe(&me.specs, &of.table);
        me.table = of.table.clone();
        Some(me)
    }

    /// The same plan with its columns in the order of `specs` (a partition's columns in its
    /// partitioned table's order: the two may differ in column order and dropped columns). None
    /// unless both have exactly the same columns, by name and kind.
    pub fn arranged_as(mut self, specs: &[ColumnSpec]) -> Option<Self> {
        if specs.len() != self.specs.len() {
            return None;
        }
        let mut plans: Vec<Option<ColumnPlan>> = self.plans.drain(..).map(Some).collect();
        let mut arranged = Vec::with_capacity(specs.len());
        let mut described = Vec::with_capacity(specs.len());
        for spec in specs {
            let i = self.specs.iter().position(|s| s == spec)?;
            arranged.push(plans[i].take()?);
            described.push(self.described[i].clone());
        }
        self.plans = arranged;
        self.described = described;
        self.specs = specs.to_vec();
        Some(self)
    }

    /// The columns as the landing zone's files carry them, with their attribute numbers.
    pub fn columns(&self) -> Vec<azure_cdc_core::columns::Column> {
        self.plans
            .iter()
            .zip(&self.specs)
            .map(|(p, s)| azure_cdc_core::columns::Column {
                attnum: p.attno as i32 + 1,
                name: s.name.clone(),
                kind: format!("{:?}", s.kind),
            })
            .collect()
    }

    /// Number of attributes of the tuple descriptor (the size of the deform arrays).
    pub fn natts(&self) -> usize {
        self.natts
    }

    /// Appends one deformed tuple to `builder`, then `marker` as the last column if given (change
    /// files end with `__rowMarker__`).
    ///
    /// # Safety
    /// `values` and `nulls` must come from `heap_deform_tuple` of a tuple of the relation this
    /// converter was planned for, and the tuple's memory must still be valid.
    pub unsafe fn append_row(
        &mut self,
        values: &[pg_sys::Datum],
        nulls: &[bool],
        marker: Option<i32>,
        builder: &mut BatchBuilder,
    ) -> Result<()> {
        for (i, plan) in self.plans.iter_mut().enumerate() {
            if nulls[plan.attno] {
                builder.append(i, Value::Null)?;
                continue;
            }
            let d = values[plan.attno];
            // SAFETY: d is a non-null datum of the column's type (guaranteed by the caller); each arm
            // reads it the way PostgreSQL stores that type (by value, varlena, or fixed 16 bytes).
            unsafe {
                match plan.kind {
                    ColumnKind::Bool => builder.append(i, Value::Bool(d.value() != 0))?,
                    ColumnKind::Int16 => builder.append(i, Value::Int16(d.value() as i16))?,
                    ColumnKind::Int32 => builder.append(i, Value::Int32(d.value() as i32))?,
                    ColumnKind::Int64 => builder.append(i, Value::Int64(d.value() as i64))?,
                    ColumnKind::Float32 => builder.append(i, Value::Float32(f32::from_bits(d.value() as u32)))?,
                    ColumnKind::Float64 => builder.append(i, Value::Float64(f64::from_bits(d.value() as u64)))?,
                    ColumnKind::Date => builder.append(i, Value::PgDate(d.value() as i32))?,
                    ColumnKind::Time => builder.append(i, Value::PgTime(d.value() as i64))?,
                    ColumnKind::Timestamp | ColumnKind::TimestampTz => {
                        builder.append(i, Value::PgTimestamp(d.value() as i64))?
                    }
                    ColumnKind::Uuid => builder.append(i, Value::Uuid(&*(d.cast_mut_ptr::<[u8; 16]>())))?,
                    ColumnKind::Decimal { .. } | ColumnKind::NumericText => {
                        builder.append(i, Value::Numeric(varlena_bytes(d)))?
                    }
                    ColumnKind::Bytes => builder.append(i, Value::Bytes(varlena_bytes(d)))?,
                    ColumnKind::Text => {
                        let s = to_utf8(varlena_bytes(d), self.utf8, self.mirrored, &self.described[i])?;
                        builder.append(i, Value::Text(&s))?
                    }
                    ColumnKind::JsonArray | ColumnKind::JsonComposite => {
                        let Some(info) = plan.output.as_mut() else {
                            return Err(Error::new(ErrorKind::Internal, "column without a JSON function"));
                        };
                        // array_to_json / row_to_json call a cast to json that the owner of an element
                        // or field type may have written: it runs as the cast role, restricted.
                        let role = self.cast_role;
                        let json = converting(self.mirrored, &self.described[i], || {
                            crate::privileges::as_table_owner(role, || {
                                pg_sys::FunctionCall1Coll(info, pg_sys::InvalidOid, d)
                            })
                        });
                        let s = to_utf8(varlena_bytes(json), self.utf8, self.mirrored, &self.described[i])?;
                        builder.append(i, Value::Text(&s))?
                    }
                    ColumnKind::Jsonb | ColumnKind::OtherText => {
                        let Some(info) = plan.output.as_mut() else {
                            return Err(Error::new(ErrorKind::Internal, "column without an output function"));
                        };
                        let cstr = pg_sys::OutputFunctionCall(info, d);
                        let bytes = std::ffi::CStr::from_ptr(cstr).to_bytes();
                        let s = to_utf8(bytes, self.utf8, self.mirrored, &self.described[i])?;
                        builder.append(i, Value::Text(&s))?
                    }
                }
            }
        }
        if let Some(m) = marker {
            builder.append(self.plans.len(), Value::Int32(m))?;
        }
        builder.end_row()
    }
}

/// Whether a non-null varlena datum is a pointer to a value stored out of line in the table's TOAST
/// relation. In a decoded change, that is an unchanged TOASTed column of an UPDATE: the change
/// stream does not carry its value.
///
/// # Safety
/// `d` must be a non-null datum of a varlena column (attlen -1).
pub unsafe fn is_unchanged_toast(d: pg_sys::Datum) -> bool {
    // SAFETY: a varlena datum points at least at its 1-byte header; an external one (first byte 0x01,
    // VARATT_IS_1B_E on little- and big-endian alike for this tag layout) has its tag in the second.
    unsafe {
        let p = d.cast_mut_ptr::<u8>();
        *p == 0x01 && *p.add(1) as u32 == pg_sys::vartag_external::VARTAG_ONDISK
    }
}

/// Whether two non-null datums of the same column hold the same value (byte-wise, after
/// detoasting). Used to tell whether an UPDATE changed a key column.
///
/// # Safety
/// Both must be non-null datums of a column with this `attlen` / `attbyval`, their memory valid.
pub unsafe fn datums_equal(a: pg_sys::Datum, b: pg_sys::Datum, attlen: i16, attbyval: bool) -> bool {
    // SAFETY: guaranteed by the caller; each branch reads the datum the way its storage requires.
    unsafe {
        if attbyval {
            a.value() == b.value()
        } else if attlen == -1 {
            varlena_bytes(a) == varlena_bytes(b)
        } else if attlen > 0 {
            let n = attlen as usize;
            std::slice::from_raw_parts(a.cast_mut_ptr::<u8>(), n)
                == std::slice::from_raw_parts(b.cast_mut_ptr::<u8>(), n)
        } else {
            // cstring (attlen -2)
            std::ffi::CStr::from_ptr(a.cast_mut_ptr()) == std::ffi::CStr::from_ptr(b.cast_mut_ptr())
        }
    }
}

/// The bytes of a varlena datum, detoasted (and decompressed) into the current memory context if
/// needed.
///
/// # Safety
/// `d` must be a non-null varlena datum; the returned slice lives as long as the current memory
/// context (or the tuple, when nothing had to be detoasted).
unsafe fn varlena_bytes<'a>(d: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: guaranteed by the caller; pg_detoast_datum_packed returns the datum itself or a palloc'd
    // copy, whose payload VARDATA_ANY / VARSIZE_ANY_EXHDR describe.
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(v);
        let data = pgrx::varlena::vardata_any(v) as *const u8;
        std::slice::from_raw_parts(data, len)
    }
}

/// Text in the database encoding as UTF-8. Errors name `what` (a column of a table), never the bytes.
fn to_utf8<'a>(bytes: &'a [u8], database_is_utf8: bool, relid: u32, what: &Rc<str>) -> Result<Cow<'a, str>> {
    if database_is_utf8 {
        return std::str::from_utf8(bytes).map(Cow::Borrowed).map_err(|e| {
            Error::new(ErrorKind::DataConversion, format!("invalid UTF-8 in {what} (at byte {})", e.valid_up_to()))
        });
    }
    // SAFETY: pg_server_to_any converts len bytes from the database encoding and returns either the
    // input pointer or a NUL-terminated palloc'd string in the current memory context. It raises an
    // error (quoting the bytes) for a character UTF-8 lacks: `converting` marks it as this column's.
    unsafe {
        let out = converting(relid, what, || {
            pg_sys::pg_server_to_any(bytes.as_ptr().cast(), bytes.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32)
        });
        let converted: &[u8] =
            if out as *const u8 == bytes.as_ptr() { bytes } else { std::ffi::CStr::from_ptr(out).to_bytes() };
        std::str::from_utf8(converted).map(|s| Cow::Owned(s.to_string())).map_err(|e| {
            Error::new(
                ErrorKind::DataConversion,
                format!("{what} is not valid UTF-8 after conversion (at byte {})", e.valid_up_to()),
            )
        })
    }
}

/// Scans table `rel` in `snapshot` as [`scan_heap`] does; a partitioned table is scanned partition
/// by partition (`tree`, read in the same snapshot), each partition's rows converted into the
/// partitioned table's columns. `on_batch` gets the rows scanned so far over all partitions. A
/// partition that is not a heap table (a foreign table) cannot be copied: an error that parks the
/// table. A partition dropped since `tree` was read is skipped.
///
/// # Safety
/// As [`scan_heap`]; `conv` is planned for `rel`.
pub unsafe fn scan_table(
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    tree: &crate::catalog::PartitionTree,
    conv: &mut TupleConverter,
    builder: &mut BatchBuilder,
    on_batch: &mut dyn FnMut(RecordBatch, i64) -> Result<bool>,
) -> Result<i64> {
    // SAFETY: the caller's guarantees; each partition is opened (locked) for its scan and closed
    // right after, keeping its lock to the end of the transaction as the partitioned table's.
    unsafe {
        if (*(*rel).rd_rel).relkind != pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char {
            return scan_heap(rel, snapshot, None, conv, builder, on_batch);
        }
        let mut total: i64 = 0;
        for (oid, relkind) in &tree.leaves {
            if relkind != "r" {
                let name = pg_sys::get_rel_name(*oid);
                let name = if name.is_null() {
                    oid.to_u32().to_string()
                } else {
                    std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
                };
                return Err(Error::new(
                    ErrorKind::FeatureNotSupported,
                    format!("partition \"{name}\" is not an ordinary table; its rows cannot be copied"),
                )
                .with_hint(
                    "Foreign-table partitions cannot be mirrored; detach the partition or mirror other tables.",
                ));
            }
            let part = pg_sys::try_relation_open(*oid, pg_sys::AccessShareLock as i32);
            if part.is_null() {
                continue;
            }
            let scanned = (|| -> Result<i64> {
                let mut part_conv =
                    TupleConverter::new(part)?.belonging_to(conv.specs(), &conv.rows_of()).ok_or_else(|| {
                        Error::new(ErrorKind::Internal, "a partition's columns differ from its partitioned table's")
                    })?;
                let base = total;
                scan_heap(part, snapshot, None, &mut part_conv, builder, &mut |batch, rows| {
                    on_batch(batch, base + rows)
                })
            })();
            pg_sys::relation_close(part, pg_sys::NoLock as i32);
            total += scanned?;
        }
        Ok(total)
    }
}

/// Scans heap relation `rel` in `snapshot`, converting every visible row into `builder`, and hands
/// each full batch (and the last, partial one) to `on_batch` with the rows scanned so far; it returns
/// false to stop early. Returns the number of rows scanned. `blocks`: only blocks `start .. start +
/// count` (those the relation has), in order, without joining a synchronized scan.
///
/// # Safety
/// `rel` must be an open heap relation and `snapshot` a registered or active snapshot; main thread,
/// inside a transaction.
pub unsafe fn scan_heap(
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    blocks: Option<(u32, u32)>,
    conv: &mut TupleConverter,
    builder: &mut BatchBuilder,
    on_batch: &mut dyn FnMut(RecordBatch, i64) -> Result<bool>,
) -> Result<i64> {
    // SAFETY (whole function): standard heap scan protocol. Each tuple returned by heap_getnext stays
    // valid (its buffer pinned) until the next call, which is after it has been converted; detoasted
    // copies and output strings live in `batch_cxt`, reset only after the batch holding them was
    // copied into Arrow buffers.
    unsafe {
        let natts = conv.natts();
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        let batch_cxt = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"azure_cdc scan batch".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        let mut flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN
            | pg_sys::ScanOptions::SO_ALLOW_STRAT
            | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        if blocks.is_none() {
            flags |= pg_sys::ScanOptions::SO_ALLOW_SYNC;
        }
        let sd = pg_sys::heap_beginscan(rel, snapshot, 0, std::ptr::null_mut(), std::ptr::null_mut(), flags);
        // A range is cut to the blocks the scan sees (a scan past them would wrap around to block 0);
        // the rows a snapshot sees lie in blocks the relation had when it was taken, which it still
        // has: only empty trailing pages are ever truncated.
        let mut empty = false;
        if let Some((start, count)) = blocks {
            let have = (*(sd as pg_sys::HeapScanDesc)).rs_nblocks;
            let count = count.min(have.saturating_sub(start));
            empty = count == 0;
            if !empty {
                pg_sys::heap_setscanlimits(sd, start, count);
            }
        }
        let desc = (*rel).rd_att;
        let mut rows: i64 = 0;
        let result = (|| -> Result<i64> {
            if !empty {
                loop {
                    let tuple = pg_sys::heap_getnext(sd, pg_sys::ScanDirection::ForwardScanDirection);
                    if tuple.is_null() {
                        break;
                    }
                    let old = pg_sys::MemoryContextSwitchTo(batch_cxt);
                    pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
                    let appended = conv.append_row(&values, &nulls, None, builder);
                    pg_sys::MemoryContextSwitchTo(old);
                    appended?;
                    rows += 1;
                    if builder.is_full() {
                        let go_on = on_batch(builder.finish()?, rows)?;
                        pg_sys::MemoryContextReset(batch_cxt);
                        pg_sys::check_for_interrupts!();
                        crate::worker::exit_if_postmaster_died();
                        if !go_on {
                            break;
                        }
                    }
                }
            }
            if builder.rows() > 0 {
                on_batch(builder.finish()?, rows)?;
            }
            Ok(rows)
        })();
        pg_sys::heap_endscan(sd);
        pg_sys::MemoryContextDelete(batch_cxt);
        if result.is_err() {
            builder.abandon();
        }
        result
    }
}
