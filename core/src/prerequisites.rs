//! The server prerequisites of mirroring, evaluated from a plain snapshot of the server's settings so
//! that the rules are unit tested. The extension gathers [`ServerFacts`]; `check_prerequisites()` and
//! `start_mirror` both use [`evaluate`]. Codes follow Fabric's azure_cdc where it has one. Pure.

use serde_json::{json, Value};

use crate::lifecycle::Health;

/// Background workers budgeted per mirror, as Fabric's sizing rule has it: the snapshot worker and its
/// helpers while the snapshot runs, then the decoder (whose shipper is a thread of it).
pub const WORKERS_PER_MIRROR: i64 = 3;
/// The launcher.
pub const STATIC_WORKERS: i64 = 1;

#[derive(Debug, Clone, Default)]
pub struct ServerFacts {
    pub wal_level: String,
    pub preloaded: bool,
    pub max_worker_processes: i64,
    /// Workers PostgreSQL itself may need from the same pool (logical replication launcher).
    pub other_static_workers: i64,
    /// Active mirrors on the whole server.
    pub active_mirrors: i64,
    pub max_fabric_mirrors: i64,
    pub max_replication_slots: i64,
    pub used_replication_slots: i64,
    pub max_wal_senders: i64,
    pub used_wal_senders: i64,
    pub in_recovery: bool,
    pub admin_role_exists: bool,
    pub caller_is_admin: bool,
    pub caller_has_create_on_database: bool,
    /// `output_plugin_libraries`, on servers that have that allow-list of output plugins (None otherwise).
    pub output_plugin_libraries: Option<String>,
}

/// Whether an `output_plugin_libraries` value admits this library as an output plugin.
pub fn output_plugin_allowed(list: Option<&str>) -> bool {
    match list {
        None => true,
        Some(l) => l.split(',').map(|x| x.trim().trim_matches('"')).any(|x| x == "azure_cdc" || x == "*"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub code: &'static str,
    pub status: Health,
    pub detail: Value,
}

impl Check {
    pub fn is_error(&self) -> bool {
        self.status == Health::Error
    }
}

fn check(code: &'static str, ok: bool, detail: Value) -> Check {
    Check { code, status: if ok { Health::Ok } else { Health::Error }, detail }
}

/// Evaluates every prerequisite for starting one more mirror.
pub fn evaluate(f: &ServerFacts) -> Vec<Check> {
    let required_workers = STATIC_WORKERS + f.other_static_workers + WORKERS_PER_MIRROR * (f.active_mirrors + 1);
    let free_slots = f.max_replication_slots - f.used_replication_slots;
    vec![
        check(
            "WAL_LEVEL_NOT_LOGICAL",
            f.wal_level == "logical",
            json!({"wal_level": f.wal_level, "required": "logical",
                   "hint": "Set wal_level = logical and restart the server."}),
        ),
        check(
            "NOT_IN_SHARED_PRELOAD_LIBRARIES",
            f.preloaded,
            json!({"hint": "Add azure_cdc to shared_preload_libraries and restart the server."}),
        ),
        check(
            "MAX_WORKER_PROCESSES_TOO_LOW",
            f.max_worker_processes >= required_workers,
            json!({"max_worker_processes": f.max_worker_processes, "required": required_workers,
                   "active_mirrors": f.active_mirrors,
                   "hint": format!("Each mirror needs {WORKERS_PER_MIRROR} background workers, plus 1 for the launcher; raise max_worker_processes and restart the server.")}),
        ),
        check(
            "MAX_FABRIC_MIRRORS_REACHED",
            f.active_mirrors < f.max_fabric_mirrors,
            json!({"active_mirrors": f.active_mirrors, "max_fabric_mirrors": f.max_fabric_mirrors,
                   "hint": "Stop a mirror or raise azure_cdc.max_fabric_mirrors and restart the server."}),
        ),
        check(
            "NO_FREE_REPLICATION_SLOTS",
            free_slots >= 1,
            json!({"max_replication_slots": f.max_replication_slots, "used": f.used_replication_slots,
                   "required_free": 1,
                   "hint": "Each mirror uses one logical replication slot; raise max_replication_slots and restart the server."}),
        ),
        Check {
            code: "WAL_SENDERS",
            status: Health::Ok,
            detail: json!({"max_wal_senders": f.max_wal_senders, "used": f.used_wal_senders, "required": 0,
                           "note": "azure_cdc decodes the change stream inside the server and uses no WAL sender."}),
        },
        check(
            "SERVER_IN_RECOVERY",
            !f.in_recovery,
            json!({"in_recovery": f.in_recovery, "hint": "Mirroring runs on the primary server, not on a standby."}),
        ),
        check(
            "CDC_ADMIN_ROLE_NOT_EXISTS",
            f.admin_role_exists,
            json!({"role": "azure_cdc_admin", "hint": "CREATE ROLE azure_cdc_admin NOLOGIN; (CREATE EXTENSION azure_cdc creates it)."}),
        ),
        check(
            "USER_NOT_CDC_ADMIN",
            f.caller_is_admin,
            json!({"role": "azure_cdc_admin", "hint": "A superuser can run: GRANT azure_cdc_admin TO <user>;"}),
        ),
        check(
            "OUTPUT_PLUGIN_NOT_ALLOWED",
            output_plugin_allowed(f.output_plugin_libraries.as_deref()),
            json!({"parameter_exists": f.output_plugin_libraries.is_some(),
                   "azure_cdc_allowed": output_plugin_allowed(f.output_plugin_libraries.as_deref()),
                   "hint": "The mirror's decoder reads its slot with azure_cdc as the output plugin: add azure_cdc to output_plugin_libraries (for example 'pgoutput, test_decoding, azure_cdc') and reload the configuration."}),
        ),
        check(
            "NO_CREATE_PRIVILEGE_ON_DATABASE",
            f.caller_has_create_on_database,
            json!({"hint": "A superuser or the database owner can run: GRANT CREATE ON DATABASE <db> TO <user>;"}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ServerFacts {
        ServerFacts {
            wal_level: "logical".into(),
            preloaded: true,
            max_worker_processes: 8,
            other_static_workers: 1,
            active_mirrors: 0,
            max_fabric_mirrors: 3,
            max_replication_slots: 10,
            used_replication_slots: 0,
            max_wal_senders: 10,
            used_wal_senders: 0,
            in_recovery: false,
            admin_role_exists: true,
            caller_is_admin: true,
            caller_has_create_on_database: true,
            output_plugin_libraries: None,
        }
    }

    fn failing(f: &ServerFacts) -> Vec<&'static str> {
        evaluate(f).into_iter().filter(|c| c.is_error()).map(|c| c.code).collect()
    }

    #[test]
    fn all_ok() {
        assert!(failing(&good()).is_empty());
        assert_eq!(evaluate(&good()).len(), 11);
    }

    #[test]
    fn each_problem_has_its_code() {
        let mut f = good();
        f.wal_level = "replica".into();
        assert_eq!(failing(&f), vec!["WAL_LEVEL_NOT_LOGICAL"]);
        let mut f = good();
        f.max_worker_processes = 4; // 1 + 1 + 3 = 5 needed
        assert_eq!(failing(&f), vec!["MAX_WORKER_PROCESSES_TOO_LOW"]);
        f.max_worker_processes = 5;
        assert!(failing(&f).is_empty());
        f.active_mirrors = 1; // now 8 needed
        assert_eq!(failing(&f), vec!["MAX_WORKER_PROCESSES_TOO_LOW"]);
        let mut f = good();
        f.active_mirrors = 3;
        f.max_worker_processes = 100;
        assert_eq!(failing(&f), vec!["MAX_FABRIC_MIRRORS_REACHED"]);
        let mut f = good();
        f.used_replication_slots = 10;
        assert_eq!(failing(&f), vec!["NO_FREE_REPLICATION_SLOTS"]);
        let mut f = good();
        f.in_recovery = true;
        f.caller_is_admin = false;
        f.admin_role_exists = false;
        f.caller_has_create_on_database = false;
        assert_eq!(
            failing(&f),
            vec![
                "SERVER_IN_RECOVERY",
                "CDC_ADMIN_ROLE_NOT_EXISTS",
                "USER_NOT_CDC_ADMIN",
                "NO_CREATE_PRIVILEGE_ON_DATABASE"
            ]
        );
    }

    #[test]
    fn the_output_plugin_must_be_allowed_where_the_server_has_an_allow_list() {
        assert!(output_plugin_allowed(None));
        assert!(output_plugin_allowed(Some("pgoutput, test_decoding, azure_cdc")));
        assert!(output_plugin_allowed(Some("azure_cdc")));
        assert!(output_plugin_allowed(Some("pgoutput,\"azure_cdc\"")));
        assert!(!output_plugin_allowed(Some("pgoutput, test_decoding")));
        assert!(!output_plugin_allowed(Some("azure_cdc_x, xazure_cdc")));
        assert!(!output_plugin_allowed(Some("")));
        let mut f = good();
        f.output_plugin_libraries = Some("pgoutput, test_decoding".into());
        assert_eq!(failing(&f), vec!["OUTPUT_PLUGIN_NOT_ALLOWED"]);
    }

    #[test]
    fn detail_says_what_is_required() {
        let mut f = good();
        f.active_mirrors = 2;
        let c = evaluate(&f).into_iter().find(|c| c.code == "MAX_WORKER_PROCESSES_TOO_LOW").unwrap();
        assert_eq!(c.detail["required"], 1 + 1 + 3 * 3);
    }
}
