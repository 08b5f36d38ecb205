//! One worker: claim a ready batch from some source, process it while keeping its
//! lease alive, apply the batch-failure policy, and when nothing is ready sleep until a
//! wake-up, the next window closing, or the fallback poll.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tokio::sync::watch;
use tracing::Instrument;

use kbsync_core::config::{ProviderKind, Source};
use kbsync_core::db;
use kbsync_core::outbox;

use crate::batch::{self, BatchError};
use crate::batch_failure::{self, HealthEffect};
use crate::batch_sizing::BatchSizer;
use crate::leases::{give_back, with_lease};
use crate::shared::{Shared, connect_with_retry};

pub(crate) async fn worker(
    n: usize,
    shared: Arc<Shared>,
    mut wake: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let daemon = &shared.config.daemon;
    let mut provider_failures: u32 = 0;
    let mut db_failures: i32 = -1;
    'connect: loop {
        // After a database error, pause before reconnecting so a persistent fault
        // (say, a source table dropped) does not turn into a hot loop.
        if db_failures >= 0 {
            let delay = outbox::retry_delay(db_failures).min(Duration::from_secs(30));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        db_failures += 1;
        let Some(mut client) = connect_with_retry(&shared.url, &cancel, &shared.health).await
        else {
            return;
        };
        // A second connection renews leases while the first is busy with a batch.
        let Some(lease_client) = connect_with_retry(&shared.url, &cancel, &shared.health).await
        else {
            return;
        };
        let mut first_source = n;
        let mut unclaimable_passes: u32 = 0;
        let mut sizer =
            BatchSizer::new(daemon.batch_size, daemon.batch_duration).in_requests_of(match shared
                .config
                .embedding
                .provider
            {
                ProviderKind::Openai => shared.config.embedding.max_inputs_per_request,
                // The local model packs whatever it gets; a request is not a unit.
                ProviderKind::Local => 1,
            });
        loop {
            if cancel.is_cancelled() {
                return;
            }
            wake.borrow_and_update();
            let mut did_work = false;
            // Priority tenants' ready work first, across all sources; then everyone's.
            let priority = shared.priority_tenants();
            let tiers: Vec<Option<&[String]>> = if priority.is_empty() {
                vec![None]
            } else {
                vec![Some(priority.as_slice()), None]
            };
            for tier in tiers {
                if did_work {
                    break;
                }
                for offset in 0..shared.pipelines.len() {
                    let pipeline =
                        &shared.pipelines[(first_source + offset) % shared.pipelines.len()];
                    if shared.paused(&pipeline.source.name) {
                        continue;
                    }
                    let token = Uuid::new_v4();
                    let claimed = match outbox::claim(
                        &client,
                        &pipeline.source,
                        token,
                        daemon.claim_lease,
                        sizer.next() as i64,
                        tier,
                    )
                    .await
                    {
                        Ok(c) => {
                            shared.health.database_ok();
                            c
                        }
                        Err(e) => {
                            shared.health.database_failed(&db::describe(&e));
                            tracing::warn!(error = %db::describe(&e), "claiming from the outbox failed; reconnecting");
                            continue 'connect;
                        }
                    };
                    if claimed.is_empty() {
                        continue;
                    }
                    did_work = true;
                    let span = tracing::info_span!("batch", source = %pipeline.source.name, keys = claimed.len());
                    let models = shared.models.current();
                    let work = batch::process(
                        &mut client,
                        pipeline,
                        &models,
                        &shared.failure_policy,
                        token,
                        &claimed,
                    );
                    let started = std::time::Instant::now();
                    let result = with_lease(&lease_client, token, daemon.claim_lease, work)
                        .instrument(span.clone())
                        .await;
                    match result {
                        Ok(report) => {
                            metrics::counter!("kbsync_batches_total", "source" => pipeline.source.name.clone(), "outcome" => "ok").increment(1);
                            shared.source_ok(&client, &pipeline.source.name).await;
                            shared.keys_done.fetch_add(
                                claimed.len() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            if report.inputs_embedded > 0 {
                                shared.health.provider_ok();
                            }
                            provider_failures = 0;
                            db_failures = -1;
                            sizer.record(
                                claimed.len(),
                                started
                                    .elapsed()
                                    .saturating_sub(report.remote_embedding_time),
                                report.remote_embedding_time,
                            );
                            tracing::debug!(
                                source = %pipeline.source.name,
                                keys = claimed.len(),
                                embedded = report.inputs_embedded,
                                written = report.chunks_written,
                                deleted = report.chunks_deleted,
                                failed = report.failed,
                                dead_lettered = report.dead_lettered,
                                "batch done"
                            );
                        }
                        Err(err) => {
                            let failure =
                                batch_failure::diagnose(&err, &client, &shared, models.generation)
                                    .await;
                            let response = batch_failure::respond(
                                failure,
                                provider_failures,
                                daemon.broken_source_retry,
                            );
                            provider_failures = response.provider_failures;
                            let source = &pipeline.source.name;
                            if let Some(outcome) = response.outcome {
                                metrics::counter!("kbsync_batches_total", "source" => source.clone(), "outcome" => outcome).increment(1);
                            }
                            let error = match &err {
                                BatchError::Db(e) => db::describe(e),
                                other => other.to_string(),
                            };
                            if response.is_error {
                                tracing::error!(source = %source, %error, retry_in = ?response.retry_in, "{}", response.what_happens);
                            } else {
                                tracing::info!(source = %source, %error, "{}", response.what_happens);
                            }
                            match response.health {
                                HealthEffect::ProviderFailed => {
                                    shared.health.provider_failed(&error)
                                }
                                HealthEffect::DatabaseFailed => {
                                    shared.health.database_failed(&error)
                                }
                                HealthEffect::None | HealthEffect::SourceBroken => {}
                            }
                            if let (HealthEffect::SourceBroken, BatchError::Db(e)) =
                                (response.health, &err)
                            {
                                // Pauses the source, records it, gives the batch back.
                                shared
                                    .source_broken(
                                        &lease_client,
                                        token,
                                        source,
                                        e,
                                        response.retry_in,
                                    )
                                    .await;
                            } else {
                                give_back(&lease_client, token, response.retry_in, &error).await;
                            }
                            if response.reconnect {
                                continue 'connect;
                            }
                        }
                    }
                }
            }
            first_source = first_source.wrapping_add(1);
            if did_work {
                unclaimable_passes = 0;
                continue;
            }
            let wait = match next_ready(&client, &shared).await {
                // Entries that are due but could not be claimed are locked by a
                // transaction still open (an application's that touched them again, or
                // a write of ours outliving its lease). Back off instead of spinning
                // until that transaction ends: 20 ms doubling to the fallback poll.
                Ok(NextReady::Overdue) => {
                    unclaimable_passes = unclaimable_passes.saturating_add(1);
                    Duration::from_millis(10)
                        .saturating_mul(1 << unclaimable_passes.min(12))
                        .min(daemon.fallback_poll)
                }
                Ok(NextReady::In(wait)) => {
                    unclaimable_passes = 0;
                    wait.min(daemon.fallback_poll)
                }
                Err(e) => {
                    shared.health.database_failed(&db::describe(&e));
                    tracing::warn!(error = %db::describe(&e), "reading the outbox failed; reconnecting");
                    continue 'connect;
                }
            };
            // A wake-up means changes arrived; none of them can be ready before the
            // shortest window has passed, so look then (at once with a window of 0),
            // not at every wake-up: under a stream of writes that would be a claim
            // and an outbox scan per worker per fold.
            let mut deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = wake.changed() => {
                        if changed.is_err() {
                            tokio::time::sleep_until(deadline).await;
                            break;
                        }
                        deadline = deadline.min(tokio::time::Instant::now() + shared.shortest_window);
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
    }
}

/// Time until the earliest pending window closes, over all sources.
enum NextReady {
    /// Some entry is due now, yet the pass before claimed nothing.
    Overdue,
    /// The next entry is due in this long (or the fallback poll: nothing pending).
    In(Duration),
}

async fn next_ready(client: &Client, shared: &Shared) -> Result<NextReady, tokio_postgres::Error> {
    let sources: Vec<&Source> = shared.pipelines.iter().map(|p| &p.source).collect();
    Ok(match outbox::seconds_until_ready(client, &sources).await? {
        Some(secs) if secs <= 0.0 => NextReady::Overdue,
        // A little slack so the window has surely closed when we look.
        Some(secs) => NextReady::In(Duration::from_secs_f64(secs) + Duration::from_millis(5)),
        None => NextReady::In(shared.config.daemon.fallback_poll),
    })
}
