//! The reconcile sweep on `reconcile.schedule`, inside the daemon, and its metrics.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use kbsync_reconcile::{Options, Origin, Quiet, ReconcileError, SourceReport};

use crate::shared::{Shared, connect_with_retry};

/// The reconcile sweep on `reconcile.schedule`. A sweep another daemon is running is
/// skipped (the lock makes them exclusive); a failed sweep is logged and recorded in
/// kbsync.reconcile_runs, and the next one runs on schedule.
pub(crate) async fn scheduled_sweeps(
    schedule: cron::Schedule,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let options = Options {
        dry_run: false,
        force: false,
        sources: Vec::new(),
        tenant: None,
        origin: Origin::Schedule,
        queue_only: false,
    };
    loop {
        // Recomputed after each sweep: a sweep longer than the interval skips the
        // times it overran instead of running back to back.
        let Some(next) = schedule.upcoming(chrono::Utc).next() else {
            tracing::warn!("reconcile.schedule has no future time; no scheduled sweeps");
            cancel.cancelled().await;
            return;
        };
        // Negative only when `next` passed while we computed it: then sweep now.
        let wait = (next - chrono::Utc::now()).to_std().unwrap_or_default();
        tracing::debug!(%next, "next scheduled reconcile sweep");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(mut client) = connect_with_retry(&shared.url, &cancel, &shared.health).await
        else {
            return;
        };
        match kbsync_reconcile::sweep(&mut client, &shared.config, &options, &Quiet, &cancel).await
        {
            Ok(report) => {
                record_sweep(&report);
                let total = |f: fn(&SourceReport) -> u64| report.sources.iter().map(f).sum::<u64>();
                tracing::info!(
                    run = report.run_id,
                    duration_ms = report.duration_ms,
                    missing = total(|s| s.missing),
                    stale = total(|s| s.stale.total()),
                    missing_embeddings = total(|s| s.missing_embeddings),
                    queued = total(|s| s.queued),
                    deleted = total(|s| s.deleted_chunks),
                    dead_letters_retried = total(|s| s.dead_letters_retried),
                    dead_letters_permanent = total(|s| s.dead_letters_permanent),
                    "scheduled reconcile sweep done"
                );
                for (source, stop) in report.safety_stops() {
                    tracing::error!(
                        source,
                        share = stop.share,
                        limit = stop.limit,
                        "reconcile safety stop: orphans not deleted; check the source's filter, then run `kbsync reconcile --force` if it is right"
                    );
                }
            }
            Err(ReconcileError::Busy) => {
                metrics::counter!("kbsync_reconcile_runs_total", "outcome" => "busy").increment(1);
                tracing::info!("scheduled reconcile sweep skipped: another sweep is running");
            }
            Err(ReconcileError::Cancelled) => return,
            Err(e) => {
                metrics::counter!("kbsync_reconcile_runs_total", "outcome" => "error").increment(1);
                tracing::error!(error = %e, "scheduled reconcile sweep failed");
            }
        }
    }
}

fn record_sweep(report: &kbsync_reconcile::Report) {
    let outcome = if report.safety_stops().next().is_some() {
        "safety_stop"
    } else {
        "ok"
    };
    metrics::counter!("kbsync_reconcile_runs_total", "outcome" => outcome).increment(1);
    for s in &report.sources {
        for (action, n) in [
            ("missing", s.missing),
            ("stale", s.stale.total()),
            ("missing_embedding", s.missing_embeddings),
            ("orphan_chunks", s.orphan_chunks),
            ("dead_letter_retried", s.dead_letters_retried),
        ] {
            metrics::counter!("kbsync_reconcile_keys_total", "source" => s.source.clone(), "action" => action)
                .increment(n);
        }
    }
}
