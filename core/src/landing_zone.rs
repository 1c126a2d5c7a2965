//! The documents of the landing zone besides data files: a table's `_metadata.json` and the mirror's
//! `_partnerEvents.json`. Pure.

use serde_json::json;

pub const METADATA_FILE: &str = "_metadata.json";
pub const PARTNER_EVENTS_FILE: &str = "_partnerEvents.json";
/// Name of the row-marker column of change files (0 insert, 1 update, 2 delete, 4 upsert).
pub const ROW_MARKER_COLUMN: &str = "__rowMarker__";

/// `_metadata.json` of a table. Without key columns the document has none, and the table can only
/// receive inserts.
pub fn table_metadata(key_columns: &[String]) -> String {
    if key_columns.is_empty() {
        json!({}).to_string()
    } else {
        json!({ "keyColumns": key_columns }).to_string()
    }
}

/// `_partnerEvents.json` at the root of the landing zone: who produces it and from what.
pub fn partner_events(server_version: &str, database: &str, mirror: &str) -> String {
    serde_json::to_string_pretty(&json!({
        "partnerName": "azure_cdc",
        "sourceInfo": {
            "sourceType": "PostgreSQL",
            "sourceVersion": server_version,
            "additionalInformation": {
                "database": database,
                "mirror": mirror,
                "producer": format!("azure_cdc {}", env!("CARGO_PKG_VERSION")),
            }
        }
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_documents() {
        let m: serde_json::Value = serde_json::from_str(&table_metadata(&["id".into(), "Na\"me".into()])).unwrap();
        assert_eq!(m, json!({"keyColumns": ["id", "Na\"me"]}));
        assert_eq!(table_metadata(&[]), "{}");
        let p: serde_json::Value = serde_json::from_str(&partner_events("15.18", "sales", "m1")).unwrap();
        assert_eq!(p["partnerName"], "azure_cdc");
        assert_eq!(p["sourceInfo"]["sourceType"], "PostgreSQL");
        assert_eq!(p["sourceInfo"]["additionalInformation"]["mirror"], "m1");
    }
}
