//! Sources that no batch can get through until someone fixes something — a column the
//! config names is gone, the role may not read the table — recorded by the daemon that
//! found them and shown by `kbsync status`, so a stuck source is seen with what to do.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;

#[derive(Debug, Clone)]
pub struct SourceProblem {
    pub source: String,
    /// The server's own message.
    pub error: String,
    /// What to do about it.
    pub fix: String,
    pub since: DateTime<Utc>,
    /// The latest attempt that failed.
    pub checked_at: DateTime<Utc>,
}

/// What to do about `err`, a failure of `source`'s own statements that waiting does
/// not fix by itself.
pub fn fix_for(source: &str, err: &tokio_postgres::Error, retry: std::time::Duration) -> String {
    let retry = humantime_serde::re::humantime::format_duration(retry);
    let code = err.code();
    if code == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        return format!(
            "grant the daemon's role SELECT on the table of sources.{source} (and on its tenant.via table); the daemon tries again every {retry} (daemon.broken_source_retry)"
        );
    }
    if code.is_some_and(|c| c.code().starts_with("42")) {
        return format!(
            "sources.{source} names a table, column or expression the database does not have: correct the config (text, filter, tenant, metadata) or the table, check it with `kbsync config check`, run `kbsync install`, then restart the daemon (systemctl reload kbsync); it tries again every {retry} meanwhile"
        );
    }
    format!(
        "the statements of sources.{source} fail; fix the cause above; the daemon tries again every {retry} (daemon.broken_source_retry)"
    )
}

/// Record (or refresh) that `source` is stuck on `error`.
pub async fn record(
    client: &impl GenericClient,
    source: &str,
    error: &str,
    fix: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO kbsync.source_problems (source, error, fix) VALUES ($1, $2, $3)
             ON CONFLICT (source) DO UPDATE
                SET error = EXCLUDED.error, fix = EXCLUDED.fix, checked_at = now(),
                    since = CASE WHEN kbsync.source_problems.error = EXCLUDED.error
                                 THEN kbsync.source_problems.since ELSE now() END",
            &[&source, &error, &fix],
        )
        .await
        .map(drop)
}

/// `source` went through again: forget its problem. Returns whether it had one.
pub async fn clear(
    client: &impl GenericClient,
    source: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .execute(
            "DELETE FROM kbsync.source_problems WHERE source = $1",
            &[&source],
        )
        .await?
        > 0)
}

/// Every recorded problem, by source.
pub async fn list(
    client: &impl GenericClient,
) -> Result<Vec<SourceProblem>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT source, error, fix, since, checked_at FROM kbsync.source_problems ORDER BY source",
            &[],
        )
        .await?
        .iter()
        .map(|r| SourceProblem {
            source: r.get(0),
            error: r.get(1),
            fix: r.get(2),
            since: r.get(3),
            checked_at: r.get(4),
        })
        .collect())
}
