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

pub mod logical;

use crate::config::{RowAlias, Source};

/// NOTIFY channel the daemon listens on.
pub const CHANNEL: &str = "kbsync";

/// The advisory lock a capturing transaction must win to send the wake-up NOTIFY.
pub const WAKE_LOCK: i64 = crate::db::advisory_locks::WAKE;

pub fn function_name(source: &str) -> String {
    format!("capture_{source}")
}

/// The function that queues a source's rows when the related row they read changes.
/// Names cannot collide with `function_name`'s: source names have no `__`.
pub fn dependents_function_name(source: &str, related: &str) -> String {
    format!("capture_{source}__{related}")
}

/// A piece of DDL with the name it goes by, for planning and reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerDef {
    pub name: String,
    pub create_sql: String,
}

/// The source row in a trigger's transition tables: new rows `n` (related rows
/// `n_r0`, …), old rows `d`.
const NEW: RowAlias<'static> = RowAlias {
    own: "n.",
    related: "n_r",
};
const OLD: RowAlias<'static> = RowAlias {
    own: "d.",
    related: "d_r",
};

/// `CREATE OR REPLACE FUNCTION` for a source's capture function. `related_tables` are
/// its related tables, schema-qualified (install resolves them; the function runs with
/// a pinned search_path). Each entry records its row's tenant for fair scheduling.
pub fn function_sql(source: &Source, related_tables: &[String]) -> String {
    let name = source.name_literal();
    let key = &source.key;
    let append = |rows: &str| {
        format!(
            "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant)
         {rows};"
        )
    };
    let row = |prefix: &str| row_of(&source.relevant_columns(), prefix);
    // Joins the statements do not read from are removed by the planner (a LEFT JOIN
    // on a unique key), so a related table joined for the text costs nothing here.
    let new_join = source.joins_sql(NEW, related_tables);
    let old_join = source.joins_sql(OLD, related_tables);
    let new_tenant = tenant_text(source, NEW);
    let old_tenant = tenant_text(source, OLD);
    // Which rows to record is decided by the filter's rules on the row's own columns
    // only: a related row's state read here may be a concurrent writer's old one, and
    // the daemon reads it again anyway. The full filter only picks the window.
    let inserted = append(&format!(
        "SELECT {name}, 'row', n.{key}::text, false, {new_tenant}
           FROM kbsync_new n{new_join}
          WHERE {}",
        source.own_filter_sql(NEW)
    ));
    let deleted = append(&format!(
        "SELECT {name}, 'row', d.{key}::text, true, {old_tenant}
           FROM kbsync_old d{old_join}
          WHERE {}",
        source.own_filter_sql(OLD)
    ));
    // Matched by key: rows whose relevant columns changed and that were or are
    // eligible. A changed key is a delete of the old key and an insert of the new. A
    // row that leaves its tenant is a delete from that tenant: it takes the delete
    // window, the shorter one.
    let updated = append(&format!(
        "SELECT {name}, 'row', n.{key}::text, NOT {new_ok} OR {moved}, {new_tenant}
           FROM kbsync_new n JOIN kbsync_old d ON d.{key} = n.{key}{new_join}{old_join}
          WHERE {old_row} IS DISTINCT FROM {new_row} AND ({old_own_ok} OR {new_own_ok})
         UNION ALL
         SELECT {name}, 'row', n.{key}::text, NOT {new_ok}, {new_tenant}
           FROM kbsync_new n{new_join}
          WHERE NOT EXISTS (SELECT 1 FROM kbsync_old d WHERE d.{key} = n.{key})
         UNION ALL
         SELECT {name}, 'row', d.{key}::text, true, {old_tenant}
           FROM kbsync_old d{old_join}
          WHERE NOT EXISTS (SELECT 1 FROM kbsync_new n WHERE n.{key} = d.{key})",
        new_ok = source.filter_sql(NEW),
        new_own_ok = source.own_filter_sql(NEW),
        old_own_ok = source.own_filter_sql(OLD),
        moved = tenant_moved(source, OLD, NEW),
        old_row = row("d."),
        new_row = row("n."),
    ));
    trigger_function(
        &function_name(&source.name),
        &append(&format!("VALUES ({name}, 'source', '', true, '')")),
        &inserted,
        &deleted,
        &updated,
        &name,
    )
}

/// The body every capture function shares: a branch per statement kind, then the
/// wake-up NOTIFY if anything was appended (and this transaction wins the lock).
fn trigger_function(
    fname: &str,
    truncate: &str,
    inserted: &str,
    deleted: &str,
    updated: &str,
    payload: &str,
) -> String {
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
        PERFORM pg_catalog.pg_notify({channel}, {payload});
    END IF;
    RETURN NULL;
END
$kbsync$",
        channel = CHANNEL_LITERAL,
        wake_lock = WAKE_LOCK,
    )
}

/// `ROW(…)` of `columns` under `prefix` (`n.`, `(c.d).`): what an update compares.
fn row_of(columns: &[crate::config::sql_ident::Ident], prefix: &str) -> String {
    let list: Vec<String> = columns.iter().map(|c| format!("{prefix}{c}")).collect();
    format!("ROW({})", list.join(", "))
}

/// True when an updated row of related table `i` (`old`, `new` prefixes) moved its
/// dependents to another tenant: the tenant column there changed.
fn related_tenant_moved(source: &Source, i: usize, old: &str, new: &str) -> String {
    if source.tenant.related == Some(i) {
        format!("{old}{0} IS DISTINCT FROM {new}{0}", source.tenant.column)
    } else {
        "false".to_owned()
    }
}

/// The tenant of the row at `at` as `kbsync.changes` records it ('' for none).
fn tenant_text(source: &Source, at: RowAlias) -> String {
    format!("COALESCE({}::text, '')", source.tenant_sql(at))
}

/// True when an updated row (`old`, `new`) may have left its tenant: its tenant
/// column changed, or the foreign key it takes its tenant through did.
fn tenant_moved(source: &Source, old: RowAlias, new: RowAlias) -> String {
    let column = match source.tenant.related.and_then(|i| source.related.get(i)) {
        None => &source.tenant.column,
        Some(related) => &related.foreign_key,
    };
    format!("{}{column} IS DISTINCT FROM {}{column}", old.own, new.own)
}

/// `CREATE OR REPLACE FUNCTION` for the trigger on related table `i` of a source: the
/// rows of `source_table` that reference a related row whose watched columns changed
/// (or that was inserted, deleted, truncated) are appended to `kbsync.changes`, set
/// based, in the writer's transaction (a statement that moves 1,000 pages appends all
/// their FAQs with one INSERT … SELECT). Tables are schema-qualified.
pub fn dependents_function_sql(
    source: &Source,
    i: usize,
    source_table: &str,
    related_tables: &[String],
) -> String {
    let Some(related) = source.related.get(i) else {
        return String::new();
    };
    let name = source.name_literal();
    let reference = &related.references;
    let row = |prefix: &str| row_of(&source.related_columns(i), prefix);
    let moved = related_tenant_moved(source, i, "d.", "n.");
    let append = |refs: &str| {
        format!(
            "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant)
         {};",
            dependents_sql(source, i, source_table, related_tables, refs, "")
        )
    };
    let inserted = append(&format!(
        "SELECT n.{reference} AS ref, false AS moved FROM kbsync_new n"
    ));
    let deleted = append(&format!(
        "SELECT d.{reference} AS ref, true AS moved FROM kbsync_old d"
    ));
    let updated = append(&format!(
        "SELECT n.{reference} AS ref, {moved} AS moved
           FROM kbsync_new n JOIN kbsync_old d ON d.{reference} = n.{reference}
          WHERE {old_row} IS DISTINCT FROM {new_row}
         UNION ALL
         SELECT n.{reference}, true FROM kbsync_new n
          WHERE NOT EXISTS (SELECT 1 FROM kbsync_old d WHERE d.{reference} = n.{reference})
         UNION ALL
         SELECT d.{reference}, true FROM kbsync_old d
          WHERE NOT EXISTS (SELECT 1 FROM kbsync_new n WHERE n.{reference} = d.{reference})",
        old_row = row("d."),
        new_row = row("n."),
    ));
    let truncate = format!(
        "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant)
         SELECT {name}, 'row', t.{key}::text, true, ''
           FROM {source_table} t
          WHERE t.{fk} IS NOT NULL AND {own_ok};",
        key = source.key,
        fk = related.foreign_key,
        own_ok = source.own_filter_sql(RowAlias::TABLE),
    );
    trigger_function(
        &dependents_function_name(&source.name, &related.name),
        &truncate,
        &inserted,
        &deleted,
        &updated,
        &name,
    )
}

/// The rows of the source that reference the related keys `refs` (a query of `ref`,
/// `moved`{, `at`}), as `kbsync.changes` rows: queued as deletes (the short window)
/// when they are no longer eligible or moved to another tenant. Rows whose own
/// columns fail the filter neither were nor are eligible, whatever the related row
/// says: they are left out. `at` is `, r.at` to carry a commit time, or empty.
fn dependents_sql(
    source: &Source,
    i: usize,
    source_table: &str,
    related_tables: &[String],
    refs: &str,
    at: &str,
) -> String {
    let Some(related) = source.related.get(i) else {
        return String::new();
    };
    let table = RowAlias::TABLE;
    let carried = if at.is_empty() { "" } else { ", max(at) AS at" };
    format!(
        "SELECT {name}, 'row', t.{key}::text,
                NOT ({ok} AND {tenant} IS NOT NULL) OR r.moved, COALESCE({tenant}::text, ''){at}
           FROM (SELECT ref, bool_or(moved) AS moved{carried} FROM ({refs}) x GROUP BY ref) r
           JOIN {source_table} t ON t.{fk} = r.ref{joins}
          WHERE {own_ok}",
        name = source.name_literal(),
        key = source.key,
        ok = source.filter_sql(table),
        tenant = source.tenant_sql(table),
        fk = related.foreign_key,
        joins = source.joins_sql(table, related_tables),
        own_ok = source.own_filter_sql(table),
    )
}

/// Logical capture: the statement that turns a source's decoded changes into
/// `kbsync.changes` rows by the same rules as its trigger (filters, relevant columns,
/// tenant through the related table, a changed key as a delete and an insert).
///
/// `$1` is a JSON array of `{op, at, full_old, old, new}`: op `I`/`U`/`D`/`T`; `at` the
/// commit time (Unix seconds); `old`/`new` the row as `{column: text}` (pgoutput's text
/// form, which `jsonb_populate_record` reads with each column's input function).
/// Without a full old row (REPLICA IDENTITY other than FULL) an update cannot be
/// compared and counts as a change, and a delete counts as eligible: never a change
/// missed, at worst a key re-read for nothing.
pub fn decoded_changes_sql(source: &Source, table: &str, related_tables: &[String]) -> String {
    let name = source.name_literal();
    let key = &source.key;
    let new = RowAlias {
        own: "(c.n).",
        related: "n_r",
    };
    let old = RowAlias {
        own: "(c.d).",
        related: "d_r",
    };
    let new_join = source.joins_sql(new, related_tables);
    let old_join = source.joins_sql(old, related_tables);
    let new_tenant = tenant_text(source, new);
    let old_tenant = tenant_text(source, old);
    let row = |prefix: &str| row_of(&source.relevant_columns(), prefix);
    let new_ok = source.filter_sql(new);
    // As in the trigger: rows are picked by their own columns, the window by all.
    let new_own_ok = source.own_filter_sql(new);
    let old_own_ok = source.own_filter_sql(old);
    let moved = tenant_moved(source, old, new);
    format!(
        "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant, changed_at)
{c}
SELECT {name}, 'row', (c.n).{key}::text, false, {new_tenant}, c.at
  FROM c{new_join}
 WHERE c.op = 'I' AND {new_own_ok}
UNION ALL
SELECT {name}, 'row', (c.d).{key}::text, true, {old_tenant}, c.at
  FROM c{old_join}
 WHERE c.op = 'D' AND (c.d).{key} IS NOT NULL AND (NOT c.full_old OR {old_own_ok})
UNION ALL
SELECT {name}, 'row', (c.n).{key}::text,
       NOT {new_ok} OR (c.full_old AND (c.d).{key} IS NOT DISTINCT FROM (c.n).{key} AND {moved}), {new_tenant}, c.at
  FROM c{new_join}{old_join}
 WHERE c.op = 'U' AND (NOT c.full_old
                       OR (c.d).{key} IS DISTINCT FROM (c.n).{key}
                       OR ({old_row} IS DISTINCT FROM {new_row} AND ({old_own_ok} OR {new_own_ok})))
UNION ALL
SELECT {name}, 'row', (c.d).{key}::text, true, {old_tenant}, c.at
  FROM c{old_join}
 WHERE c.op = 'U' AND c.has_old AND (c.d).{key} IS NOT NULL AND (c.d).{key} IS DISTINCT FROM (c.n).{key}
UNION ALL
SELECT {name}, 'source', '', true, '', c.at FROM c WHERE c.op = 'T'",
        c = decoded_rows_cte(table),
        old_row = row("(c.d)."),
        new_row = row("(c.n)."),
    )
}

/// `WITH c AS (…)`: the decoded changes of `$1` as rows of `table` (`n` new, `d` old).
fn decoded_rows_cte(table: &str) -> String {
    format!(
        "WITH c AS (
    SELECT e.op, to_timestamp(e.at) AS at, COALESCE(e.full_old, false) AS full_old,
           e.old IS NOT NULL AS has_old,
           jsonb_populate_record(NULL::{table}, e.new) AS n,
           jsonb_populate_record(NULL::{table}, e.old) AS d
      FROM jsonb_to_recordset($1::jsonb) AS e(op text, at float8, full_old boolean, old jsonb, new jsonb))"
    )
}

/// Logical capture: the statement that turns the decoded changes of related table
/// `i` into `kbsync.changes` rows for the source rows that reference them, by the
/// same rules as `dependents_function_sql`. `$1` is as in `decoded_changes_sql`,
/// with rows of the related table. Without a full old row an update counts as a
/// change of every watched column, the tenant's included.
pub fn decoded_dependents_sql(
    source: &Source,
    i: usize,
    source_table: &str,
    related_tables: &[String],
) -> String {
    let (Some(related), Some(related_table)) = (source.related.get(i), related_tables.get(i))
    else {
        return String::new();
    };
    let reference = &related.references;
    let row = |prefix: &str| row_of(&source.related_columns(i), prefix);
    let moved = related_tenant_moved(source, i, "(c.d).", "(c.n).");
    let refs = format!(
        "SELECT (c.n).{reference} AS ref, false AS moved, c.at FROM c WHERE c.op = 'I'
         UNION ALL
         SELECT (c.d).{reference}, true, c.at FROM c WHERE c.op = 'D'
         UNION ALL
         SELECT (c.n).{reference}, NOT c.full_old OR {moved}, c.at FROM c
          WHERE c.op = 'U' AND (NOT c.full_old
                                OR (c.d).{reference} IS DISTINCT FROM (c.n).{reference}
                                OR {old_row} IS DISTINCT FROM {new_row})
         UNION ALL
         SELECT (c.d).{reference}, true, c.at FROM c
          WHERE c.op = 'U' AND c.has_old AND (c.d).{reference} IS DISTINCT FROM (c.n).{reference}",
        old_row = row("(c.d)."),
        new_row = row("(c.n)."),
    );
    format!(
        "INSERT INTO kbsync.changes (source, scope, source_key, deleted, tenant, changed_at)
{c}
{dependents}
UNION ALL
SELECT {name}, 'row', t.{key}::text, true, '', c.at
  FROM c JOIN {source_table} t ON t.{fk} IS NOT NULL
 WHERE c.op = 'T' AND {own_ok}",
        c = decoded_rows_cte(related_table),
        dependents = dependents_sql(source, i, source_table, related_tables, &refs, ", r.at"),
        name = source.name_literal(),
        key = source.key,
        fk = related.foreign_key,
        own_ok = source.own_filter_sql(RowAlias::TABLE),
    )
}

/// The four triggers of a source, in creation order. Statement-level: the rows a
/// statement touched are in its transition tables (`kbsync_old`, `kbsync_new`).
pub fn trigger_defs(source: &Source) -> Vec<TriggerDef> {
    statement_triggers(
        &format!("kbsync_{}", source.name),
        &source.table.to_string(),
        &function_name(&source.name),
    )
}

/// The four triggers on related table `i` of a source, which queue its dependents.
pub fn dependents_trigger_defs(source: &Source, i: usize) -> Vec<TriggerDef> {
    match source.related.get(i) {
        None => Vec::new(),
        Some(related) => statement_triggers(
            &format!("kbsync_{}__{}", source.name, related.name),
            &related.table.to_string(),
            &dependents_function_name(&source.name, &related.name),
        ),
    }
}

fn statement_triggers(prefix: &str, table: &str, function: &str) -> Vec<TriggerDef> {
    let exec = format!("EXECUTE FUNCTION kbsync.\"{function}\"()");
    let name = |suffix: &str| format!("{prefix}_{suffix}");
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

/// `CHANNEL` as a SQL literal (a test checks that it quotes `CHANNEL`).
const CHANNEL_LITERAL: &str = "'kbsync'";

#[cfg(test)]
mod tests {
    #[test]
    fn the_channel_literal_is_the_channel_quoted() {
        assert_eq!(
            crate::config::sql_ident::SqlLiteral::new(super::CHANNEL)
                .unwrap()
                .to_string(),
            super::CHANNEL_LITERAL
        );
    }
}
