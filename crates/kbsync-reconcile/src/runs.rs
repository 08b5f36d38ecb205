//! `kbsync.reconcile_runs`: one row per sweep, written when it starts and when it
//! ends (with its counts, or its error), read back by `kbsync status`.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::scope::Origin;

pub(crate) async fn start(
    client: &impl GenericClient,
    dry_run: bool,
    origin: Origin,
    options: &serde_json::Value,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "INSERT INTO kbsync.reconcile_runs (dry_run, origin, options) VALUES ($1, $2, $3) RETURNING id",
            &[&dry_run, &origin.as_str(), options],
        )
        .await?
        .get(0))
}

pub(crate) async fn finish(
    client: &impl GenericClient,
    id: i64,
    counts: &serde_json::Value,
    error: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE kbsync.reconcile_runs SET finished_at = clock_timestamp(), counts = $2, error = $3 WHERE id = $1",
            &[&id, counts, &error],
        )
        .await?;
    Ok(())
}

/// A recorded sweep.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    /// None: still running, or the process died mid-sweep.
    pub finished_at: Option<DateTime<Utc>>,
    pub dry_run: bool,
    pub origin: String,
    pub options: serde_json::Value,
    /// The sweep's `Report` as JSON.
    pub counts: serde_json::Value,
    pub error: Option<String>,
}

/// The latest `limit` sweeps, newest first.
pub async fn recent_runs(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<RunRecord>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT id, started_at, finished_at, dry_run, origin, options, counts, error
               FROM kbsync.reconcile_runs ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| RunRecord {
            id: r.get(0),
            started_at: r.get(1),
            finished_at: r.get(2),
            dry_run: r.get(3),
            origin: r.get(4),
            options: r.get(5),
            counts: r.get(6),
            error: r.get(7),
        })
        .collect())
}
