//! The capture triggers: per source, one trigger function and four statement-level
//! triggers that append "key K of source S may have changed" to `kbsync.changes`, in
//! the writer's transaction, and wake the daemon with a NOTIFY whose payload is the
//! source name.
//!
//! What the writer pays is kept to the least, at any concurrency:
//! - Statement-level with transition tables: a statement's rows are appended by one
//!   set-based INSERT ... SELECT (a 100,000-row UPDATE costs one statement, not
//!   100,000 trigger calls). Updates that change no relevant column, and rows that
//!   neither were nor are eligible, append nothing.
//! - `kbsync.changes` has no index and is only ever appended to by writers: nothing to
//!   look up, no row lock to wait for (the daemon folds it into the outbox, see
//!   `outbox::collect`).
//! - At most one capturing transaction at a time NOTIFYs. PostgreSQL serialises the
//!   commits of all NOTIFYing transactions on one cluster-wide lock (`PreCommit_Notify`
//!   in async.c, held until the commit is flushed); so a writer NOTIFYs only if it wins
//!   `pg_try_advisory_xact_lock(WAKE_LOCK)`, which never waits and is held until its
//!   transaction ends. The others commit without the NOTIFY lock; their changes are
//!   found by the fold that the winner's NOTIFY starts, or by the follow-up folds the
//!   daemon runs while changes keep arriving (see the daemon's collector).

use crate::config::Source;
use crate::sql_ident::quote_literal;

/// NOTIFY channel the daemon listens on.
pub const CHANNEL: &str = "kbsync";

/// The advisory lock a capturing transaction must win to send the wake-up NOTIFY.
pub const WAKE_LOCK: i64 = crate::advisory_locks::WAKE;

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
    let tenant = |row: &str| tenant_of(source, via_table, &format!("{row}."), row);
    let append = |rows: &str| {
        format!(
            "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant)
         {rows};"
        )
    };
    let cols = source.relevant_columns();
    let row = |alias: &str| {
        let list: Vec<String> = cols.iter().map(|c| format!("{alias}.{c}")).collect();
        format!("ROW({})", list.join(", "))
    };
    let (new_join, new_tenant) = tenant("n");
    let (old_join, old_tenant) = tenant("d");
    let inserted = append(&format!(
        "SELECT {name}, 'row', n.{key}::text, false, {new_tenant}
           FROM kbsync_new n{new_join}
          WHERE {}",
        source.filter_sql("n.")
    ));
    let deleted = append(&format!(
        "SELECT {name}, 'row', d.{key}::text, true, {old_tenant}
           FROM kbsync_old d{old_join}
          WHERE {}",
        source.filter_sql("d.")
    ));
    // Matched by key: rows whose relevant columns changed and that were or are
    // eligible. A changed key is a delete of the old key and an insert of the new.
    let updated = append(&format!(
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
    IF FOUND AND pg_catalog.pg_try_advisory_xact_lock({wake_lock}::bigint) THEN
        PERFORM pg_catalog.pg_notify({channel}, {name});
    END IF;
    RETURN NULL;
END
$kbsync$",
        fname = function_name(&source.name),
        truncate = append(&format!("VALUES ({name}, 'source', '', true, '')")),
        channel = lit(CHANNEL),
        wake_lock = WAKE_LOCK,
    )
}

/// (join, tenant expression) for the row whose columns are `{prefix}column`; the via
/// table, if any, is joined as `{alias}_v`.
fn tenant_of(
    source: &Source,
    via_table: Option<&str>,
    prefix: &str,
    alias: &str,
) -> (String, String) {
    match (&source.tenant_via, via_table) {
        (None, _) => (
            String::new(),
            format!("COALESCE({prefix}{}::text, '')", source.tenant_column),
        ),
        (Some((_, fk, references)), Some(table)) => (
            format!(" LEFT JOIN {table} {alias}_v ON {alias}_v.{references} = {prefix}{fk}"),
            format!("COALESCE({alias}_v.{}::text, '')", source.tenant_column),
        ),
        // Unreachable through install, which resolves every via table or fails.
        (Some(_), None) => (String::new(), "''".to_owned()),
    }
}

/// Logical capture: the statement that turns a source's decoded changes into
/// `kbsync.changes` rows by the same rules as its trigger (filters, relevant columns,
/// tenant through the via table, a changed key as a delete and an insert).
///
/// `$1` is a JSON array of `{op, at, full_old, old, new}`: op `I`/`U`/`D`/`T`; `at` the
/// commit time (Unix seconds); `old`/`new` the row as `{column: text}` (pgoutput's text
/// form, which `jsonb_populate_record` reads with each column's input function).
/// Without a full old row (REPLICA IDENTITY other than FULL) an update cannot be
/// compared and counts as a change, and a delete counts as eligible: never a change
/// missed, at worst a key re-read for nothing.
pub fn decoded_changes_sql(source: &Source, table: &str, via_table: Option<&str>) -> String {
    let name = lit(&source.name);
    let key = &source.key;
    let (new_join, new_tenant) = tenant_of(source, via_table, "(c.n).", "n");
    let (old_join, old_tenant) = tenant_of(source, via_table, "(c.d).", "d");
    let cols = source.relevant_columns();
    let row = |prefix: &str| {
        let list: Vec<String> = cols.iter().map(|c| format!("{prefix}{c}")).collect();
        format!("ROW({})", list.join(", "))
    };
    let new_ok = source.filter_sql("(c.n).");
    let old_ok = source.filter_sql("(c.d).");
    format!(
        "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant, changed_at)
WITH c AS (
    SELECT e.op, to_timestamp(e.at) AS at, COALESCE(e.full_old, false) AS full_old,
           e.old IS NOT NULL AS has_old,
           jsonb_populate_record(NULL::{table}, e.new) AS n,
           jsonb_populate_record(NULL::{table}, e.old) AS d
      FROM jsonb_to_recordset($1::jsonb) AS e(op text, at float8, full_old boolean, old jsonb, new jsonb))
SELECT {name}, 'row', (c.n).{key}::text, false, {new_tenant}, c.at
  FROM c{new_join}
 WHERE c.op = 'I' AND {new_ok}
UNION ALL
SELECT {name}, 'row', (c.d).{key}::text, true, {old_tenant}, c.at
  FROM c{old_join}
 WHERE c.op = 'D' AND (c.d).{key} IS NOT NULL AND (NOT c.full_old OR {old_ok})
UNION ALL
SELECT {name}, 'row', (c.n).{key}::text, NOT {new_ok}, {new_tenant}, c.at
  FROM c{new_join}
 WHERE c.op = 'U' AND (NOT c.full_old
                       OR (c.d).{key} IS DISTINCT FROM (c.n).{key}
                       OR ({old_row} IS DISTINCT FROM {new_row} AND ({old_ok} OR {new_ok})))
UNION ALL
SELECT {name}, 'row', (c.d).{key}::text, true, {old_tenant}, c.at
  FROM c{old_join}
 WHERE c.op = 'U' AND c.has_old AND (c.d).{key} IS NOT NULL AND (c.d).{key} IS DISTINCT FROM (c.n).{key}
UNION ALL
SELECT {name}, 'source', '', true, '', c.at FROM c WHERE c.op = 'T'",
        old_row = row("(c.d)."),
        new_row = row("(c.n)."),
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
