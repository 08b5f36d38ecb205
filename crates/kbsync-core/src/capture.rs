//! The capture triggers: per source, one trigger function and four statement-level
//! triggers that record "key K of source S may have changed" in `kbsync.outbox`, in
//! the writer's transaction, and send a wake-up NOTIFY whose payload is the source name.
//!
//! Statement-level with transition tables, so a statement's rows are queued by one
//! set-based upsert rather than one per row: a 100,000-row UPDATE costs the writer one
//! INSERT ... SELECT (see `just bench`). Updates that change no relevant column, and
//! rows that neither were nor are eligible, queue nothing; repeated edits of one key
//! fold into one outbox row; one NOTIFY per statement that queued anything.

use crate::config::Source;
use crate::sql_ident::quote_literal;

/// NOTIFY channel the daemon listens on.
pub const CHANNEL: &str = "kbsync";

pub fn function_name(source: &str) -> String {
    format!("capture_{source}")
}

/// A piece of DDL with the name it goes by, for planning and reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerDef {
    pub name: String,
    pub create_sql: String,
}

/// `CREATE OR REPLACE FUNCTION` for a source's capture function. `via_table` is the
/// schema-qualified `tenant.via` table (install resolves it; the function runs with a
/// pinned search_path). Each entry records its row's tenant for fair scheduling.
pub fn function_sql(source: &Source, via_table: Option<&str>) -> String {
    let name = lit(&source.name);
    let key = &source.key;
    // (join, tenant expression) for the transition-table row aliased `row`.
    let tenant = |row: &str| match (&source.tenant_via, via_table) {
        (None, _) => (
            String::new(),
            format!("COALESCE({row}.{}::text, '')", source.tenant_column),
        ),
        (Some((_, fk, references)), Some(table)) => (
            format!(" LEFT JOIN {table} {row}_v ON {row}_v.{references} = {row}.{fk}"),
            format!("COALESCE({row}_v.{}::text, '')", source.tenant_column),
        ),
        // Unreachable through install, which resolves every via table or fails.
        (Some(_), None) => (String::new(), "''".to_owned()),
    };
    let upsert = |rows: &str| {
        format!(
            "INSERT INTO kbsync.outbox AS o (source, scope, source_key, deleted, tenant)
         {rows}
         ON CONFLICT (source, scope, source_key) DO UPDATE
            SET deleted = EXCLUDED.deleted, last_changed_at = pg_catalog.now(),
                version = o.version + 1, attempts = 0, next_attempt_at = NULL,
                tenant = EXCLUDED.tenant;"
        )
    };
    let cols = source.relevant_columns();
    let row = |alias: &str| {
        let list: Vec<String> = cols.iter().map(|c| format!("{alias}.{c}")).collect();
        format!("ROW({})", list.join(", "))
    };
    let (new_join, new_tenant) = tenant("n");
    let (old_join, old_tenant) = tenant("d");
    let inserted = upsert(&format!(
        "SELECT {name}, 'row', n.{key}::text, false, {new_tenant}
           FROM kbsync_new n{new_join}
          WHERE {}",
        source.filter_sql("n.")
    ));
    let deleted = upsert(&format!(
        "SELECT {name}, 'row', d.{key}::text, true, {old_tenant}
           FROM kbsync_old d{old_join}
          WHERE {}",
        source.filter_sql("d.")
    ));
    // Matched by key: rows whose relevant columns changed and that were or are
    // eligible. A changed key is a delete of the old key and an insert of the new.
    let updated = upsert(&format!(
        "SELECT {name}, 'row', n.{key}::text, NOT {new_ok}, {new_tenant}
           FROM kbsync_new n JOIN kbsync_old d ON d.{key} = n.{key}{new_join}
          WHERE {old_row} IS DISTINCT FROM {new_row} AND ({old_ok} OR {new_ok})
         UNION ALL
         SELECT {name}, 'row', n.{key}::text, NOT {new_ok}, {new_tenant}
           FROM kbsync_new n{new_join}
          WHERE NOT EXISTS (SELECT 1 FROM kbsync_old d WHERE d.{key} = n.{key})
         UNION ALL
         SELECT {name}, 'row', d.{key}::text, true, {old_tenant}
           FROM kbsync_old d{old_join}
          WHERE NOT EXISTS (SELECT 1 FROM kbsync_new n WHERE n.{key} = d.{key})",
        new_ok = source.filter_sql("n."),
        old_ok = source.filter_sql("d."),
        old_row = row("d"),
        new_row = row("n"),
    ));
    format!(
        "CREATE OR REPLACE FUNCTION kbsync.\"{fname}\"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $kbsync$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        {truncate}
    ELSIF TG_OP = 'INSERT' THEN
        {inserted}
    ELSIF TG_OP = 'DELETE' THEN
        {deleted}
    ELSE
        {updated}
    END IF;
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify({channel}, {name});
    END IF;
    RETURN NULL;
END
$kbsync$",
        fname = function_name(&source.name),
        truncate = upsert(&format!("VALUES ({name}, 'source', '', true, '')")),
        channel = lit(CHANNEL),
    )
}

/// The four triggers of a source, in creation order. Statement-level: the rows a
/// statement touched are in its transition tables (`kbsync_old`, `kbsync_new`).
pub fn trigger_defs(source: &Source) -> Vec<TriggerDef> {
    let table = &source.table;
    let exec = format!(
        "EXECUTE FUNCTION kbsync.\"{}\"()",
        function_name(&source.name)
    );
    let name = |suffix: &str| format!("kbsync_{}_{suffix}", source.name);
    let def = |suffix: &str, event: &str, referencing: &str| TriggerDef {
        name: name(suffix),
        create_sql: format!(
            "CREATE TRIGGER \"{}\" AFTER {event} ON {table}{referencing} FOR EACH STATEMENT {exec}",
            name(suffix)
        ),
    };
    vec![
        def("ins", "INSERT", " REFERENCING NEW TABLE AS kbsync_new"),
        def(
            "upd",
            "UPDATE",
            " REFERENCING OLD TABLE AS kbsync_old NEW TABLE AS kbsync_new",
        ),
        def("del", "DELETE", " REFERENCING OLD TABLE AS kbsync_old"),
        def("trunc", "TRUNCATE", ""),
    ]
}

fn lit(value: &str) -> String {
    // Source names and the channel are validated [a-z0-9_]; quoting cannot fail.
    quote_literal(value).unwrap_or_else(|_| "''".to_owned())
}
