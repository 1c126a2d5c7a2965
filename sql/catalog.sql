-- Catalog of azure_cdc: what is mirrored, where, and how far. It belongs to the extension: only the
-- extension's own code writes it (src/catalog.rs, with the extension's rights and a pinned
-- search_path). azure_cdc_admin may read mirrors, mirror_tables and events, and nothing more;
-- nothing here is granted to PUBLIC.

-- The schema that holds the catalog must be the installing superuser's. A schema named azure_cdc
-- that someone else created beforehand would be reused by CREATE EXTENSION, and its owner could
-- replace the catalog tables that the extension reads and writes with raised rights.
DO $$
DECLARE
    owner_name name;
    owner_super boolean;
BEGIN
    SELECT r.rolname, r.rolsuper INTO owner_name, owner_super
      FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
     WHERE n.nspname = 'azure_cdc';
    IF NOT owner_super THEN
        RAISE EXCEPTION 'schema azure_cdc belongs to role %, not to a superuser', owner_name
            USING ERRCODE = '42501',
                  HINT = 'Its owner could replace the extension''s catalog. Drop or rename that schema, then run CREATE EXTENSION azure_cdc again.';
    END IF;
    -- Nobody but superusers may create objects in it, and nothing may be there yet (an object
    -- someone placed beforehand could stand in for one of the extension's).
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
                WHERE n.nspname = 'azure_cdc' AND a.privilege_type = 'CREATE'
                  AND (a.grantee = 0 OR NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = a.grantee))) THEN
        RAISE EXCEPTION 'roles that are not superusers may create objects in schema azure_cdc'
            USING ERRCODE = '42501',
                  HINT = 'REVOKE CREATE ON SCHEMA azure_cdc FROM those roles (and PUBLIC), drop what they created there, then run CREATE EXTENSION azure_cdc again.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE relnamespace = 'azure_cdc'::pg_catalog.regnamespace)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE pronamespace = 'azure_cdc'::pg_catalog.regnamespace)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_type WHERE typnamespace = 'azure_cdc'::pg_catalog.regnamespace)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_operator WHERE oprnamespace = 'azure_cdc'::pg_catalog.regnamespace) THEN
        RAISE EXCEPTION 'schema azure_cdc is not empty'
            USING ERRCODE = '42P06',
                  HINT = 'The extension creates its catalog and functions in an empty schema azure_cdc; drop or move what is there.';
    END IF;
END
$$;

-- The role whose members control mirrors. One that exists already is used as it is, unless it
-- carries more than membership means: attributes or roles its members could take on (with SET
-- ROLE, or inherited), or a role that is not a superuser and may grant it to others.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'azure_cdc_admin') THEN
        CREATE ROLE azure_cdc_admin NOLOGIN;
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_roles
                   WHERE rolname = 'azure_cdc_admin'
                     AND (rolsuper OR rolreplication OR rolbypassrls OR rolcreaterole OR rolcreatedb OR rolcanlogin)) THEN
        RAISE EXCEPTION 'role azure_cdc_admin exists with attributes its members could take on'
            USING ERRCODE = '42501',
                  HINT = 'It must be NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS; change it (ALTER ROLE) or drop it, then run CREATE EXTENSION azure_cdc again.';
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                   WHERE m.member = 'azure_cdc_admin'::pg_catalog.regrole) THEN
        RAISE EXCEPTION 'role azure_cdc_admin is a member of other roles, which its members would inherit'
            USING ERRCODE = '42501',
                  HINT = 'Revoke those roles from azure_cdc_admin, then run CREATE EXTENSION azure_cdc again.';
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles r ON r.oid = m.member
                   WHERE m.roleid = 'azure_cdc_admin'::pg_catalog.regrole AND m.admin_option AND NOT r.rolsuper) THEN
        RAISE EXCEPTION 'a role that is not a superuser may grant azure_cdc_admin to others'
            USING ERRCODE = '42501',
                  HINT = 'Revoke the ADMIN OPTION on azure_cdc_admin from that role, then run CREATE EXTENSION azure_cdc again.';
    END IF;
END
$$;

-- Everyone may look up the functions (and get a clear error from those reserved to admins).
GRANT USAGE ON SCHEMA azure_cdc TO PUBLIC;

CREATE TABLE azure_cdc.mirrors (
    mirror_id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mirror_name            text NOT NULL UNIQUE,
    target                 text NOT NULL,
    all_tables             boolean NOT NULL,
    options                jsonb NOT NULL DEFAULT '{}',
    credential             text,
    state                  text NOT NULL DEFAULT 'Starting'
                           CHECK (state IN ('Starting', 'Running', 'Failed', 'Paused', 'Stopped')),
    slot_name              name NOT NULL,
    consistent_lsn         pg_lsn,
    -- The role that started the mirror: only it (or a member of it) and superusers control the
    -- mirror, and its rights bound what the mirror's workers do (README "Security model").
    owner                  oid NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
    snapshot_completed_at  timestamptz,
    stopped_at             timestamptz,
    last_error             text,
    last_error_code        text
);

CREATE TABLE azure_cdc.mirror_tables (
    mirror_id          bigint NOT NULL REFERENCES azure_cdc.mirrors ON DELETE CASCADE,
    relid              oid NOT NULL,
    schema_name        name NOT NULL,
    table_name         name NOT NULL,
    state              text NOT NULL DEFAULT 'Snapshotting'
                       CHECK (state IN ('Snapshotting', 'Replicating', 'Reseeding', 'Stopped', 'Failed', 'Dropped')),
    key_columns        text[] NOT NULL DEFAULT '{}',
    rows_replicated    bigint NOT NULL DEFAULT 0,
    files_published    bigint NOT NULL DEFAULT 0,
    bytes_published    bigint NOT NULL DEFAULT 0,
    next_file_number   bigint NOT NULL DEFAULT 1,
    last_completed_at  timestamptz,
    last_error         text,
    -- After a reseed: the snapshot its copy was taken in (pg_snapshot text form). The decoder drops
    -- the table's changes of transactions that snapshot sees (see core/src/reseed.rs).
    seed_snapshot      text,
    -- A partitioned table: its partition tree when it was last copied (each partition with the
    -- transaction that attached it). Another tree now means rows came or went without changes of
    -- their own in the stream: the table is reseeded.
    partitions         text,
    -- The columns its files carry now (attribute number, name, kind; JSON), as of its last copy
    -- and the column changes the decoder followed since (see core/src/columns.rs).
    columns            text,
    -- When the table's folder was deleted to reset it (a reseed, or a new attempt of the initial
    -- snapshot) and its new copy is not published yet. On OneLake the copy waits until Fabric has
    -- dropped the table (README "Fabric"), at most azure_cdc.table_reset_timeout.
    folder_deleted_at  timestamptz,
    PRIMARY KEY (mirror_id, relid)
);

-- What happened to mirrors and tables, newest last: state changes, errors, recoveries. An audit
-- trail: only the extension writes it. Kept to the newest 10000 events of each mirror (older ones
-- are deleted as new ones are recorded); a mirror's events go when drop_mirror forgets it.
CREATE TABLE azure_cdc.events (
    event_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    mirror_id    bigint NOT NULL,
    mirror_name  text NOT NULL,
    schema_name  name,
    table_name   name,
    event        text NOT NULL,
    detail       text
);
-- Each mirror keeps its newest 10000 events (trimmed as it records one); drop_mirror forgets them.
CREATE INDEX events_by_mirror ON azure_cdc.events (mirror_id, event_id);

REVOKE ALL ON azure_cdc.mirrors, azure_cdc.mirror_tables, azure_cdc.events FROM PUBLIC;
GRANT SELECT ON azure_cdc.mirrors, azure_cdc.mirror_tables, azure_cdc.events TO azure_cdc_admin;

-- Named options (keys, secrets, endpoints) for object-store targets. Readable by superusers only:
-- azure_cdc_admin may name a credential in start_mirror but not read it (see src/credentials.rs).
CREATE TABLE azure_cdc.credentials (
    credential_name  text PRIMARY KEY,
    options          jsonb NOT NULL,
    created_by       name NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now()
);
REVOKE ALL ON azure_cdc.credentials FROM PUBLIC;
