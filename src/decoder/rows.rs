//! Row images: a decoded change's tuples deformed and appended to the table's builder as insert,
//! update or delete rows; unchanged TOASTed values taken from the old row image.

use super::*;

/// A deformed tuple image.
pub(super) struct Image {
    pub(super) values: Vec<pg_sys::Datum>,
    pub(super) nulls: Vec<bool>,
}

/// # Safety
/// `buf` is a tuple of the change being replayed, `desc` its relation's descriptor.
pub(super) unsafe fn deform(buf: crate::versions::ChangeTuple, desc: pg_sys::TupleDesc) -> Option<Image> {
    if buf.is_null() {
        return None;
    }
    // SAFETY: as required above; heap_deform_tuple fills natts entries.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut img = Image { values: vec![pg_sys::Datum::from(0usize); natts], nulls: vec![true; natts] };
        let tuple = crate::versions::change_heap_tuple(buf);
        pg_sys::heap_deform_tuple(tuple, desc, img.values.as_mut_ptr(), img.nulls.as_mut_ptr());
        Some(img)
    }
}

/// Appends the rows of one change to the table's builder. Returns the bytes added.
///
/// # Safety
/// Inside the change callback, with change_cxt current.
pub(super) unsafe fn append_change(
    t: &mut Table,
    rel: pg_sys::Relation,
    relid: u32,
    change: *mut pg_sys::ReorderBufferChange,
    pos: Position,
) -> Result<usize> {
    use pg_sys::ReorderBufferChangeType as C;
    let Some(plan) = t.plans.get_mut(&relid) else {
        return Err(Error::new(ErrorKind::Internal, "no conversion plan"));
    };
    // SAFETY: the caller guarantees a live change and relation.
    unsafe {
        let desc = (*rel).rd_att;
        let tp = (*change).data.tp;
        let action = (*change).action;
        let no_keys = || {
            Error::new(
                ErrorKind::FeatureNotSupported,
                "updates and deletes of a table without key columns cannot be mirrored",
            )
            .with_hint(
                "Give the table a primary key (or REPLICA IDENTITY USING INDEX), then stop and start the mirror.",
            )
        };
        let mut rows: Vec<(Image, RowMarker)> = Vec::with_capacity(2);
        match action {
            C::REORDER_BUFFER_CHANGE_INSERT => {
                let Some(new) = deform(tp.newtuple, desc) else { return Ok(0) };
                rows.push((new, RowMarker::Insert));
            }
            C::REORDER_BUFFER_CHANGE_UPDATE => {
                if t.keys.is_empty() {
                    return Err(no_keys());
                }
                let Some(mut new) = deform(tp.newtuple, desc) else { return Ok(0) };
                let old = deform(tp.oldtuple, desc);
                fill_unchanged_toast(&mut new, old.as_ref(), desc)?;
                let key_changed = match &old {
                    None => false,
                    Some(o) => plan.key_atts.iter().any(|&(i, len, byval)| {
                        o.nulls[i] != new.nulls[i]
                            || (!o.nulls[i] && !datums_equal(o.values[i], new.values[i], len, byval))
                    }),
                };
                if key_changed {
                    let Some(o) = old else { return Ok(0) };
                    rows.push((o, RowMarker::Delete));
                    rows.push((new, RowMarker::Insert));
                } else {
                    rows.push((new, RowMarker::Update));
                }
            }
            C::REORDER_BUFFER_CHANGE_DELETE => {
                if t.keys.is_empty() {
                    return Err(no_keys());
                }
                let Some(old) = deform(tp.oldtuple, desc) else {
                    return Err(Error::new(ErrorKind::FeatureNotSupported, "a deleted row came without its key")
                        .with_hint(
                            "Set REPLICA IDENTITY DEFAULT or FULL on the table, then stop and start the mirror.",
                        ));
                };
                rows.push((old, RowMarker::Delete));
            }
            _ => return Ok(0),
        }
        let attrs = crate::versions::attributes(desc);
        let before = t.builder.bytes();
        for (img, marker) in &rows {
            // No value may be a TOAST pointer the stream does not resolve: fill_unchanged_toast took
            // care of an UPDATE's new image; this also guards old images (key change, DELETE).
            for (i, null) in img.nulls.iter().enumerate() {
                if !*null && attrs[i].attlen == -1 && is_unchanged_toast(img.values[i]) {
                    return Err(missing_toast(desc, i));
                }
            }
            plan.conv.append_row(&img.values, &img.nulls, Some(*marker as i32), &mut t.builder)?;
            t.rows_in_batch += 1;
        }
        let added = t.builder.bytes().saturating_sub(before);
        if t.builder.is_full() {
            t.done.push(t.builder.finish()?);
        }
        t.last_in_batch = Some(pos);
        Ok(added.max(1))
    }
}

/// Replaces unchanged TOASTed values of an UPDATE's new image with the old image's values.
///
/// # Safety
/// Images of the change being replayed, `desc` their descriptor.
pub(super) unsafe fn fill_unchanged_toast(new: &mut Image, old: Option<&Image>, desc: pg_sys::TupleDesc) -> Result<()> {
    // SAFETY: as required above.
    unsafe {
        let attrs = crate::versions::attributes(desc);
        for (i, a) in attrs.iter().enumerate() {
            if a.attisdropped || a.attlen != -1 || new.nulls[i] || !is_unchanged_toast(new.values[i]) {
                continue;
            }
            match old {
                Some(o) if !o.nulls[i] && !is_unchanged_toast(o.values[i]) => new.values[i] = o.values[i],
                _ => return Err(missing_toast(desc, i)),
            }
        }
    }
    Ok(())
}

/// # Safety
/// `desc` a live descriptor with more than `i` attributes.
pub(super) unsafe fn missing_toast(desc: pg_sys::TupleDesc, i: usize) -> Error {
    // SAFETY: as required above.
    let name = unsafe {
        let a = &crate::versions::attributes(desc)[i];
        std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_string_lossy().into_owned()
    };
    Error::new(
        ErrorKind::FeatureNotSupported,
        format!("the change stream lacks the unchanged TOASTed value of column \"{name}\""),
    )
    .with_detail(
        "The table's REPLICA IDENTITY is not FULL, so an UPDATE that leaves the value unchanged does not carry it.",
    )
    .with_hint("ALTER TABLE … REPLICA IDENTITY FULL, then stop and start the mirror.")
}
