//! What is behind, per source, at a glance: eligible source rows vs rows that have
//! chunks, chunks without an embedding, the outbox backlog and its oldest change,
//! parked keys, and the last sweep. Shown by `kbsync status` and served by the daemon
//! at `/api/chunking-health`; one count query per measure per source.

use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use kbsync_core::config::Config;
use kbsync_core::sync::source_rows::RowSql;

use crate::runs;
use crate::scope::ReconcileError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCoverage {
    pub source: String,
    /// Source rows that exist, pass the filter and have a tenant.
    pub eligible_rows: i64,
    /// Of those, rows with at least one chunk.
    pub rows_with_chunks: i64,
    /// rows_with_chunks / eligible_rows (1 when there are none).
    pub coverage: f64,
    pub chunks: i64,
    pub chunks_without_embedding: i64,
    /// Outbox entries waiting (in a window, claimed, or retrying).
    pub backlog: i64,
    /// Changes the capture triggers recorded that no daemon has collected into the
    /// outbox yet (normally gone within milliseconds; growing: no daemon is running).
    pub uncollected_changes: i64,
    /// Age of the oldest change in the backlog or not yet collected, in seconds (0
    /// when there is none).
    pub oldest_pending_seconds: f64,
    pub dead_letters: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastSweep {
    pub id: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub origin: String,
    pub dry_run: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    pub sources: Vec<SourceCoverage>,
    pub last_reconcile: Option<LastSweep>,
}

/// The outbox and dead letters of one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    pub source: String,
    /// Outbox entries (in a window, claimed, or retrying).
    pub pending: i64,
    /// Of those, claimed by a daemon right now.
    pub claimed: i64,
    /// Of those, waiting for a retry after a failure.
    pub retrying: i64,
    /// Captured changes not collected into the outbox yet.
    pub uncollected: i64,
    /// Age of the oldest change in the backlog or not yet collected, in seconds (0
    /// when there is none).
    pub oldest_seconds: f64,
    pub dead_letters: i64,
}

/// The backlog of each of `sources`, in one cheap query (the outbox through its
/// indexes; the change log, which has none, is a few pages while a daemon runs).
pub async fn backlog(
    client: &impl GenericClient,
    sources: &[String],
) -> Result<Vec<Backlog>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT s.name,
                    count(o.source_key),
                    count(o.source_key) FILTER (WHERE o.claim_token IS NOT NULL AND o.claimed_until > now()),
                    count(o.source_key) FILTER (WHERE o.next_attempt_at > now()),
                    COALESCE(EXTRACT(EPOCH FROM now() - LEAST(min(o.first_changed_at), min(c.oldest)))::float8, 0),
                    (SELECT count(*) FROM kbsync.dead_letters d WHERE d.source = s.name),
                    COALESCE(min(c.n), 0)
               FROM unnest($1::text[]) AS s(name)
               LEFT JOIN kbsync.outbox o ON o.source = s.name
               LEFT JOIN LATERAL (SELECT count(*) AS n, min(changed_at) AS oldest
                                    FROM kbsync.changes WHERE source = s.name) c ON true
              GROUP BY s.name ORDER BY s.name",
            &[&sources],
        )
        .await?
        .iter()
        .map(|r| Backlog {
            source: r.get(0),
            pending: r.get(1),
            claimed: r.get(2),
            retrying: r.get(3),
            oldest_seconds: r.get(4),
            dead_letters: r.get(5),
            uncollected: r.get(6),
        })
        .collect())
}

pub async fn coverage(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Coverage, ReconcileError> {
    let mut sources = Vec::new();
    for source in config.sources() {
        let rows = RowSql::prepare(client, source).await?;
        if rows.key_type.is_none() {
            return Err(ReconcileError::MissingTable {
                source_name: source.name.clone(),
                table: source.table.to_string(),
            });
        }
        let eligible = client
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE EXISTS (
                                SELECT 1 FROM public.tenant_knowledge k
                                 WHERE k.source = $1 AND k.source_key = {key}::text))
                       FROM {from} WHERE {eligible}",
                    key = rows.key,
                    from = rows.from,
                    eligible = rows.eligible,
                ),
                &[&source.name],
            )
            .await?;
        let chunks = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE embedding IS NULL)
                   FROM public.tenant_knowledge WHERE source = $1",
                &[&source.name],
            )
            .await?;
        let waiting = backlog(client, std::slice::from_ref(&source.name))
            .await?
            .remove(0);
        let (eligible_rows, rows_with_chunks): (i64, i64) = (eligible.get(0), eligible.get(1));
        sources.push(SourceCoverage {
            coverage: if eligible_rows == 0 {
                1.0
            } else {
                rows_with_chunks as f64 / eligible_rows as f64
            },
            source: source.name.clone(),
            eligible_rows,
            rows_with_chunks,
            chunks: chunks.get(0),
            chunks_without_embedding: chunks.get(1),
            backlog: waiting.pending,
            uncollected_changes: waiting.uncollected,
            oldest_pending_seconds: waiting.oldest_seconds,
            dead_letters: waiting.dead_letters,
        });
    }
    let last_reconcile = runs::recent_runs(client, 1)
        .await?
        .into_iter()
        .next()
        .map(|run| LastSweep {
            id: run.id,
            started_at: run.started_at.to_rfc3339(),
            finished_at: run.finished_at.map(|t| t.to_rfc3339()),
            origin: run.origin,
            dry_run: run.dry_run,
            error: run.error,
        });
    Ok(Coverage {
        sources,
        last_reconcile,
    })
}
