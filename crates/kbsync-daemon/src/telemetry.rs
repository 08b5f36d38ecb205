//! Prometheus metrics. Counters and histograms are recorded where things happen
//! (through the `metrics` facade: the embedding client, the batch, the sweep); the
//! backlog gauges are read from the database when `/metrics` is scraped, so they are
//! never stale and cost nothing between scrapes.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_postgres::GenericClient;

/// Seconds from a change to its chunks being written (includes the debounce window).
pub const SYNC_LAG: &str = "kbsync_sync_lag_seconds";
const LAG_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const REQUEST_BUCKETS: [f64; 9] = [0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process's metrics recorder, installed on first use.
pub fn handle() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(SYNC_LAG.into()), &LAG_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("kbsync_embedding_request_seconds".into()),
                        &REQUEST_BUCKETS,
                    )
                })
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("installing the metrics recorder: {e}"))?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "kbsync_notifications_total",
        "NOTIFY wake-ups received by the listener"
    );
    describe_counter!(
        "kbsync_changes_total",
        "Source row changes written (edits folded into one outbox entry each count)"
    );
    describe_counter!(
        "kbsync_keys_processed_total",
        "Outbox entries processed and acknowledged; changes_total / keys_processed_total is the debounce coalescing"
    );
    describe_counter!(
        "kbsync_batches_total",
        "Batches processed, by source and outcome (ok, provider_error, database_error, chunking_error, source_broken)"
    );
    describe_counter!("kbsync_chunks_written_total", "Chunks inserted or updated");
    describe_gauge!(
        "kbsync_embedding_index",
        "The HNSW embedding index's state at the last scrape: 1 for the current one of valid, building, invalid, missing; 0 for the others"
    );
    describe_counter!(
        "kbsync_index_deferrals_total",
        "Times the embedding index was dropped for a backlog, to be built in bulk afterwards"
    );
    describe_histogram!(
        "kbsync_index_build_seconds",
        Unit::Seconds,
        "Time of each concurrent build of the embedding index"
    );
    describe_counter!(
        "kbsync_chunks_deleted_total",
        "Chunks deleted (rows gone, filtered out, or texts that got shorter)"
    );
    describe_counter!(
        "kbsync_dead_lettered_total",
        "Keys parked in kbsync.dead_letters after max_attempts"
    );
    describe_histogram!(
        SYNC_LAG,
        Unit::Seconds,
        "From a key's last change to its chunks being written (includes the debounce window)"
    );
    describe_counter!(
        "kbsync_embedding_requests_total",
        "Embedding requests sent, by provider (local model: forward passes)"
    );
    describe_counter!("kbsync_embedding_inputs_total", "Texts sent to be embedded");
    describe_counter!(
        "kbsync_embeddings_reused_total",
        "Texts not sent: the same text was already stored with the model (another key's, another tenant's)"
    );
    describe_counter!(
        "kbsync_embedding_tokens_total",
        "Tokens of the texts sent to be embedded"
    );
    describe_counter!(
        "kbsync_embedding_errors_total",
        "Failed embedding requests, by kind"
    );
    describe_counter!(
        "kbsync_embedding_retries_total",
        "Embedding requests retried after a transient failure"
    );
    describe_histogram!(
        "kbsync_embedding_request_seconds",
        Unit::Seconds,
        "Duration of one embedding request (local model: one forward pass)"
    );
    describe_gauge!(
        "kbsync_outbox_backlog",
        "Outbox entries waiting (in a window, claimed or retrying)"
    );
    describe_gauge!(
        "kbsync_uncollected_changes",
        "Captured changes not collected into the outbox yet (growing: no daemon collects them)"
    );
    describe_gauge!(
        "kbsync_outbox_oldest_pending_seconds",
        "Age of the oldest change waiting in the outbox or not yet collected"
    );
    describe_counter!(
        "kbsync_changes_collected_total",
        "Captured changes moved from kbsync.changes into the outbox"
    );
    describe_gauge!("kbsync_dead_letters", "Keys parked in kbsync.dead_letters");
    describe_counter!(
        "kbsync_reconcile_runs_total",
        "Reconcile sweeps this daemon's schedule started, by outcome (ok, safety_stop, busy, error)"
    );
    describe_counter!(
        "kbsync_reconcile_keys_total",
        "Keys the scheduled sweeps found, by action (missing, stale, missing_embedding, orphan_chunks, dead_letter_retried)"
    );
    describe_gauge!("kbsync_ready", "1 when /readyz would answer ready, else 0");
    describe_gauge!(
        "kbsync_source_broken",
        "1 while a source's statements fail in a way waiting alone does not fix (a missing column, no privilege); kbsync status says what to do"
    );
    describe_counter!(
        "kbsync_rejected_keys_total",
        "Keys whose write PostgreSQL refused (counted against their attempts)"
    );
    describe_counter!(
        "kbsync_changes_decoded_total",
        "Changes decoded from the replication slot (capture.mode = logical)"
    );
    describe_gauge!(
        "kbsync_replication_slot_retained_bytes",
        Unit::Bytes,
        "WAL the replication slot holds back (capture.mode = logical)"
    );
    describe_gauge!(
        "kbsync_replication_slot_unconfirmed_bytes",
        Unit::Bytes,
        "WAL decoded but not yet confirmed to the server (capture.mode = logical)"
    );
    describe_gauge!(
        "kbsync_model_migration_phase",
        "The embedding model migration's phase: 0 none, 1 filling, 2 cut over, 3 finished"
    );
    describe_gauge!(
        "kbsync_model_migration_chunks_missing",
        "Chunks still without the other model's vector"
    );
    describe_gauge!(
        "kbsync_model_migration_texts_missing",
        "Distinct texts still without the other model's vector"
    );
    describe_gauge!(
        "kbsync_model_migration_texts_sent",
        "Texts sent to fill a model migration, by model"
    );
    describe_gauge!(
        "kbsync_model_migration_tokens_sent",
        "Tokens sent to fill a model migration, by model"
    );
    describe_gauge!(
        "kbsync_model_migration_requests_sent",
        "Requests sent to fill a model migration, by model"
    );
}

/// Every series the daemon exports, at zero, so that dashboards and alerts see them from
/// the start rather than from their first use: an alert on a series that does not exist
/// yet never fires.
pub fn register_series(sources: &[String], logical: bool) {
    use metrics::{counter, gauge, histogram};
    for name in [
        "kbsync_notifications_total",
        "kbsync_changes_collected_total",
        "kbsync_embedding_inputs_total",
        "kbsync_embedding_tokens_total",
        "kbsync_embedding_retries_total",
        "kbsync_index_deferrals_total",
    ] {
        counter!(name).increment(0);
    }
    for provider in ["openai", "local"] {
        counter!("kbsync_embedding_requests_total", "provider" => provider).increment(0);
    }
    for kind in [
        "rate_limited",
        "server_error",
        "refused",
        "transport",
        "malformed",
        "mismatch",
    ] {
        counter!("kbsync_embedding_errors_total", "kind" => kind).increment(0);
    }
    for outcome in ["ok", "safety_stop", "busy", "error"] {
        counter!("kbsync_reconcile_runs_total", "outcome" => outcome).increment(0);
    }
    // Registered is enough: the exporter renders a histogram with no samples as zeros.
    drop(histogram!("kbsync_embedding_request_seconds"));
    drop(histogram!("kbsync_index_build_seconds"));
    gauge!("kbsync_ready").set(0.0);
    gauge!("kbsync_model_migration_phase").set(0.0);
    for state in ["valid", "building", "invalid", "missing"] {
        gauge!("kbsync_embedding_index", "state" => state).set(0.0);
    }
    if logical {
        gauge!("kbsync_replication_slot_retained_bytes").set(0.0);
        gauge!("kbsync_replication_slot_unconfirmed_bytes").set(0.0);
    }
    for source in sources {
        let s = || source.clone();
        for outcome in [
            "ok",
            "provider_error",
            "database_error",
            "chunking_error",
            "source_broken",
        ] {
            counter!("kbsync_batches_total", "source" => s(), "outcome" => outcome).increment(0);
        }
        for name in [
            "kbsync_changes_total",
            "kbsync_keys_processed_total",
            "kbsync_chunks_written_total",
            "kbsync_chunks_deleted_total",
            "kbsync_dead_lettered_total",
            "kbsync_rejected_keys_total",
            "kbsync_embeddings_reused_total",
        ] {
            counter!(name, "source" => s()).increment(0);
        }
        if logical {
            counter!("kbsync_changes_decoded_total", "source" => s()).increment(0);
        }
        for action in [
            "missing",
            "stale",
            "missing_embedding",
            "orphan_chunks",
            "dead_letter_retried",
        ] {
            counter!("kbsync_reconcile_keys_total", "source" => s(), "action" => action)
                .increment(0);
        }
        drop(histogram!(SYNC_LAG, "source" => s()));
        for name in [
            "kbsync_outbox_backlog",
            "kbsync_uncollected_changes",
            "kbsync_outbox_oldest_pending_seconds",
            "kbsync_dead_letters",
            "kbsync_source_broken",
        ] {
            gauge!(name, "source" => s()).set(0.0);
        }
    }
}

/// Set `kbsync_embedding_index{state}` from the catalog (whether or not this daemon
/// keeps the index).
pub async fn refresh_index(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    crate::index_manager::publish(&kbsync_core::search::index::state(client).await?);
    Ok(())
}

/// Set the backlog gauges from the database.
pub async fn refresh_backlog(
    client: &impl GenericClient,
    sources: &[String],
) -> Result<(), tokio_postgres::Error> {
    for b in kbsync_reconcile::coverage::backlog(client, sources).await? {
        let source = b.source.clone();
        metrics::gauge!("kbsync_outbox_backlog", "source" => source.clone()).set(b.pending as f64);
        metrics::gauge!("kbsync_uncollected_changes", "source" => source.clone())
            .set(b.uncollected as f64);
        metrics::gauge!("kbsync_outbox_oldest_pending_seconds", "source" => source.clone())
            .set(b.oldest_seconds);
        metrics::gauge!("kbsync_dead_letters", "source" => source).set(b.dead_letters as f64);
    }
    Ok(())
}

/// Set the model migration's gauges from the database: its phase (0 none, 1 filling,
/// 2 cut over, 3 finished), the chunks and texts still without the other model's
/// vector, and what was sent to fill them.
pub async fn refresh_model_migration(
    client: &impl GenericClient,
) -> Result<(), kbsync_core::model::migration::ModelMigrationError> {
    use kbsync_core::model::migration::{self, Phase};
    let Some(progress) = migration::progress_if_any(client).await? else {
        metrics::gauge!("kbsync_model_migration_phase").set(0.0);
        return Ok(());
    };
    let s = &progress.state;
    metrics::gauge!("kbsync_model_migration_phase").set(match s.phase {
        Phase::Filling => 1.0,
        Phase::CutOver => 2.0,
        Phase::Finished => 3.0,
    });
    metrics::gauge!("kbsync_model_migration_chunks_missing").set(progress.chunks_missing as f64);
    metrics::gauge!("kbsync_model_migration_texts_missing").set(progress.texts_missing as f64);
    for (model, texts, tokens, requests) in [
        (&s.to_model, s.to_texts, s.to_tokens, s.to_requests),
        (&s.from_model, s.from_texts, s.from_tokens, s.from_requests),
    ] {
        metrics::gauge!("kbsync_model_migration_texts_sent", "model" => model.clone())
            .set(texts as f64);
        metrics::gauge!("kbsync_model_migration_tokens_sent", "model" => model.clone())
            .set(tokens as f64);
        metrics::gauge!("kbsync_model_migration_requests_sent", "model" => model.clone())
            .set(requests as f64);
    }
    Ok(())
}
