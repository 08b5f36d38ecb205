//! Parked keys: those whose retry time has come go back into the outbox (the same
//! path as any change); those with no retry left are reported.

use kbsync_core::config::Source;
use kbsync_core::outbox;
use kbsync_core::sync::source_rows::RowSql;
use tokio_postgres::GenericClient;

use crate::report::{PermanentFailure, SourceReport};
use crate::scope::{ReconcileError, Scope};

pub(crate) struct DeadLetterScan {
    /// $1 source, $2 tenant → the ids of the dead letters whose retry time has come.
    due: String,
    /// $1 source, $2 tenant → up to five permanent failures and their total.
    permanent: String,
}

impl DeadLetterScan {
    pub(crate) fn new(rows: &RowSql) -> Self {
        // --tenant: the key's row must belong to the tenant (a gone row has none).
        let of_tenant = format!(
            "($2::text IS NULL OR EXISTS (SELECT 1 FROM {from} WHERE {key_matches} AND {tenant}::text = $2))",
            from = rows.from,
            key_matches = rows.key_compare("=", "d.source_key", false),
            tenant = rows.tenant,
        );
        Self {
            due: format!(
                "SELECT d.id FROM kbsync.dead_letters d
                  WHERE d.source = $1 AND d.next_retry_at <= now() AND {of_tenant}"
            ),
            permanent: format!(
                "SELECT d.source_key, d.error, d.attempts, d.retries, count(*) OVER ()
                   FROM kbsync.dead_letters d
                  WHERE d.source = $1 AND d.next_retry_at IS NULL AND {of_tenant}
                    AND NOT EXISTS (SELECT 1 FROM kbsync.outbox o
                                     WHERE o.source = d.source AND o.scope = 'row' AND o.source_key = d.source_key)
                  ORDER BY d.last_failed_at DESC
                  LIMIT 5"
            ),
        }
    }
}

pub(crate) async fn sweep(
    client: &impl GenericClient,
    source: &Source,
    scan: &DeadLetterScan,
    scope: &Scope<'_>,
    report: &mut SourceReport,
) -> Result<(), ReconcileError> {
    let due: Vec<i64> = client
        .query(&scan.due, &[&source.name, &scope.tenant])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    report.dead_letters_retried = if scope.dry_run {
        due.len() as u64
    } else {
        outbox::replay_dead_letters(client, source, &due).await?
    };
    let rows = client
        .query(&scan.permanent, &[&source.name, &scope.tenant])
        .await?;
    report.dead_letters_permanent = rows.first().map_or(0, |r| r.get::<_, i64>(4) as u64);
    report.permanent_examples = rows
        .iter()
        .map(|r| PermanentFailure {
            key: r.get(0),
            error: r.get(1),
            attempts: r.get(2),
            retries: r.get(3),
        })
        .collect();
    Ok(())
}
