//! The HNSW index on `tenant_knowledge.embedding`: its state, and the statements with
//! which a daemon drops it for a large backlog and builds it back in bulk.
//!
//! Why: HNSW maintained row by row costs several times a bulk build of the same
//! vectors (pgvector inserts each vector into the graph with its own search), so a
//! first backfill into an indexed table ran at a tenth of its speed without the index.
//! Search stays exact meanwhile: without a valid index every query is an exact scan
//! (`kbsync search` always is one).
//!
//! One daemon at a time manages the index: the one holding `INDEX_LOCK` on its own
//! session. The build runs on that same session with `CREATE INDEX CONCURRENTLY`, so
//! kbsync keeps writing meanwhile. A daemon killed during the build leaves the build
//! running on the server (the backend does not look for its client until the statement
//! ends), and the lock with it: the build finishes, valid, and no other daemon touches
//! the index until it has. Only a server crash can leave an invalid index behind; the
//! managing daemon drops it and builds again.

use tokio_postgres::GenericClient;

use crate::config::VectorType;

/// The index's name in `public`.
pub const HNSW_INDEX: &str = "tenant_knowledge_embedding_hnsw";

/// Held by the daemon that manages the index.
pub const INDEX_LOCK: i64 = crate::db::advisory_locks::INDEX;

/// The build parameters of every embedding index kbsync makes. Why not pgvector's
/// default ef_construction 64: with one tenant holding half of 200,000 chunks, its
/// filtered searches found 0.945 of the exact 10 nearest on a 64 graph and 0.96 on a
/// 128 one, for twice the build time (`just bench search-tenants`, BENCHMARKS.md).
pub const HNSW_OPTIONS: &str = "m = 16, ef_construction = 128";

/// `CREATE INDEX` for the embedding index of a column of `vector_type`; `CONCURRENTLY`
/// where kbsync's writes must go on meanwhile (it cannot run in a transaction block).
pub fn create_sql(concurrently: bool, vector_type: VectorType) -> String {
    format!(
        "CREATE INDEX {}IF NOT EXISTS {HNSW_INDEX} ON public.tenant_knowledge USING hnsw (embedding {}) WITH ({HNSW_OPTIONS})",
        if concurrently { "CONCURRENTLY " } else { "" },
        vector_type.cosine_ops()
    )
}

/// The pgvector type and dimension (-1: none declared) of `tenant_knowledge.{column}`,
/// as the catalog has it; None when there is no such column. Another type is an error
/// that names it: kbsync made the column, so someone changed it by hand.
pub async fn column_type(
    client: &impl GenericClient,
    column: &str,
) -> Result<Option<(VectorType, i32)>, ColumnTypeError> {
    let Some(row) = client
        .query_opt(
            "SELECT t.typname::text, a.atttypmod FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = to_regclass('public.tenant_knowledge') AND a.attname = $1
                AND NOT a.attisdropped",
            &[&column],
        )
        .await?
    else {
        return Ok(None);
    };
    let name: String = row.get(0);
    let vector_type = VectorType::from_sql_name(&name).ok_or_else(|| ColumnTypeError::Other {
        column: column.to_owned(),
        type_name: name.clone(),
    })?;
    Ok(Some((vector_type, row.get(1))))
}

#[derive(Debug, thiserror::Error)]
pub enum ColumnTypeError {
    #[error("database error: {}", crate::db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "tenant_knowledge.{column} is of type {type_name}, not pgvector's vector or halfvec: it was changed outside kbsync; `kbsync install --reset-embeddings` makes it what the config says (the chunks' texts are kept, their vectors cleared)"
    )]
    Other { column: String, type_name: String },
    #[error("tenant_knowledge has no column {column}: run `kbsync install`")]
    Missing { column: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum IndexState {
    /// Valid: the planner uses it.
    Valid,
    /// A `CREATE INDEX CONCURRENTLY` is running; `done` of `total` tuples or blocks of
    /// its current phase.
    Building {
        phase: String,
        done: i64,
        total: i64,
    },
    /// Invalid and nothing is building it: a build was interrupted by a server crash
    /// or a cancel. Maintained on every write and used by no query.
    Invalid,
    /// No index: every search is an exact scan.
    Missing,
}

impl IndexState {
    /// Share of the current build phase done, when one is running and reports it.
    pub fn percent(&self) -> Option<f64> {
        match self {
            IndexState::Building { done, total, .. } if *total > 0 => {
                Some((*done as f64 / *total as f64 * 100.0).min(100.0))
            }
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            IndexState::Valid => "valid",
            IndexState::Building { .. } => "building",
            IndexState::Invalid => "invalid",
            IndexState::Missing => "missing",
        }
    }
}

pub async fn state(client: &impl GenericClient) -> Result<IndexState, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT i.indisvalid, p.phase,
                    CASE WHEN p.tuples_total > 0 THEN p.tuples_done ELSE p.blocks_done END,
                    CASE WHEN p.tuples_total > 0 THEN p.tuples_total ELSE p.blocks_total END,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                             WHERE a.datname = current_database() AND a.state = 'active'
                               AND a.query = $2)
               FROM pg_catalog.pg_index i
               LEFT JOIN pg_catalog.pg_stat_progress_create_index p
                      ON p.relid = i.indrelid AND p.index_relid = i.indexrelid
              WHERE i.indexrelid = to_regclass($1)",
            &[&format!("public.{HNSW_INDEX}"), &drop_sql()],
        )
        .await?;
    Ok(match row {
        None => IndexState::Missing,
        // DROP INDEX CONCURRENTLY marks the index invalid first, then waits for the
        // queries using it: no query plans with it any more, it is as good as gone.
        Some(row) if !row.get::<_, bool>(0) && row.get::<_, bool>(4) => IndexState::Missing,
        Some(row) => match (row.get::<_, bool>(0), row.get::<_, Option<String>>(1)) {
            (_, Some(phase)) => IndexState::Building {
                phase,
                done: row.get::<_, Option<i64>>(2).unwrap_or(0),
                total: row.get::<_, Option<i64>>(3).unwrap_or(0),
            },
            (true, None) => IndexState::Valid,
            (false, None) => IndexState::Invalid,
        },
    })
}

/// Whether a daemon holds `INDEX_LOCK` in this database (it manages the index).
pub async fn managed_by_a_daemon(
    client: &impl GenericClient,
) -> Result<bool, tokio_postgres::Error> {
    crate::db::advisory_locks::held(client, INDEX_LOCK).await
}

/// Changes waiting: outbox entries plus captured changes not yet folded into it, each
/// counted up to `cap` (the outbox may hold millions).
pub async fn backlog(client: &impl GenericClient, cap: i64) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM kbsync.outbox LIMIT $1) pending)
                  + (SELECT count(*) FROM (SELECT 1 FROM kbsync.changes LIMIT $1) uncollected)",
            &[&cap],
        )
        .await?
        .get(0))
}

/// Chunks stored, from the statistics system (kept current by every write, no scan).
pub async fn stored_chunks(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT COALESCE(pg_catalog.pg_stat_get_live_tuples(to_regclass('public.tenant_knowledge')), 0)",
            &[],
        )
        .await?
        .get(0))
}

/// What the daemon should do with the index, given its state, the backlog and the
/// chunks stored. Inserting a vector into HNSW costs about three times its share of a
/// bulk build (measured at 1536 dimensions: ~90 s row by row for 20,000 vectors, ~27 s
/// to build), so dropping and rebuilding pays when the backlog is at least half the
/// chunks already stored, and the backlog is at least `defer_above`. With
/// `defer_above` = 0 the daemon leaves the index alone (the user manages it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexPlan {
    Keep,
    Defer,
    Build,
    DropInvalid,
}

/// The backlog below which a deferred index is built: a tenth of `defer_above`.
pub fn build_below(defer_above: u64) -> i64 {
    (defer_above / 10).max(1) as i64
}

pub fn plan(state: &IndexState, backlog: i64, stored: i64, defer_above: u64) -> IndexPlan {
    if defer_above == 0 {
        return IndexPlan::Keep;
    }
    match state {
        IndexState::Valid if backlog >= defer_above as i64 && backlog * 2 >= stored => {
            IndexPlan::Defer
        }
        IndexState::Missing if backlog < build_below(defer_above) => IndexPlan::Build,
        IndexState::Invalid => IndexPlan::DropInvalid,
        _ => IndexPlan::Keep,
    }
}

/// The statement that drops the index; `state` recognises it running.
fn drop_sql() -> String {
    format!("DROP INDEX CONCURRENTLY IF EXISTS public.{HNSW_INDEX}")
}

/// `DROP INDEX CONCURRENTLY`: waits for queries using the index, blocks none.
pub async fn drop_concurrently(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(&drop_sql()).await
}

/// Build the index concurrently with `memory_mb` of `maintenance_work_mem` (the graph
/// must fit, or pgvector builds far slower) and up to `workers` parallel workers.
pub async fn build_concurrently(
    client: &impl GenericClient,
    memory_mb: u64,
    workers: u32,
) -> Result<(), ColumnTypeError> {
    client
        .execute(
            "SELECT set_config('maintenance_work_mem', $1, false),
                    set_config('max_parallel_maintenance_workers', $2, false),
                    set_config('statement_timeout', '0', false)",
            &[&format!("{memory_mb}MB"), &workers.to_string()],
        )
        .await?;
    // The build must outlive a killed daemon: no looking for the client meanwhile.
    client
        .execute(
            "SELECT set_config('client_connection_check_interval', '0', false)
              WHERE current_setting('client_connection_check_interval', true) IS NOT NULL",
            &[],
        )
        .await?;
    let (vector_type, _) =
        column_type(client, "embedding")
            .await?
            .ok_or_else(|| ColumnTypeError::Missing {
                column: "embedding".into(),
            })?;
    Ok(client.batch_execute(&create_sql(true, vector_type)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_as_large_as_half_the_table_defers_the_index() {
        let valid = IndexState::Valid;
        assert_eq!(plan(&valid, 20_000, 0, 10_000), IndexPlan::Defer);
        assert_eq!(plan(&valid, 20_000, 40_000, 10_000), IndexPlan::Defer);
        // Small next to what is stored: row by row is cheaper than a rebuild.
        assert_eq!(plan(&valid, 20_000, 40_001, 10_000), IndexPlan::Keep);
        assert_eq!(plan(&valid, 9_999, 0, 10_000), IndexPlan::Keep);
        assert_eq!(plan(&valid, 1_000_000, 0, 0), IndexPlan::Keep);
    }

    #[test]
    fn a_missing_index_is_built_once_the_backlog_is_small() {
        let missing = IndexState::Missing;
        assert_eq!(plan(&missing, 1_000, 0, 10_000), IndexPlan::Keep);
        assert_eq!(plan(&missing, 999, 0, 10_000), IndexPlan::Build);
        assert_eq!(
            plan(&missing, 0, 0, 0),
            IndexPlan::Keep,
            "defer_above = 0: the user's"
        );
        assert_eq!(plan(&missing, 0, 0, 5), IndexPlan::Build);
    }

    #[test]
    fn an_invalid_index_is_dropped_and_a_running_build_left_alone() {
        assert_eq!(plan(&IndexState::Invalid, 0, 0, 10), IndexPlan::DropInvalid);
        assert_eq!(plan(&IndexState::Invalid, 0, 0, 0), IndexPlan::Keep);
        let building = IndexState::Building {
            phase: "building index".into(),
            done: 5,
            total: 20,
        };
        assert_eq!(plan(&building, 0, 0, 10), IndexPlan::Keep);
        assert_eq!(building.percent(), Some(25.0));
    }
}
