//! Chunks → source rows: walk a source's chunks in key ranges and count those whose
//! row is gone or no longer eligible. Only when the whole source has been counted is
//! anything deleted, so a misconfigured filter that would orphan most of a source is
//! caught by the safety stop before the first chunk goes.

use kbsync_core::config::Source;
use kbsync_core::sync::source_rows::RowSql;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel};

use crate::report::{SafetyStop, SourceReport};
use crate::scope::{ReconcileError, Scope};
use kbsync_core::progress::Progress;

pub(crate) struct OrphanScan {
    /// $1 source, $2 lower bound (exclusive) → upper bound of the next `$3 + 1` chunks.
    range_end: &'static str,
    /// $1 source, $2 lower (exclusive), $3 upper (inclusive), $4 tenant → chunks,
    /// orphaned chunks, orphaned keys.
    count: String,
    /// Same parameters: delete that range's orphans, eligibility re-checked.
    delete: String,
}

const RANGE_END: &str = "SELECT source_key FROM public.tenant_knowledge
     WHERE source = $1 AND ($2::text IS NULL OR source_key > $2)
     ORDER BY source_key OFFSET $3 LIMIT 1";

const IN_RANGE: &str = "k.source = $1 AND ($2::text IS NULL OR k.source_key > $2)
       AND ($3::text IS NULL OR k.source_key <= $3) AND ($4::text IS NULL OR k.tenant_id = $4)";

/// Tries of one range's delete when it collides with a daemon writing the same keys.
const DELETE_TRIES: u32 = 5;

impl OrphanScan {
    pub(crate) fn new(rows: &RowSql) -> Self {
        let orphan = format!(
            "NOT EXISTS (SELECT 1 FROM {from} WHERE {key_matches} AND {eligible})",
            from = rows.from,
            key_matches = rows.key_compare("=", "k.source_key", false),
            eligible = rows.eligible,
        );
        Self {
            range_end: RANGE_END,
            count: format!(
                "SELECT count(*), count(*) FILTER (WHERE orphan), count(DISTINCT source_key) FILTER (WHERE orphan)
                   FROM (SELECT k.source_key, {orphan} AS orphan
                           FROM public.tenant_knowledge k WHERE {IN_RANGE}) s"
            ),
            delete: format!("DELETE FROM public.tenant_knowledge k WHERE {IN_RANGE} AND {orphan}"),
        }
    }
}

type Range = (Option<String>, Option<String>);

pub(crate) async fn sweep(
    client: &mut Client,
    source: &Source,
    scan: &OrphanScan,
    scope: &Scope<'_>,
    report: &mut SourceReport,
    progress: &dyn Progress,
) -> Result<(), ReconcileError> {
    let range = scope.range_size as i64;
    let mut with_orphans: Vec<Range> = Vec::new();
    let mut lower: Option<String> = None;
    loop {
        if scope.cancel.is_cancelled() {
            return Err(ReconcileError::Cancelled);
        }
        let upper: Option<String> = client
            .query_opt(scan.range_end, &[&source.name, &lower, &(range - 1)])
            .await?
            .map(|r| r.get(0));
        let row = client
            .query_one(&scan.count, &[&source.name, &lower, &upper, &scope.tenant])
            .await
            .map_err(|e| not_a_key(e, source))?;
        let (chunks, orphan_chunks, orphan_keys): (i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2));
        report.chunks += chunks as u64;
        report.orphan_chunks += orphan_chunks as u64;
        report.orphan_keys += orphan_keys as u64;
        if orphan_chunks > 0 {
            with_orphans.push((lower.clone(), upper.clone()));
        }
        progress.advance(range as u64);
        match upper {
            Some(u) => lower = Some(u),
            None => break,
        }
    }
    if report.orphan_chunks == 0 {
        return Ok(());
    }
    let share = report.orphan_chunks as f64 / report.chunks as f64;
    if share > scope.max_delete_fraction && !scope.force {
        tracing::error!(
            source = %source.name, orphans = report.orphan_chunks, chunks = report.chunks,
            "safety stop: the sweep would delete {:.0}% of this source's chunks (limit {:.0}%); nothing deleted. Check the source's filter and table; rerun with --force if it is right",
            share * 100.0, scope.max_delete_fraction * 100.0
        );
        report.safety_stop = Some(SafetyStop {
            share,
            limit: scope.max_delete_fraction,
        });
        return Ok(());
    }
    if scope.dry_run {
        return Ok(());
    }
    for (lower, upper) in &with_orphans {
        report.deleted_chunks +=
            delete_range(client, scan, source, lower, upper, scope.tenant).await?;
    }
    Ok(())
}

/// Delete one range's orphans in a REPEATABLE READ transaction: if a daemon rewrote
/// one of those chunks after our snapshot (the row came back meanwhile), PostgreSQL
/// refuses the delete with a serialization failure instead of deleting fresh
/// chunks, and the range is tried again with a new snapshot.
async fn delete_range(
    client: &mut Client,
    scan: &OrphanScan,
    source: &Source,
    lower: &Option<String>,
    upper: &Option<String>,
    tenant: Option<&str>,
) -> Result<u64, ReconcileError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .await?;
        let result = tx
            .execute(&scan.delete, &[&source.name, lower, upper, &tenant])
            .await;
        match result {
            Ok(n) => {
                tx.commit().await?;
                return Ok(n);
            }
            Err(e)
                if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                    && tries < DELETE_TRIES =>
            {
                tracing::debug!(source = %source.name, "orphan delete collided with a write; retrying");
                drop(tx);
            }
            Err(e) => return Err(not_a_key(e, source)),
        }
    }
}

/// A chunk whose source_key is not even a valid key of the source table was not
/// written by kbsync; say so instead of a bare cast error.
fn not_a_key(e: tokio_postgres::Error, source: &Source) -> ReconcileError {
    if e.code() == Some(&SqlState::INVALID_TEXT_REPRESENTATION) {
        return ReconcileError::ForeignChunks {
            source_name: source.name.clone(),
            detail: kbsync_core::db::describe(&e),
        };
    }
    e.into()
}
