//! The capture triggers: per source, one trigger function and four triggers that
//! record "key K of source S may have changed" in `kbsync.outbox`, in the writer's
//! transaction, and send a wake-up NOTIFY whose payload is the source name.
//!
//! Kept as small as possible for the writer: WHEN clauses skip updates that touch no
//! relevant column and rows that neither were nor are eligible, without calling the
//! function at all; repeated edits of one key fold into one outbox row; identical
//! NOTIFYs in one transaction fold into one, so a 100k-row UPDATE sends one.

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
/// pinned search_path). The entry records the row's tenant for fair scheduling: one
/// index probe of the via table per write when the tenant is reached through it.
pub fn function_sql(source: &Source, via_table: Option<&str>) -> String {
    let name = lit(&source.name);
    let key = &source.key;
    let tenant = |row: &str| match (&source.tenant_via, via_table) {
        (None, _) => format!("COALESCE({row}.{}::text, '')", source.tenant_column),
        (Some((_, fk, references)), Some(table)) => format!(
            "COALESCE((SELECT v.{col}::text FROM {table} v WHERE v.{references} = {row}.{fk}), '')",
            col = source.tenant_column
        ),
        // Unreachable through install, which resolves every via table or fails.
        (Some(_), None) => "''".to_owned(),
    };
    let upsert = |scope: &str, key_expr: &str, deleted_expr: &str, tenant_expr: &str| {
        format!(
            "INSERT INTO kbsync.outbox AS o (source, scope, source_key, deleted, tenant)
         VALUES ({name}, '{scope}', {key_expr}, {deleted_expr}, {tenant_expr})
         ON CONFLICT (source, scope, source_key) DO UPDATE
            SET deleted = EXCLUDED.deleted, last_changed_at = pg_catalog.now(),
                version = o.version + 1, attempts = 0, next_attempt_at = NULL,
                tenant = EXCLUDED.tenant;"
        )
    };
    let old_key = format!("OLD.{key}::text");
    let new_key = format!("NEW.{key}::text");
    let new_fails = format!("NOT ({})", source.filter_sql("NEW."));
    format!(
        "CREATE OR REPLACE FUNCTION kbsync.\"{fname}\"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $kbsync$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        {truncate}
    ELSIF TG_OP = 'DELETE' THEN
        {delete}
    ELSE
        IF TG_OP = 'UPDATE' THEN
            IF OLD.{key} IS DISTINCT FROM NEW.{key} THEN
                {moved}
            END IF;
        END IF;
        {upsert_new}
    END IF;
    PERFORM pg_catalog.pg_notify({channel}, {name});
    RETURN NULL;
END
$kbsync$",
        fname = function_name(&source.name),
        truncate = upsert("source", "''", "true", "''"),
        delete = upsert("row", &old_key, "true", &tenant("OLD")),
        moved = upsert("row", &old_key, "true", &tenant("OLD")),
        upsert_new = upsert("row", &new_key, &new_fails, &tenant("NEW")),
        channel = lit(CHANNEL),
    )
}

/// The four triggers of a source, in creation order.
pub fn trigger_defs(source: &Source) -> Vec<TriggerDef> {
    let table = &source.table;
    let exec = format!(
        "EXECUTE FUNCTION kbsync.\"{}\"()",
        function_name(&source.name)
    );
    let when = |cond: String| {
        if cond == "true" {
            String::new()
        } else {
            format!(" WHEN ({cond})")
        }
    };
    let cols = source.relevant_columns();
    let row = |prefix: &str| {
        let list: Vec<String> = cols.iter().map(|c| format!("{prefix}{c}")).collect();
        format!("ROW({})", list.join(", "))
    };
    let eligible_before_or_after = if source.filters.is_empty() {
        String::new()
    } else {
        format!(
            " AND ({} OR {})",
            source.filter_sql("OLD."),
            source.filter_sql("NEW.")
        )
    };
    let name = |suffix: &str| format!("kbsync_{}_{suffix}", source.name);
    vec![
        TriggerDef {
            name: name("ins"),
            create_sql: format!(
                "CREATE TRIGGER \"{}\" AFTER INSERT ON {table} FOR EACH ROW{} {exec}",
                name("ins"),
                when(source.filter_sql("NEW."))
            ),
        },
        TriggerDef {
            name: name("upd"),
            create_sql: format!(
                "CREATE TRIGGER \"{}\" AFTER UPDATE ON {table} FOR EACH ROW WHEN (({} IS DISTINCT FROM {}){eligible_before_or_after}) {exec}",
                name("upd"),
                row("OLD."),
                row("NEW.")
            ),
        },
        TriggerDef {
            name: name("del"),
            create_sql: format!(
                "CREATE TRIGGER \"{}\" AFTER DELETE ON {table} FOR EACH ROW{} {exec}",
                name("del"),
                when(source.filter_sql("OLD."))
            ),
        },
        TriggerDef {
            name: name("trunc"),
            create_sql: format!(
                "CREATE TRIGGER \"{}\" AFTER TRUNCATE ON {table} FOR EACH STATEMENT {exec}",
                name("trunc")
            ),
        },
    ]
}

fn lit(value: &str) -> String {
    // Source names and the channel are validated [a-z0-9_]; quoting cannot fail.
    quote_literal(value).unwrap_or_else(|_| "''".to_owned())
}
