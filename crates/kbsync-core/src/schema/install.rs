//! `kbsync install`: versioned migrations, the embedding column's dimension, and the
//! capture (triggers, or a publication and a slot) of the configured sources, planned
//! against the live catalog and applied in one transaction (slots aside). A plan of nothing means the database is up to date.

use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio_postgres::{Client, GenericClient};

use crate::capture::logical;
use crate::capture::{
    dependents_function_name, dependents_function_sql, dependents_trigger_defs, function_name,
    function_sql, trigger_defs,
};
use crate::config::sql_ident::SqlLiteral;
use crate::config::{CaptureMode, Config, Source};
use crate::search;

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Released files are never edited: the checksum of each
/// applied migration is checked on every install.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "kbsync_schema",
        sql: include_str!("../../../../sql/migrations/0001_kbsync_schema.sql"),
    },
    Migration {
        version: 2,
        name: "reconcile",
        sql: include_str!("../../../../sql/migrations/0002_reconcile.sql"),
    },
    Migration {
        version: 3,
        name: "fair_scheduling",
        sql: include_str!("../../../../sql/migrations/0003_fair_scheduling.sql"),
    },
    Migration {
        version: 4,
        name: "change_log",
        sql: include_str!("../../../../sql/migrations/0004_change_log.sql"),
    },
    Migration {
        version: 5,
        name: "embeddings_by_text",
        sql: include_str!("../../../../sql/migrations/0005_embeddings_by_text.sql"),
    },
    Migration {
        version: 6,
        name: "sweep_hashes",
        sql: include_str!("../../../../sql/migrations/0006_sweep_hashes.sql"),
    },
    Migration {
        version: 7,
        name: "adopted_embeddings",
        sql: include_str!("../../../../sql/migrations/0007_adopted_embeddings.sql"),
    },
    Migration {
        version: 8,
        name: "full_text",
        sql: include_str!("../../../../sql/migrations/0008_full_text.sql"),
    },
    Migration {
        version: 9,
        name: "knowledge_terms",
        sql: include_str!("../../../../sql/migrations/0009_knowledge_terms.sql"),
    },
    Migration {
        version: 10,
        name: "model_migration",
        sql: include_str!("../../../../sql/migrations/0010_model_migration.sql"),
    },
    Migration {
        version: 11,
        name: "source_problems",
        sql: include_str!("../../../../sql/migrations/0011_source_problems.sql"),
    },
];

/// Serialises concurrent installs.
const INSTALL_LOCK: i64 = crate::db::advisory_locks::INSTALL;
use crate::search::index::{self, HNSW_INDEX};

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("database error: {}", crate::db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A name or value that cannot be written into SQL (a NUL byte).
    #[error("{0}")]
    Literal(#[from] crate::config::sql_ident::IdentError),
    #[error(
        "migration {version} ({name}) was applied with a different text than this kbsync ships; released migrations must never be edited"
    )]
    EditedMigration { version: i32, name: String },
    #[error(
        "the database has kbsync migration {version}, which this kbsync does not know: it is older than the schema; upgrade kbsync"
    )]
    UnknownMigration { version: i32 },
    #[error(
        "tenant_knowledge.embedding is {current} but embedding.dimensions is {wanted_dimensions}. Stored embeddings cannot be reused by a model of another dimension. Either set embedding.dimensions = {current_dimensions} again, or keep [embedding] as it was, put the new model in [next_embedding] and run `kbsync model start` (blue/green: search keeps working meanwhile), or run `kbsync install --reset-embeddings`: it keeps every chunk's text, sets all embeddings to NULL, changes the column to {wanted} and rebuilds the index; then `kbsync reconcile` re-embeds them with the new model"
    )]
    DimensionChanged {
        current: String,
        current_dimensions: i32,
        wanted: String,
        wanted_dimensions: u32,
    },
    #[error(transparent)]
    Column(#[from] index::ColumnTypeError),
    #[error(
        "capture.mode = \"logical\" needs wal_level = logical, and this server has wal_level = {current}. Run `ALTER SYSTEM SET wal_level = logical` (or set it in postgresql.conf) and restart PostgreSQL; or keep capture.mode = \"triggers\""
    )]
    WalLevel { current: String },
    #[error(
        "replication slot {slot} is in use by a running kbsync daemon (logical capture); stop the daemons, run `kbsync install` again, then start them with capture.mode = \"triggers\""
    )]
    SlotActive { slot: String },
    #[error("{0}")]
    Logical(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    ModelMigration(#[from] crate::model::migration::ModelMigrationError),
    #[error("sources.{source_name}: {problem}")]
    Source {
        source_name: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct InstallOptions {
    /// Allow a change of embedding dimension by clearing every embedding.
    pub reset_embeddings: bool,
}

/// One change to make, with the SQL that makes it.
#[derive(Debug, Clone)]
pub struct Step {
    pub description: String,
    pub sql: String,
    /// Runs on its own, between transactions: creating a logical replication slot is
    /// refused in a transaction that has written anything.
    pub outside_transaction: bool,
}

#[derive(Debug, Clone, Default)]
pub struct InstallPlan {
    pub steps: Vec<Step>,
    /// What works but costs the application: printed, not applied (e.g. a foreign key
    /// without an index, which every change of a related row scans for).
    pub warnings: Vec<String>,
}

impl InstallPlan {
    pub(crate) fn push(&mut self, description: impl Into<String>, sql: impl Into<String>) {
        self.steps.push(Step {
            description: description.into(),
            sql: sql.into(),
            outside_transaction: false,
        });
    }

    pub(crate) fn push_outside_transaction(
        &mut self,
        description: impl Into<String>,
        sql: impl Into<String>,
    ) {
        self.steps.push(Step {
            description: description.into(),
            sql: sql.into(),
            outside_transaction: true,
        });
    }

    /// The steps in the order they run: runs of in-transaction steps share one
    /// transaction; an outside step runs alone between them.
    fn groups(&self) -> Vec<&[Step]> {
        self.steps
            .chunk_by(|a, b| !a.outside_transaction && !b.outside_transaction)
            .collect()
    }

    /// The whole plan as an SQL script, for `--dry-run`.
    pub fn script(&self) -> String {
        let mut out = String::new();
        for group in self.groups() {
            let in_transaction = !group[0].outside_transaction;
            if in_transaction {
                out.push_str("BEGIN;\n");
            }
            for step in group {
                out.push_str(&format!(
                    "\n-- {}\n{};\n",
                    step.description,
                    step.sql.trim_end_matches(';')
                ));
            }
            out.push_str(if in_transaction { "\nCOMMIT;\n" } else { "\n" });
        }
        out
    }
}

async fn has_migrations_table(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT to_regclass('kbsync.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0))
}

fn checksum(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fingerprint(sql: &str) -> String {
    format!("kbsync:{}", checksum(sql))
}

/// Work out what `install` would change. Reads only.
pub async fn plan(
    client: &impl GenericClient,
    config: &Config,
    options: InstallOptions,
) -> Result<InstallPlan, InstallError> {
    let versions = crate::db::server_versions::ServerVersions::read(client).await?;
    if let Some(problem) =
        versions.unsupported(std::iter::once(&config.embedding).chain(&config.next_embedding))
    {
        return Err(InstallError::Refused(problem));
    }
    let mut plan = InstallPlan::default();
    plan_migrations(client, &mut plan).await?;
    plan_embedding_column(client, config, options, &mut plan).await?;
    plan_capture(client, config, &mut plan).await?;
    plan_search(client, config, &mut plan).await?;
    Ok(plan)
}

/// `kbsync.search()` as this config writes it (replaced when its text differs: its
/// fingerprint is its COMMENT), and row-level security as `search.row_level_security`
/// asks.
async fn plan_search(
    client: &impl GenericClient,
    config: &Config,
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    let unknown = search::unknown_text_search_configs(client, config).await?;
    if let Some(source) = config
        .sources()
        .iter()
        .find(|s| unknown.iter().any(|u| u == s.text_search.as_str()))
    {
        return Err(InstallError::Source {
            source_name: source.name.clone(),
            problem: format!(
                "text_search {:?} is not a text search configuration of this database (`SELECT cfgname FROM pg_ts_config` lists them)",
                source.text_search.as_str()
            ),
        });
    }
    let sql = search::function_sql(config);
    let print = fingerprint(&sql);
    let current: Option<String> = client
        .query_opt(
            "SELECT obj_description(p.oid, 'pg_proc')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'kbsync' AND p.proname = 'search'",
            &[],
        )
        .await?
        .and_then(|r| r.get(0));
    if current.as_deref() != Some(print.as_str()) {
        plan.push(
            "create or replace the search function kbsync.search()",
            format!(
                "{sql};\nCOMMENT ON FUNCTION kbsync.search(text, text, vector, integer, text, text[], jsonb, integer, integer) IS '{print}'"
            ),
        );
    }
    // Both tables must have the policy (an upgrade from 0008 has it on one only).
    let (everywhere, anywhere): (bool, bool) = client
        .query_one(
            "SELECT count(*) = 2 AND coalesce(bool_and(guarded), false), coalesce(bool_or(guarded), false)
               FROM (SELECT c.relrowsecurity AND EXISTS (
                                SELECT 1 FROM pg_policy p
                                 WHERE p.polrelid = c.oid AND p.polname = 'kbsync_tenant_isolation') AS guarded
                       FROM pg_class c
                      WHERE c.oid IN (to_regclass('public.tenant_knowledge'), to_regclass('kbsync.knowledge_terms'))) tables",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    match (config.search.row_level_security, everywhere, anywhere) {
        (true, false, _) => plan.push(
            "enable row-level security on tenant_knowledge and kbsync.knowledge_terms (each session sees the tenant in kbsync.tenant)",
            format!("{};\n{}", search::NO_ROW_LEVEL_SECURITY_SQL, search::ROW_LEVEL_SECURITY_SQL),
        ),
        (false, _, true) => plan.push(
            "disable row-level security on tenant_knowledge and kbsync.knowledge_terms (search.row_level_security = false)",
            search::NO_ROW_LEVEL_SECURITY_SQL,
        ),
        _ => {}
    }
    Ok(())
}

async fn plan_migrations(
    client: &impl GenericClient,
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    let has_table = has_migrations_table(client).await?;
    let mut applied = Vec::new();
    if has_table {
        for row in client
            .query(
                "SELECT version, name, checksum FROM kbsync.schema_migrations ORDER BY version",
                &[],
            )
            .await?
        {
            applied.push((
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
            ));
        }
    } else {
        plan.push(
            "create kbsync's migration bookkeeping",
            "CREATE SCHEMA IF NOT EXISTS kbsync;
CREATE TABLE kbsync.schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)",
        );
    }
    for (version, name, sum) in &applied {
        match MIGRATIONS.iter().find(|m| m.version == *version) {
            None => return Err(InstallError::UnknownMigration { version: *version }),
            Some(m) if checksum(m.sql) != *sum => {
                return Err(InstallError::EditedMigration {
                    version: *version,
                    name: name.clone(),
                });
            }
            Some(_) => {}
        }
    }
    for m in MIGRATIONS {
        if applied.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        let record = format!(
            "INSERT INTO kbsync.schema_migrations (version, name, checksum) VALUES ({}, {}, {})",
            m.version,
            SqlLiteral::new(m.name)?,
            SqlLiteral::new(&checksum(m.sql))?
        );
        plan.push(
            format!("migration {:04} {}", m.version, m.name),
            format!("{}\n{record}", m.sql.trim_end()),
        );
    }
    Ok(())
}

async fn plan_embedding_column(
    client: &impl GenericClient,
    config: &Config,
    options: InstallOptions,
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    // During a model migration `embedding` is the active model's: [next_embedding]'s
    // after the cut-over.
    let has_migrations: bool = client
        .query_one(
            "SELECT to_regclass('kbsync.model_migration') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let migrating = if has_migrations {
        crate::model::migration::state(client).await?
    } else {
        None
    };
    let active = crate::model::migration::models(config, migrating.as_ref())?.active;
    let (wanted, wanted_type) = (active.dimensions, active.vector_type());
    let wanted_sql = active.column_type();
    if options.reset_embeddings
        && migrating
            .as_ref()
            .is_some_and(|s| s.phase != crate::model::migration::Phase::Finished)
    {
        return Err(crate::model::migration::ModelMigrationError::Refused(
            "a model migration is running: `kbsync install --reset-embeddings` would clear the vectors it is moving; finish it or roll it back first (`kbsync model status`)".into(),
        )
        .into());
    }
    // None: the table does not exist yet (migration pending); -1: no dimension yet.
    let current = index::column_type(client, "embedding").await?;
    let has_index: bool = client
        .query_one(
            &format!("SELECT to_regclass('public.{HNSW_INDEX}') IS NOT NULL"),
            &[],
        )
        .await?
        .get(0);
    let set_type =
        format!("ALTER TABLE public.tenant_knowledge ALTER COLUMN embedding TYPE {wanted_sql}");
    let create_index = index::create_sql(false, wanted_type);
    let index_step = format!(
        "HNSW index (cosine) on the embedding ({})",
        wanted_type.cosine_ops()
    );
    let drop_index = |plan: &mut InstallPlan, what: &str| {
        if has_index {
            plan.push(what, format!("DROP INDEX public.{HNSW_INDEX}"));
        }
    };
    match current {
        None | Some((_, -1)) => {
            plan.push(format!("embedding column: {wanted_sql}"), set_type);
            drop_index(plan, "drop the old embedding index");
            plan.push(index_step, create_index);
        }
        Some((kind, dim)) if dim == wanted as i32 && kind == wanted_type => {
            // A running daemon that manages the index builds it (concurrently) once its
            // backlog is small; a blocking build here would stop its writes meanwhile.
            if !has_index && !index::managed_by_a_daemon(client).await? {
                plan.push(index_step, create_index);
            }
        }
        Some((kind, dim)) if dim == wanted as i32 => {
            // Same model, another precision: the stored vectors are converted, not
            // sent again (halfvec keeps 2-byte floats; cosine rankings barely move).
            drop_index(plan, "drop the embedding index");
            plan.push(
                format!(
                    "embedding column: {}({dim}) -> {wanted_sql}, every stored vector converted (none sent again)",
                    kind.sql_name()
                ),
                format!("{set_type} USING embedding::{wanted_sql}"),
            );
            plan.push(index_step, create_index);
        }
        Some((kind, dim)) if options.reset_embeddings => {
            drop_index(plan, "drop the embedding index");
            plan.push(
                format!(
                    "clear every embedding (was {}({dim})); chunk texts are kept",
                    kind.sql_name()
                ),
                "UPDATE public.tenant_knowledge SET embedding = NULL, embedding_model = NULL WHERE embedding IS NOT NULL",
            );
            plan.push(
                format!(
                    "embedding column: {}({dim}) -> {wanted_sql}",
                    kind.sql_name()
                ),
                set_type,
            );
            plan.push(index_step, create_index);
        }
        Some((kind, dim)) => {
            return Err(InstallError::DimensionChanged {
                current: format!("{}({dim})", kind.sql_name()),
                current_dimensions: dim,
                wanted: wanted_sql,
                wanted_dimensions: wanted,
            });
        }
    }
    Ok(())
}

/// The capture function and triggers each source should have, against what the
/// catalog has; stale kbsync triggers and functions (sources no longer configured, or
/// moved to another table) are dropped.
///
/// Logical mode wants no trigger but a publication, REPLICA IDENTITY FULL on each
/// source table (so that updates and deletes carry the old row: the relevant-column
/// and filter checks are then exactly the triggers'), and a slot. Switching to logical
/// creates the publication and the slot before the triggers are dropped, so the two
/// captures overlap (a change captured twice is one outbox entry). Switching back
/// creates the triggers before the publication and slot are dropped, but the slot can
/// only be dropped once no daemon holds it: what was committed after the daemons
/// stopped and before the triggers existed is left to the sweep (the step says so).
async fn plan_capture(
    client: &impl GenericClient,
    config: &Config,
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    let sources = config.sources();
    let logical = config.capture.mode == CaptureMode::Logical;
    if logical {
        let current = logical::wal_level(client).await?;
        if current != "logical" {
            return Err(InstallError::WalLevel { current });
        }
    }
    let existing_functions: Vec<(String, Option<String>)> = client
        .query(
            "SELECT p.proname::text, obj_description(p.oid, 'pg_proc')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'kbsync' AND p.proname LIKE 'capture\\_%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let existing_triggers = installed_capture_triggers(client).await?;

    // Desired: (trigger name, table regclass text, create sql)
    let mut desired_triggers = Vec::new();
    // Every table whose changes are captured: the sources' and their related tables.
    let mut captured_tables = Vec::new();
    // Desired capture functions: (name, what it captures, create sql).
    let mut desired_functions: Vec<(String, String, String)> = Vec::new();
    for source in sources {
        let source_error = |problem: String| InstallError::Source {
            source_name: source.name.clone(),
            problem,
        };
        let table_text = source.table.regclass_text();
        let Some((regclass, qualified)) = resolve_table(client, &table_text).await? else {
            return Err(source_error(format!(
                "table {} does not exist in this database",
                source.table
            )));
        };
        check_columns(client, source, &table_text, &source.relevant_columns()).await?;
        // Schema-qualified: the capture functions run with a pinned search_path.
        let mut related_tables = Vec::new();
        let mut related_regclasses = Vec::new();
        for (i, related) in source.related.iter().enumerate() {
            let related_text = related.table.regclass_text();
            let Some((related_regclass, related_qualified)) =
                resolve_table(client, &related_text).await?
            else {
                return Err(source_error(format!(
                    "related.{}.table {} does not exist in this database",
                    related.name, related.table
                )));
            };
            check_columns(client, source, &related_text, &source.related_columns(i)).await?;
            if !has_index_on(client, &related_text, related.references.as_str(), true).await? {
                return Err(source_error(format!(
                    "related.{0}: {1}.{2} is not unique (no primary key or unique index on that column alone), so a row could join several {0} rows; reference a unique column",
                    related.name,
                    related.table,
                    related.references.as_str()
                )));
            }
            if !has_index_on(client, &table_text, related.foreign_key.as_str(), false).await? {
                plan.warnings.push(format!(
                    "sources.{0}: no index on {1} ({2}): every change of a {3} row scans {1} for the rows that reference it, in the writer's transaction. Create one: CREATE INDEX CONCURRENTLY ON {1} ({2})",
                    source.name,
                    source.table,
                    related.foreign_key.as_str(),
                    related.name
                ));
            }
            related_tables.push(related_qualified);
            related_regclasses.push(related_regclass);
        }
        if !logical {
            for def in trigger_defs(source) {
                desired_triggers.push((def.name, regclass.clone(), def.create_sql));
            }
            desired_functions.push((
                function_name(&source.name),
                format!("source {}", source.name),
                function_sql(source, &related_tables),
            ));
            for (i, related) in source.related.iter().enumerate() {
                for def in dependents_trigger_defs(source, i) {
                    desired_triggers.push((
                        def.name,
                        related_regclasses[i].clone(),
                        def.create_sql,
                    ));
                }
                desired_functions.push((
                    dependents_function_name(&source.name, &related.name),
                    format!(
                        "source {}'s related {} ({})",
                        source.name, related.name, related.table
                    ),
                    dependents_function_sql(source, i, &qualified, &related_tables),
                ));
            }
        }
        captured_tables.push(regclass);
        captured_tables.extend(related_regclasses);
    }
    if logical {
        if let Some(problem) = logical::missing_replication_right(client).await? {
            return Err(InstallError::Logical(problem));
        }
        let foreign = logical::tables_not_owned(client, &captured_tables).await?;
        if !foreign.is_empty() {
            let list: Vec<String> = foreign
                .iter()
                .map(|(table, owner)| format!("{table} (owner {owner})"))
                .collect();
            return Err(InstallError::Logical(format!(
                "capture.mode = \"logical\" publishes the source tables, which only their owner may do, and this role does not own {}: run kbsync as the role that owns them (the one the application's migrations use), or have an administrator `GRANT <owner> TO <this role>`",
                list.join(", ")
            )));
        }
        plan_publication(client, &captured_tables, plan).await?;
        plan_slot(client, config, plan).await?;
    }

    let wanted_functions: Vec<&String> = desired_functions.iter().map(|(n, _, _)| n).collect();
    for (name, table, _, _) in &existing_triggers {
        if !desired_triggers
            .iter()
            .any(|(n, t, _)| n == name && t == table)
        {
            plan.push(
                format!(
                    "drop trigger {name} on {table} (its source is no longer configured there)"
                ),
                format!("DROP TRIGGER \"{name}\" ON {table}"),
            );
        }
    }
    for (name, _) in &existing_functions {
        if !wanted_functions.contains(&name) {
            plan.push(
                format!("drop function kbsync.{name} (source no longer configured)"),
                format!("DROP FUNCTION kbsync.\"{name}\"()"),
            );
        }
    }
    for (fname, what, sql) in &desired_functions {
        let print = fingerprint(sql);
        let current = existing_functions.iter().find(|(n, _)| n == fname);
        if current.and_then(|(_, c)| c.as_deref()) != Some(print.as_str()) {
            plan.push(
                format!("capture function for {what}"),
                format!("{sql};\nCOMMENT ON FUNCTION kbsync.\"{fname}\"() IS '{print}'"),
            );
        }
    }
    for (name, table, sql) in &desired_triggers {
        let print = fingerprint(sql);
        let current = existing_triggers
            .iter()
            .find(|(n, t, _, _)| n == name && t == table);
        match current {
            Some((_, _, _, Some(c))) if *c == print => {}
            Some(_) => plan.push(
                format!("replace trigger {name} on {table}"),
                format!("DROP TRIGGER \"{name}\" ON {table};\n{sql};\nCOMMENT ON TRIGGER \"{name}\" ON {table} IS '{print}'"),
            ),
            None => plan.push(
                format!("trigger {name} on {table}"),
                format!("{sql};\nCOMMENT ON TRIGGER \"{name}\" ON {table} IS '{print}'"),
            ),
        }
    }
    if !logical {
        plan_drop_logical(client, config, plan).await?;
    }
    Ok(())
}

/// What `kbsync install` would still change in the capture of the configured sources
/// (triggers, functions, publication, slot): empty when the installed capture is this
/// config's. A source whose table or columns are missing is an error.
pub async fn capture_drift(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Vec<String>, InstallError> {
    let mut plan = InstallPlan::default();
    plan_capture(client, config, &mut plan).await?;
    Ok(plan.steps.into_iter().map(|s| s.description).collect())
}

/// Every kbsync capture trigger in the database: (trigger name, table as regclass
/// text, function name, fingerprint).
pub(crate) async fn installed_capture_triggers(
    client: &impl GenericClient,
) -> Result<Vec<(String, String, String, Option<String>)>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT t.tgname::text, t.tgrelid::regclass::text, p.proname::text,
                    obj_description(t.oid, 'pg_trigger')
               FROM pg_trigger t
               JOIN pg_proc p ON p.oid = t.tgfoid
               JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'kbsync' AND p.proname LIKE 'capture\\_%' AND NOT t.tgisinternal
              ORDER BY 2, 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// Whether kbsync's publication exists.
pub(crate) async fn has_publication(
    client: &impl GenericClient,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&logical::PUBLICATION],
        )
        .await?
        .get(0))
}

/// The publication lists exactly the source tables, each with REPLICA IDENTITY FULL.
async fn plan_publication(
    client: &impl GenericClient,
    source_tables: &[String],
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    let mut wanted: Vec<String> = Vec::new();
    for table in source_tables {
        let row = client
            .query_one(
                "SELECT format('%I.%I', n.nspname, c.relname), c.relreplident::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = $1::text::regclass",
                &[table],
            )
            .await?;
        let qualified: String = row.get(0);
        // A table two sources read, or a source's and another's related table.
        if wanted.contains(&qualified) {
            continue;
        }
        if row.get::<_, String>(1) != "f" {
            plan.push(
                format!(
                    "REPLICA IDENTITY FULL on {qualified} (updates and deletes carry the old row)"
                ),
                format!("ALTER TABLE {qualified} REPLICA IDENTITY FULL"),
            );
        }
        wanted.push(qualified);
    }
    wanted.sort();
    let exists = has_publication(client).await?;
    let list = wanted.join(", ");
    let publication = logical::PUBLICATION;
    if !exists {
        plan.push(
            format!("publication {publication} of the source tables"),
            format!("CREATE PUBLICATION {publication} FOR TABLE {list}"),
        );
        return Ok(());
    }
    let current: Vec<String> = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables
              WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if current != wanted {
        plan.push(
            format!("publication {publication}: the source tables are now {list}"),
            format!("ALTER PUBLICATION {publication} SET TABLE {list}"),
        );
    }
    Ok(())
}

async fn plan_slot(
    client: &impl GenericClient,
    config: &Config,
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    let slot = logical::slot_name(client, config).await?;
    if logical::slot_state(client, &slot).await?.is_none() {
        plan.push_outside_transaction(
            format!("logical replication slot {slot} (pgoutput); the daemon decodes changes from here on"),
            format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                SqlLiteral::new(&slot)?
            ),
        );
    }
    Ok(())
}

/// Trigger mode: no publication, no slot (a slot nobody reads keeps WAL forever).
async fn plan_drop_logical(
    client: &impl GenericClient,
    config: &Config,
    plan: &mut InstallPlan,
) -> Result<(), InstallError> {
    let publication = logical::PUBLICATION;
    if has_publication(client).await? {
        plan.push(
            format!("drop publication {publication} (capture is by triggers)"),
            format!("DROP PUBLICATION {publication}"),
        );
    }
    let slot = logical::slot_name(client, config).await?;
    if let Some(state) = logical::slot_state(client, &slot).await? {
        if state.active {
            return Err(InstallError::SlotActive { slot });
        }
        plan.push_outside_transaction(
            format!(
                "drop replication slot {slot} (capture is by triggers now; a slot nobody reads keeps WAL forever). Changes committed after the last daemon stopped decoding and before the triggers existed were captured by neither: run `kbsync reconcile` now"
            ),
            format!(
                "SELECT pg_drop_replication_slot({})",
                SqlLiteral::new(&slot)?
            ),
        );
    }
    Ok(())
}

/// A table by the name the config gives it: (regclass text, schema-qualified name),
/// None when the database has no such table.
async fn resolve_table(
    client: &impl GenericClient,
    table_text: &str,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT c.oid::regclass::text, format('%I.%I', n.nspname, c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = to_regclass($1)",
            &[&table_text],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Whether a valid index of the table has `column` as its first key column; with
/// `unique_alone`, a unique index on that column alone, without a predicate (what
/// makes the column a key another table can reference).
async fn has_index_on(
    client: &impl GenericClient,
    table_text: &str,
    column: &str,
    unique_alone: bool,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                             WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND a.attname = $2
                               AND (NOT $3 OR (i.indisunique AND i.indnkeyatts = 1
                                               AND i.indpred IS NULL AND i.indexprs IS NULL)))",
            &[&table_text, &column, &unique_alone],
        )
        .await?
        .get(0))
}

async fn check_columns(
    client: &impl GenericClient,
    source: &Source,
    table_text: &str,
    columns: &[crate::config::sql_ident::Ident],
) -> Result<(), InstallError> {
    for column in columns {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute
                                 WHERE attrelid = to_regclass($1) AND attname = $2
                                   AND attnum > 0 AND NOT attisdropped)",
                &[&table_text, &column.as_str()],
            )
            .await?
            .get(0);
        if !exists {
            return Err(InstallError::Source {
                source_name: source.name.clone(),
                problem: format!("column {column} does not exist in table {table_text}"),
            });
        }
    }
    Ok(())
}

/// Plan and apply, under an advisory lock so that two installs never interleave:
/// everything in one transaction, except creating or dropping a replication slot,
/// which PostgreSQL runs only outside one (see `plan_capture` for the order). Returns the steps that were applied (empty: nothing to do).
pub async fn apply(
    client: &mut Client,
    config: &Config,
    options: InstallOptions,
) -> Result<InstallPlan, InstallError> {
    // Literals in trigger DDL are escaped for standard strings.
    client
        .batch_execute("SET standard_conforming_strings = on")
        .await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&INSTALL_LOCK])
        .await?;
    let applied = apply_locked(client, config, options).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&INSTALL_LOCK])
        .await?;
    applied
}

async fn apply_locked(
    client: &mut Client,
    config: &Config,
    options: InstallOptions,
) -> Result<InstallPlan, InstallError> {
    let plan = plan(&*client, config, options).await?;
    run_plan(client, &plan).await?;
    Ok(plan)
}

/// Run `plan`'s steps: each run of in-transaction steps in one transaction, the others
/// alone between them.
pub(crate) async fn run_plan(client: &mut Client, plan: &InstallPlan) -> Result<(), InstallError> {
    for group in plan.groups() {
        if group[0].outside_transaction {
            for step in group {
                tracing::debug!(step = %step.description, "install");
                client.batch_execute(&step.sql).await?;
            }
            continue;
        }
        let tx = client.transaction().await?;
        for step in group {
            tracing::debug!(step = %step.description, "install");
            tx.batch_execute(&step.sql).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Whether every migration this binary knows is applied (the daemon refuses to start
/// otherwise: it never runs DDL itself).
pub async fn schema_is_current(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let has_table = has_migrations_table(client).await?;
    if !has_table {
        return Ok(false);
    }
    let applied: i64 = client
        .query_one("SELECT count(*) FROM kbsync.schema_migrations", &[])
        .await?
        .get(0);
    Ok(applied as usize == MIGRATIONS.len())
}
