//! The columns a table's files carry, and how a change of the source's columns, seen in the change
//! stream, reaches them. Pure: the decoder describes the columns of a decoded tuple's relation and of
//! the table's files; this decides whether the files can simply follow or the table must be reseeded.
//!
//! The landing zone's rules: a new column appears in the files that follow (older files lack it: a
//! reader takes it as NULL there); a dropped column is absent from the files that follow (NULL in
//! their rows, by the same rule). Anything else (a rename, a type change, a column whose existing
//! rows got values without WAL) cannot be expressed by later files: the table is copied again.
//!
//! A column is known by its attribute number, which PostgreSQL never reuses within a table: a rename
//! keeps it, DROP then ADD of the same name gets a new one, and a new column always gets a number
//! above every earlier one.

use serde_json::json;

use crate::error::{Error, ErrorKind, Result};

/// One column as the files carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// PostgreSQL attribute number (1-based).
    pub attnum: i32,
    pub name: String,
    /// How its values land (the column kind, in a stable text form).
    pub kind: String,
}

/// A column that appeared in the source, as the decoder sees its attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NewColumnFacts {
    /// Existing rows read a value stored in the catalog (ADD COLUMN … DEFAULT constant).
    pub has_missing_value: bool,
    /// It has a default (a volatile one rewrote the table with values), is an identity or a
    /// generated column, or its type is a domain (whose default fills existing rows).
    pub filled_existing_rows: bool,
}

/// What a change of columns means for the table's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evolution {
    /// The same columns.
    Same,
    /// Later files carry `now`: columns were dropped (none of them a key column) and/or added (each
    /// NULL in every existing row).
    Follow { dropped: Vec<String>, added: Vec<String> },
    /// The files cannot express it: reseed the table (why).
    Reseed(String),
}

/// Compares the columns of the files (`shipped`) with the source's columns at this point of the
/// stream (`now`, attribute order). `facts` tells about a column of `now` the files lack.
pub fn evolve(
    shipped: &[Column],
    now: &[Column],
    keys: &[String],
    facts: impl Fn(&Column) -> NewColumnFacts,
) -> Evolution {
    if shipped == now {
        return Evolution::Same;
    }
    let last_shipped = shipped.iter().map(|c| c.attnum).max().unwrap_or(0);
    let mut added = Vec::new();
    for c in now {
        match shipped.iter().find(|s| s.attnum == c.attnum) {
            Some(s) if s.name != c.name => {
                return Evolution::Reseed(format!("column \"{}\" was renamed to \"{}\"", s.name, c.name))
            }
            Some(s) if s.kind != c.kind => return Evolution::Reseed(format!("column \"{}\" changed type", c.name)),
            Some(_) => {}
            None if c.attnum <= last_shipped => {
                // A column the files never had, numbered among theirs: not a plain ADD COLUMN.
                return Evolution::Reseed(format!("column \"{}\" is not in the files", c.name));
            }
            None => {
                if shipped.iter().any(|s| s.name == c.name) {
                    return Evolution::Reseed(format!("column \"{}\" was dropped and added again", c.name));
                }
                let f = facts(c);
                if f.has_missing_value || f.filled_existing_rows {
                    return Evolution::Reseed(format!("new column \"{}\" has values in existing rows", c.name));
                }
                added.push(c.name.clone());
            }
        }
    }
    let mut dropped = Vec::new();
    for s in shipped {
        if !now.iter().any(|c| c.attnum == s.attnum) {
            if keys.contains(&s.name) {
                return Evolution::Reseed(format!("key column \"{}\" was dropped", s.name));
            }
            dropped.push(s.name.clone());
        }
    }
    Evolution::Follow { dropped, added }
}

/// The text form kept in the catalog (`mirror_tables.columns`).
pub fn to_text(columns: &[Column]) -> String {
    json!(columns.iter().map(|c| json!([c.attnum, c.name, c.kind])).collect::<Vec<_>>()).to_string()
}

/// Parses [`to_text`].
pub fn from_text(text: &str) -> Result<Vec<Column>> {
    let bad = || Error::new(ErrorKind::Internal, "azure_cdc.mirror_tables.columns is not a column list");
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|c| {
            let a = c.as_array().filter(|a| a.len() == 3).ok_or_else(bad)?;
            Ok(Column {
                attnum: a[0].as_i64().ok_or_else(bad)? as i32,
                name: a[1].as_str().ok_or_else(bad)?.to_string(),
                kind: a[2].as_str().ok_or_else(bad)?.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(attnum: i32, name: &str, kind: &str) -> Column {
        Column { attnum, name: name.into(), kind: kind.into() }
    }

    fn files() -> Vec<Column> {
        vec![col(1, "id", "Int32"), col(2, "v", "Text"), col(3, "n", "Int32")]
    }

    fn keys() -> Vec<String> {
        vec!["id".into()]
    }

    fn plain(_: &Column) -> NewColumnFacts {
        NewColumnFacts::default()
    }

    #[test]
    fn same_columns() {
        assert_eq!(evolve(&files(), &files(), &keys(), plain), Evolution::Same);
    }

    #[test]
    fn a_nullable_column_added_is_followed() {
        let mut now = files();
        now.push(col(4, "extra", "Text"));
        assert_eq!(
            evolve(&files(), &now, &keys(), plain),
            Evolution::Follow { dropped: vec![], added: vec!["extra".into()] }
        );
    }

    #[test]
    fn a_column_with_values_in_existing_rows_reseeds() {
        let mut now = files();
        now.push(col(4, "extra", "Int32"));
        let with_default = |_: &Column| NewColumnFacts { has_missing_value: true, ..Default::default() };
        assert!(matches!(evolve(&files(), &now, &keys(), with_default), Evolution::Reseed(_)));
        let rewritten = |_: &Column| NewColumnFacts { filled_existing_rows: true, ..Default::default() };
        assert!(matches!(evolve(&files(), &now, &keys(), rewritten), Evolution::Reseed(_)));
    }

    #[test]
    fn a_dropped_column_is_followed_unless_it_is_a_key() {
        let now = vec![col(1, "id", "Int32"), col(3, "n", "Int32")];
        assert_eq!(
            evolve(&files(), &now, &keys(), plain),
            Evolution::Follow { dropped: vec!["v".into()], added: vec![] }
        );
        let now = vec![col(2, "v", "Text"), col(3, "n", "Int32")];
        assert!(matches!(evolve(&files(), &now, &keys(), plain), Evolution::Reseed(_)));
    }

    #[test]
    fn rename_and_type_change_reseed_even_of_the_last_column() {
        let renamed = vec![col(1, "id", "Int32"), col(2, "v", "Text"), col(3, "m", "Int32")];
        assert!(matches!(evolve(&files(), &renamed, &keys(), plain), Evolution::Reseed(_)));
        let retyped = vec![col(1, "id", "Int32"), col(2, "v", "Text"), col(3, "n", "Int64")];
        assert!(matches!(evolve(&files(), &retyped, &keys(), plain), Evolution::Reseed(_)));
    }

    #[test]
    fn drop_and_add_of_the_same_name_reseeds() {
        let now = vec![col(1, "id", "Int32"), col(3, "n", "Int32"), col(4, "v", "Text")];
        assert!(matches!(evolve(&files(), &now, &keys(), plain), Evolution::Reseed(_)));
    }

    #[test]
    fn an_older_descriptor_than_the_files_reseeds() {
        // Decoding from before a column the files already have (their numbers say so): fewer
        // columns is a drop, which is followed; a column below the files' numbers they lack is not.
        let now = vec![col(1, "id", "Int32"), col(2, "old", "Text")];
        let shipped = vec![col(1, "id", "Int32"), col(3, "n", "Int32")];
        assert!(matches!(evolve(&shipped, &now, &keys(), plain), Evolution::Reseed(_)));
    }

    #[test]
    fn text_round_trip() {
        let c = vec![col(1, "i\"d", "Decimal { precision: 10, scale: 2 }"), col(7, "", "Text")];
        assert_eq!(from_text(&to_text(&c)).unwrap(), c);
        assert!(from_text("{}").is_err());
        assert!(from_text("[[1, 2]]").is_err());
    }
}
