// `#[pg_test]` tier: the SQL API, privileges and catalog rules, checked inside a server with
// azure_cdc preloaded (pgrx's test cluster). Each test runs in a transaction that is rolled back.
// Change capture cannot be observed here; the end-to-end tests in tests/e2e cover the workers.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// Runs `sql` in a subtransaction; returns the error it raised (SQLSTATE, message, hint), if any.
fn error_of(sql: &str) -> Option<(PgSqlErrorCode, String, Option<String>)> {
    // SAFETY: the standard internal-subtransaction pattern (as in PL/pgSQL's exception blocks): save
    // the memory context and resource owner, begin, and on error roll back and restore them.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let sql = sql.to_string();
        let result = PgTryBuilder::new(move || {
            Spi::run(&sql).expect("SPI failed without raising");
            None
        })
        .catch_others(|e| match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                Some((r.sql_error_code(), r.message().to_string(), r.hint().map(str::to_string)))
            }
        })
        .execute();
        if result.is_some() {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        } else {
            pg_sys::ReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

fn count(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).unwrap().unwrap()
}

fn nothing_created() {
    assert_eq!(count("SELECT count(*) FROM azure_cdc.mirrors"), 0);
    assert_eq!(count("SELECT count(*) FROM azure_cdc.mirror_tables"), 0);
    assert_eq!(count("SELECT count(*) FROM pg_catalog.pg_replication_slots"), 0);
    assert_eq!(crate::shmem::active_mirrors(), 0);
}

fn target(tag: &str) -> String {
    format!("file:///tmp/azure_cdc_pg_test_{}_{tag}", std::process::id())
}

#[pg_test]
fn admin_role_is_created_without_login() {
    assert_eq!(
        Spi::get_one::<bool>("SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = 'azure_cdc_admin'"),
        Ok(Some(false))
    );
}

#[pg_test]
fn catalog_tables_grant_nothing_to_public() {
    let public_grants = count(
        "SELECT count(*) FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a \
          WHERE c.relnamespace = 'azure_cdc'::regnamespace AND a.grantee = 0",
    );
    assert_eq!(public_grants, 0);
    let admin_grants = count(
        "SELECT count(*) FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a \
          WHERE c.relnamespace = 'azure_cdc'::regnamespace AND c.relkind = 'r' \
            AND a.grantee = 'azure_cdc_admin'::regrole AND a.privilege_type = 'SELECT'",
    );
    assert_eq!(admin_grants, 3, "mirrors, mirror_tables, events");
    // The catalog belongs to the extension: admins read it, never write it.
    let admin_writes = count(
        "SELECT count(*) FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a \
          WHERE c.relnamespace = 'azure_cdc'::regnamespace \
            AND a.grantee = 'azure_cdc_admin'::regrole AND a.privilege_type <> 'SELECT'",
    );
    assert_eq!(admin_writes, 0, "azure_cdc_admin may only read the catalog");
}

#[pg_test]
fn admins_cannot_write_the_catalog() {
    Spi::run("CREATE ROLE azure_cdc_writer").unwrap();
    Spi::run("GRANT azure_cdc_admin TO azure_cdc_writer").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_writer").unwrap();
    for call in [
        "INSERT INTO azure_cdc.mirrors (mirror_name, target, all_tables, slot_name, owner) \
         VALUES ('x', 'file:///tmp/x', true, 'azure_cdc_x', 10)",
        "UPDATE azure_cdc.mirrors SET target = 'file:///tmp/y'",
        "DELETE FROM azure_cdc.mirrors",
        "INSERT INTO azure_cdc.mirror_tables (mirror_id, relid, schema_name, table_name) VALUES (1, 1260, 'pg_catalog', 'pg_authid')",
        "UPDATE azure_cdc.mirror_tables SET key_columns = '{rolname}'",
        "DELETE FROM azure_cdc.mirror_tables",
        "INSERT INTO azure_cdc.events (mirror_name, event) VALUES ('x', 'Forged')",
        "DELETE FROM azure_cdc.events",
        "TRUNCATE azure_cdc.events",
        "SELECT * FROM azure_cdc.credentials",
    ] {
        let (code, message, _) = error_of(call).unwrap_or_else(|| panic!("{call} succeeded"));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "{call}: {message}");
    }
    // Reading is what admins are granted.
    assert_eq!(count("SELECT count(*) FROM azure_cdc.events"), 0);
    Spi::run("RESET ROLE").unwrap();
}

#[pg_test]
fn credentials_are_for_superusers_only() {
    let admin_on_credentials = count(
        "SELECT count(*) FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a \
          WHERE c.oid = 'azure_cdc.credentials'::regclass AND a.grantee <> c.relowner",
    );
    assert_eq!(admin_on_credentials, 0, "no role but the owner has any privilege on azure_cdc.credentials");
    Spi::run("SELECT azure_cdc.create_credential('c1', '{\"account_name\": \"acct\", \"account_key\": \"c2VjcmV0\"}')").unwrap();
    let shown = Spi::get_one::<String>("SELECT public_options::text FROM azure_cdc.list_credentials()").unwrap().unwrap();
    assert_eq!(shown, r#"{"account_name": "acct"}"#);
    let (code, _, hint) = error_of("SELECT azure_cdc.create_credential('c2', '{\"acount_key\": \"x\"}')").unwrap();
    assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
    assert!(hint.unwrap().contains("account_key"));
    Spi::run("CREATE ROLE azure_cdc_cred_user").unwrap();
    Spi::run("GRANT azure_cdc_admin TO azure_cdc_cred_user").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_cred_user").unwrap();
    for call in [
        "SELECT options::text FROM azure_cdc.credentials",
        "SELECT azure_cdc.create_credential('c3', '{}')",
        "SELECT azure_cdc.drop_credential('c1')",
    ] {
        let (code, _, _) = error_of(call).unwrap();
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "{call}");
    }
    // An admin lists credentials without their secrets.
    let names = Spi::get_one::<String>("SELECT option_names::text FROM azure_cdc.list_credentials()").unwrap().unwrap();
    assert_eq!(names, "{account_key,account_name}");
    Spi::run("RESET ROLE").unwrap();
    assert!(Spi::get_one::<String>("SELECT azure_cdc.drop_credential('c1')").unwrap().unwrap().contains("dropped"));
}

#[pg_test]
fn server_parameters_have_their_defaults_and_ranges() {
    for (name, value) in [
        ("azure_cdc.max_fabric_mirrors", "3"),
        ("azure_cdc.max_snapshot_workers", "3"),
        ("azure_cdc.snapshot_buffer_size", "1000MB"),
        ("azure_cdc.parquet_compression", "zstd"),
        ("azure_cdc.table_reset_timeout", "15min"),
        ("azure_cdc.max_parallel_uploads", "32"),
    ] {
        let shown = Spi::get_one::<String>(&format!("SHOW {name}")).unwrap().unwrap();
        assert_eq!(shown, value, "{name}");
    }
    let (code, _, _) = error_of("SET azure_cdc.max_fabric_mirrors = 4").unwrap();
    assert_eq!(code, PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM);
    let (code, _, _) = error_of("SET azure_cdc.snapshot_buffer_size = '20MB'").unwrap();
    assert_eq!(code, PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM);
    let settings = Spi::get_one::<String>(
        "SELECT string_agg(concat_ws(' ', name, context, min_val, max_val, unit, enumvals::text), '; ' ORDER BY name) \
           FROM pg_catalog.pg_settings WHERE name LIKE 'azure\\_cdc.%'",
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        settings,
        "azure_cdc.change_batch_buffer_size sighup 1 1024 MB; \
         azure_cdc.change_batch_export_timeout sighup 100 3600000 ms; \
         azure_cdc.max_fabric_mirrors postmaster 1 6; \
         azure_cdc.max_parallel_uploads sighup 1 64; \
         azure_cdc.max_snapshot_workers sighup 1 16; \
         azure_cdc.onelake_buffer_size sighup 5 4000 MB; \
         azure_cdc.parquet_compression sighup {zstd,snappy,gzip,uncompressed}; \
         azure_cdc.snapshot_buffer_size sighup 10 4000 MB; \
         azure_cdc.table_reset_timeout sighup 0 86400 s"
    );
}

#[pg_test]
fn prerequisites_report_every_check() {
    let rows = Spi::connect(|c| {
        c.select("SELECT code, status FROM azure_cdc.check_prerequisites()", None, &[])
            .unwrap()
            .map(|r| (r.get::<String>(1).unwrap().unwrap(), r.get::<String>(2).unwrap().unwrap()))
            .collect::<Vec<_>>()
    });
    let codes: Vec<&str> = rows.iter().map(|(c, _)| c.as_str()).collect();
    for code in [
        "WAL_LEVEL_NOT_LOGICAL",
        "NOT_IN_SHARED_PRELOAD_LIBRARIES",
        "MAX_WORKER_PROCESSES_TOO_LOW",
        "NO_FREE_REPLICATION_SLOTS",
        "WAL_SENDERS",
        "SERVER_IN_RECOVERY",
        "CDC_ADMIN_ROLE_NOT_EXISTS",
        "USER_NOT_CDC_ADMIN",
        "NO_CREATE_PRIVILEGE_ON_DATABASE",
        "OUTPUT_PLUGIN_NOT_ALLOWED",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
    assert!(rows.iter().all(|(_, s)| s == "OK"), "{rows:?}");
}

#[pg_test]
fn non_admins_are_refused_with_a_hint_naming_the_role() {
    Spi::run("CREATE ROLE azure_cdc_test_user").unwrap();
    Spi::run("CREATE TABLE public.t (id int PRIMARY KEY)").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_test_user").unwrap();
    for call in [
        format!("SELECT azure_cdc.start_mirror('m', '{}')", target("priv")),
        "SELECT azure_cdc.stop_mirror('m')".to_string(),
        "SELECT azure_cdc.drop_mirror('m')".to_string(),
        "SELECT * FROM azure_cdc.get_all_tables_mirror_status()".to_string(),
        "SELECT * FROM azure_cdc.get_mirror_status()".to_string(),
        "SELECT azure_cdc.pause_mirror('m')".to_string(),
        "SELECT azure_cdc.resume_mirror('m')".to_string(),
        "SELECT azure_cdc.resync_table('m', 't')".to_string(),
        "SELECT azure_cdc.add_tables('m', ARRAY['t'])".to_string(),
        "SELECT azure_cdc.remove_tables('m', ARRAY['t'])".to_string(),
        "SELECT * FROM azure_cdc.verify_mirror('m')".to_string(),
    ] {
        let (code, message, hint) = error_of(&call).expect(&call);
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "{call}: {message}");
        assert!(hint.unwrap_or_default().contains("azure_cdc_admin"), "{call}");
    }
    let status = Spi::get_one::<String>(
        "SELECT status FROM azure_cdc.check_prerequisites() WHERE code = 'USER_NOT_CDC_ADMIN'",
    );
    assert_eq!(status, Ok(Some("ERROR".to_string())));
    // output_plugin_libraries is a superuser-only setting: the check works for everyone without
    // showing its value.
    let detail = Spi::get_one::<pgrx::JsonB>(
        "SELECT detail FROM azure_cdc.check_prerequisites() WHERE code = 'OUTPUT_PLUGIN_NOT_ALLOWED'",
    )
    .unwrap()
    .unwrap();
    assert_eq!(detail.0["azure_cdc_allowed"], serde_json::json!(true), "{:?}", detail.0);
    assert!(detail.0.get("output_plugin_libraries").is_none());
    Spi::run("RESET ROLE").unwrap();
    nothing_created();
    // membership is enough
    Spi::run("GRANT azure_cdc_admin TO azure_cdc_test_user").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_test_user").unwrap();
    assert!(crate::privileges::caller_is_admin());
    Spi::run("RESET ROLE").unwrap();
}

#[pg_test]
fn bad_arguments_have_their_sqlstate_and_create_nothing() {
    Spi::run("CREATE TABLE public.t (id int PRIMARY KEY)").unwrap();
    Spi::run("CREATE VIEW public.v AS SELECT 1 AS x").unwrap();
    Spi::run("CREATE UNLOGGED TABLE public.u (id int)").unwrap();
    Spi::run("CREATE TEMPORARY TABLE tmp (id int)").unwrap();
    Spi::run("CREATE FOREIGN DATA WRAPPER azure_cdc_test_fdw").unwrap();
    Spi::run("CREATE SERVER azure_cdc_test_srv FOREIGN DATA WRAPPER azure_cdc_test_fdw").unwrap();
    Spi::run("CREATE FOREIGN TABLE public.f (id int) SERVER azure_cdc_test_srv").unwrap();
    let t = target("bad");
    use PgSqlErrorCode::*;
    for (call, code) in [
        ("SELECT azure_cdc.start_mirror('Bad', '{t}')".to_string(), ERRCODE_INVALID_NAME),
        (format!("SELECT azure_cdc.start_mirror('{}', '{{t}}')", "m".repeat(54)), ERRCODE_INVALID_NAME),
        ("SELECT azure_cdc.start_mirror('1m', '{t}')".to_string(), ERRCODE_INVALID_NAME),
        ("SELECT azure_cdc.start_mirror('m', 'ftp://y.example.com/p')".to_string(), ERRCODE_INVALID_PARAMETER_VALUE),
        ("SELECT azure_cdc.start_mirror('m', '/no/scheme')".to_string(), ERRCODE_INVALID_PARAMETER_VALUE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.nosuch'])".to_string(), ERRCODE_UNDEFINED_TABLE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.v'])".to_string(), ERRCODE_WRONG_OBJECT_TYPE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.u'])".to_string(), ERRCODE_WRONG_OBJECT_TYPE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['tmp'])".to_string(), ERRCODE_WRONG_OBJECT_TYPE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.f'])".to_string(), ERRCODE_WRONG_OBJECT_TYPE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['pg_catalog.pg_class'])".to_string(), ERRCODE_WRONG_OBJECT_TYPE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY[NULL::text])".to_string(), ERRCODE_INVALID_PARAMETER_VALUE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', '{}'::text[])".to_string(), ERRCODE_INVALID_PARAMETER_VALUE),
        ("SELECT azure_cdc.start_mirror('m', '{t}', NULL, '{\"a\":1}')".to_string(), ERRCODE_INVALID_PARAMETER_VALUE),
        ("SELECT azure_cdc.stop_mirror('nosuch')".to_string(), ERRCODE_UNDEFINED_OBJECT),
        ("SELECT azure_cdc.drop_mirror('nosuch')".to_string(), ERRCODE_UNDEFINED_OBJECT),
    ] {
        let call = call.replace("{t}", &t);
        let (got, message, _) = error_of(&call).unwrap_or_else(|| panic!("{call} succeeded"));
        assert_eq!(got, code, "{call}: {message}");
        nothing_created();
    }
    assert!(!std::path::Path::new(t.trim_start_matches("file://")).exists());
}

#[pg_test]
fn start_mirror_records_the_mirror_and_reserves_a_place_until_commit() {
    Spi::run("CREATE TABLE public.with_pk (id int PRIMARY KEY, v text)").unwrap();
    Spi::run("CREATE TABLE public.no_key (v text)").unwrap();
    Spi::run("CREATE TABLE public.composite (a int, b text, PRIMARY KEY (b, a))").unwrap();
    let t = target("ok");
    let msg = Spi::get_one::<String>(&format!("SELECT azure_cdc.start_mirror('m', '{t}')")).unwrap().unwrap();
    assert!(msg.contains("3 tables"), "{msg}");
    assert_eq!(count("SELECT count(*) FROM azure_cdc.mirrors WHERE state = 'Starting' AND slot_name = 'azure_cdc_m'"), 1);
    let keys = Spi::get_one::<String>(
        "SELECT string_agg(table_name || ':' || array_to_string(key_columns, ','), ' ' ORDER BY table_name) \
           FROM azure_cdc.mirror_tables",
    )
    .unwrap()
    .unwrap();
    assert_eq!(keys, "composite:b,a no_key: with_pk:id");
    // the reservation counts against max_fabric_mirrors until the transaction ends
    assert_eq!(crate::shmem::active_mirrors(), 1);
    let (code, _, _) = error_of(&format!("SELECT azure_cdc.start_mirror('m', '{t}2')")).unwrap();
    assert_eq!(code, PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT);
    let (code, _, _) = error_of(&format!("SELECT azure_cdc.start_mirror('other', '{t}/inner')")).unwrap();
    assert_eq!(code, PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT);
    let statuses = Spi::get_one::<String>(
        "SELECT string_agg(state || '/' || status, ' ' ORDER BY table_name) FROM azure_cdc.get_all_tables_mirror_status()",
    )
    .unwrap()
    .unwrap();
    assert_eq!(statuses, "Snapshotting/OK Snapshotting/WARNING Snapshotting/OK");
    let _ = std::fs::remove_dir(t.trim_start_matches("file://"));
}

#[pg_test]
fn numeric_decoding_matches_numeric_out() {
    let values = Spi::connect(|c| {
        c.select(
            "SELECT v::text, numeric_send(v) IS NOT NULL FROM unnest(ARRAY[\
               '0', '-0', '1', '-1', '0.0001', '12345.678', '-12345.6780', '1e20', '1e-20', 'NaN', 'Infinity', \
               '-Infinity', '99999999999999999999999999999999999999', '3.14159265358979323846264338327950288', \
               '100000000', '0.000000000000000000000000000000000001', '123456789012345678901234567890.5', \
               '1.00000000', '10000.0001']::numeric[]) AS v \
             UNION ALL SELECT (random() * 10 ^ (random() * 40 - 20))::numeric(60, 30)::text, true \
               FROM generate_series(1, 500)",
            None,
            &[],
        )
        .unwrap()
        .map(|r| r.get::<String>(1).unwrap().unwrap())
        .collect::<Vec<_>>()
    });
    for text in values {
        // the on-disk bytes of the value, as the snapshot worker sees them
        let datum = Spi::get_one_with_args::<pgrx::AnyNumeric>("SELECT $1::numeric", &[text.as_str().into()])
            .unwrap()
            .unwrap();
        let bytes: Vec<u8> = unsafe {
            // SAFETY: the datum of a numeric is a varlena; we copy its payload.
            let d = pgrx::IntoDatum::into_datum(datum).unwrap();
            let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
            std::slice::from_raw_parts(pgrx::varlena::vardata_any(v) as *const u8, pgrx::varlena::varsize_any_exhdr(v))
                .to_vec()
        };
        let decoded = azure_cdc_core::numeric::decode(&bytes).unwrap();
        assert_eq!(decoded.to_text(), text);
    }
}


/// An admin who is not a superuser: member of azure_cdc_admin, CREATE on the database, writing
/// server files, as the README tells an operator to set one up for a local folder.
fn operator_role(name: &str) {
    Spi::run(&format!("CREATE ROLE {name}")).unwrap();
    Spi::run(&format!("GRANT azure_cdc_admin, pg_write_server_files TO {name}")).unwrap();
    Spi::run(&format!("DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {name}', current_database()); END $$")).unwrap();
}

#[pg_test]
fn a_mirror_needs_ownership_and_a_folder_outside_the_server() {
    operator_role("azure_cdc_op");
    Spi::run("CREATE ROLE azure_cdc_other").unwrap();
    Spi::run("CREATE TABLE public.theirs (id int PRIMARY KEY)").unwrap();
    Spi::run("ALTER TABLE public.theirs OWNER TO azure_cdc_other").unwrap();
    Spi::run("CREATE TABLE public.mine (id int PRIMARY KEY)").unwrap();
    Spi::run("ALTER TABLE public.mine OWNER TO azure_cdc_op").unwrap();
    Spi::run("CREATE TABLE public.forced (id int PRIMARY KEY)").unwrap();
    Spi::run("ALTER TABLE public.forced OWNER TO azure_cdc_op").unwrap();
    Spi::run("ALTER TABLE public.forced ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY").unwrap();
    let data_dir = Spi::get_one::<String>("SELECT current_setting('data_directory')").unwrap().unwrap();
    let t = target("own");
    Spi::run("SET LOCAL ROLE azure_cdc_op").unwrap();
    use PgSqlErrorCode::*;
    for (call, code, says) in [
        (format!("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.theirs'])"), ERRCODE_INSUFFICIENT_PRIVILEGE, "does not own it"),
        (format!("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.forced'])"), ERRCODE_INSUFFICIENT_PRIVILEGE, "row-level security"),
        (format!("SELECT azure_cdc.start_mirror('m', 'file://{data_dir}/pg_replslot/x', ARRAY['public.mine'])"), ERRCODE_INSUFFICIENT_PRIVILEGE, "data directory"),
        (format!("SELECT azure_cdc.start_mirror('m', 'file://{data_dir}/pg_wal/x', ARRAY['public.mine'])"), ERRCODE_INSUFFICIENT_PRIVILEGE, "of the server"),
        (format!("SELECT azure_cdc.start_mirror('m', 'file://{data_dir}', ARRAY['public.mine'])"), ERRCODE_INSUFFICIENT_PRIVILEGE, "data directory"),
    ] {
        let (got, message, _) = error_of(&call).unwrap_or_else(|| panic!("{call} succeeded"));
        assert_eq!(got, code, "{call}: {message}");
        assert!(message.contains(says), "{call}: {message}");
        nothing_created();
    }
    assert!(!std::path::Path::new(&format!("{data_dir}/pg_replslot/x")).exists());
    // A mirror of all tables takes only the tables the caller may mirror.
    let msg = Spi::get_one::<String>(&format!("SELECT azure_cdc.start_mirror('m', '{t}')")).unwrap().unwrap();
    assert!(msg.contains("of 1 table "), "{msg}");
    assert_eq!(
        Spi::get_one::<String>("SELECT string_agg(table_name, ',') FROM azure_cdc.mirror_tables").unwrap().unwrap(),
        "mine"
    );
    assert_eq!(
        count("SELECT count(*) FROM azure_cdc.mirrors WHERE owner = 'azure_cdc_op'::regrole"),
        1,
        "the mirror records its owner"
    );
    Spi::run("RESET ROLE").unwrap();
    let _ = std::fs::remove_dir(t.trim_start_matches("file://"));
}

#[pg_test]
fn a_folder_needs_server_file_rights_but_no_replication() {
    Spi::run("CREATE ROLE azure_cdc_nofiles").unwrap();
    Spi::run("GRANT azure_cdc_admin TO azure_cdc_nofiles").unwrap();
    Spi::run("DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO azure_cdc_nofiles', current_database()); END $$").unwrap();
    operator_role("azure_cdc_norepl");
    Spi::run("CREATE TABLE public.t (id int PRIMARY KEY)").unwrap();
    let t = target("nofiles");
    Spi::run("ALTER TABLE public.t OWNER TO azure_cdc_nofiles").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_nofiles").unwrap();
    let (code, message, hint) = error_of(&format!("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.t'])")).unwrap();
    assert_eq!(code, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "{message}");
    assert!(hint.unwrap_or_default().contains("pg_write_server_files"), "{message}");
    Spi::run("RESET ROLE").unwrap();
    nothing_created();
    assert!(!std::path::Path::new(t.trim_start_matches("file://")).exists());
    // The REPLICATION attribute is not needed: the extension creates and drops only the mirror's slot.
    Spi::run("ALTER TABLE public.t OWNER TO azure_cdc_norepl").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_norepl").unwrap();
    assert_eq!(
        Spi::get_one::<bool>("SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"),
        Ok(Some(false))
    );
    Spi::run(&format!("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.t'])")).unwrap();
    Spi::run("RESET ROLE").unwrap();
    let _ = std::fs::remove_dir(t.trim_start_matches("file://"));
}

#[pg_test]
fn only_the_owner_controls_a_mirror() {
    operator_role("azure_cdc_alice");
    operator_role("azure_cdc_carol");
    Spi::run("CREATE TABLE public.a (id int PRIMARY KEY)").unwrap();
    Spi::run("ALTER TABLE public.a OWNER TO azure_cdc_alice").unwrap();
    let t = target("owner");
    Spi::run("SET LOCAL ROLE azure_cdc_alice").unwrap();
    Spi::run(&format!("SELECT azure_cdc.start_mirror('m', '{t}', ARRAY['public.a'])")).unwrap();
    Spi::run("RESET ROLE").unwrap();
    Spi::run("SET LOCAL ROLE azure_cdc_carol").unwrap();
    for call in [
        "SELECT azure_cdc.stop_mirror('m')",
        "SELECT azure_cdc.drop_mirror('m')",
        "SELECT azure_cdc.pause_mirror('m')",
        "SELECT azure_cdc.resume_mirror('m')",
        "SELECT azure_cdc.resync_table('m', 'public.a')",
        "SELECT azure_cdc.add_tables('m', ARRAY['public.a'])",
        "SELECT azure_cdc.remove_tables('m', ARRAY['public.a'])",
    ] {
        let (code, message, _) = error_of(call).unwrap_or_else(|| panic!("{call} succeeded"));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "{call}: {message}");
        assert!(message.contains("must be owner of mirror"), "{call}: {message}");
    }
    // Every admin sees every mirror's status.
    assert_eq!(count("SELECT count(*) FROM azure_cdc.list_mirrors() WHERE owner = 'azure_cdc_alice'"), 1);
    Spi::run("RESET ROLE").unwrap();
    let _ = std::fs::remove_dir(t.trim_start_matches("file://"));
}
