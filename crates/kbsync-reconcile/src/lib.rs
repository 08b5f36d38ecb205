//! The reconciliation sweep: kbsync's safety net, usable without the daemon.
//!
//! Per source: first one statement compares the source with its chunks by
//! fingerprint ([`fingerprint`]); a source that matches is done. Otherwise, in key
//! ranges (one short statement per range; never one query per row, never a table in
//! memory):
//! 1. rows → chunks: eligible rows with missing or stale chunks, or chunks without an
//!    embedding, are queued in the outbox the triggers write, for the daemon
//!    ([`missing_and_stale`]);
//! 2. chunks → rows: chunks whose row is gone or no longer eligible are counted, then
//!    deleted unless they are too large a share of the source ([`orphans`]);
//! 3. parked keys whose retry time has come are queued again ([`dead_letters`]).
//!
//! One sweep at a time across all daemons (a session advisory lock); every sweep is
//! recorded in `kbsync.reconcile_runs` ([`runs`]).

pub mod coverage;
mod dead_letters;
mod fingerprint;
mod missing_and_stale;
mod orphans;
pub mod report;
pub mod runs;
mod scope;
mod text_present;

use std::time::Instant;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use kbsync_core::config::Config;
use kbsync_core::schema::install::schema_is_current;
use kbsync_core::sync::chunk;
use kbsync_core::sync::source_rows::RowSql;

pub use report::{Report, SafetyStop, SourceReport, StaleKeys};
pub use runs::{RunRecord, recent_runs};
use scope::Scope;
pub use scope::{Options, Origin, ReconcileError};

/// The advisory lock that makes sweeps exclusive.
pub const SWEEP_LOCK: i64 = kbsync_core::db::advisory_locks::SWEEP;

pub use kbsync_core::progress::{Progress, Quiet};

/// Run one sweep on `client`'s session. Returns `Busy` at once when another sweep
/// holds the lock. The report says per source what was found and done; a safety
/// stop is in the report, not an error (everything else was still repaired).
pub async fn sweep(
    client: &mut Client,
    config: &Config,
    options: &Options,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<Report, ReconcileError> {
    if !schema_is_current(&*client).await? {
        return Err(ReconcileError::SchemaNotInstalled);
    }
    for name in &options.sources {
        config
            .source_named(name)
            .map_err(ReconcileError::UnknownSource)?;
    }
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
        .await?
        .get(0);
    if !locked {
        return Err(ReconcileError::Busy);
    }
    let started = Instant::now();
    let recorded_options = serde_json::json!({
        "sources": options.sources, "tenant": options.tenant, "force": options.force,
        "queue_only": options.queue_only,
    });
    let run_id = runs::start(&*client, options.dry_run, options.origin, &recorded_options).await?;
    let mut report = Report {
        run_id,
        dry_run: options.dry_run,
        ..Report::default()
    };
    let outcome = sweep_sources(client, config, options, progress, cancel, &mut report).await;
    progress.finish();
    report.duration_ms = started.elapsed().as_millis() as u64;
    let error = outcome.as_ref().err().map(ToString::to_string);
    // A Report is plain data with string keys: serialising it cannot fail; if it did,
    // the run would be recorded with an empty object, and its outcome still returned.
    let counts = serde_json::to_value(&report).unwrap_or_default();
    let recorded = runs::finish(&*client, run_id, &counts, error.as_deref()).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_LOCK])
        .await?;
    outcome?;
    recorded?;
    Ok(report)
}

async fn sweep_sources(
    client: &mut Client,
    config: &Config,
    options: &Options,
    progress: &dyn Progress,
    cancel: &CancellationToken,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let scope = Scope {
        dry_run: options.dry_run,
        force: options.force,
        tenant: options.tenant.as_deref(),
        range_size: config.reconcile.range_size,
        max_delete_fraction: config.reconcile.max_delete_fraction,
        cancel,
    };
    let sources: Vec<_> = config
        .sources()
        .iter()
        .filter(|s| options.sources.is_empty() || options.sources.contains(&s.name))
        .collect();
    // The model whose vectors `embedding` holds: [next_embedding]'s after a model
    // cut-over. A chunk of another model is stale. The chunking stays [embedding]'s.
    let models = kbsync_core::model::migration::current_models(&*client, config).await?;
    let model = models.active.model.as_str();
    for source in &sources {
        let rows = RowSql::prepare(&*client, source).await?;
        if rows.key_type.is_none() {
            return Err(ReconcileError::MissingTable {
                source_name: source.name.clone(),
                table: source.table.to_string(),
            });
        }
        let mut found = SourceReport::new(&source.name);
        let fingerprint = chunk::fingerprint_for(source, config);

        progress.step(&source.name, "fingerprint", None);
        let compared = fingerprint::compare(
            &*client,
            source,
            &fingerprint::FingerprintScan::new(&rows),
            scope.tenant,
            &fingerprint,
            model,
        )
        .await?;
        if compared.in_sync {
            found.in_sync_by_fingerprint = true;
            found.rows = compared.rows;
            found.chunks = compared.chunks;
        } else {
            progress.step(&source.name, "rows", Some(compared.rows));
            let scan = missing_and_stale::RowScan::new(&rows);
            missing_and_stale::sweep(
                &*client,
                source,
                &scan,
                &scope,
                &fingerprint,
                model,
                &mut found,
                progress,
            )
            .await?;

            if !options.queue_only {
                progress.step(&source.name, "chunks", Some(compared.chunks));
                let scan = orphans::OrphanScan::new(&rows);
                orphans::sweep(client, source, &scan, &scope, &mut found, progress).await?;
            }
        }

        if !options.queue_only {
            let scan = dead_letters::DeadLetterScan::new(&rows);
            dead_letters::sweep(&*client, source, &scan, &scope, &mut found).await?;
        }

        tracing::debug!(
            source = %source.name, dry_run = scope.dry_run,
            rows = found.rows, chunks = found.chunks, missing = found.missing,
            stale = found.stale.total(), missing_embeddings = found.missing_embeddings,
            queued = found.queued, orphan_chunks = found.orphan_chunks, deleted = found.deleted_chunks,
            dead_letters_retried = found.dead_letters_retried,
            dead_letters_permanent = found.dead_letters_permanent,
            safety_stop = found.safety_stop.is_some(),
            "reconciled"
        );
        report.sources.push(found);
    }
    if options.sources.is_empty() {
        let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
        report.unknown_sources = client
            .query(
                "SELECT source, count(*) FROM public.tenant_knowledge
                  WHERE NOT (source = ANY($1)) AND ($2::text IS NULL OR tenant_id = $2)
                  GROUP BY source ORDER BY source",
                &[&names, &scope.tenant],
            )
            .await?
            .iter()
            .map(|r| report::UnknownSource {
                source: r.get(0),
                chunks: r.get(1),
            })
            .collect();
    }
    Ok(())
}
