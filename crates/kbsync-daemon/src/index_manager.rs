//! The embedding index's keeper: drops the HNSW index when a backlog large enough
//! that a bulk build is cheaper arrives, and builds it back, concurrently, once the
//! backlog is worked off (`kbsync_core::search::index`). One daemon at a time does
//! this, the one that holds the index lock on its session; the others wait for it.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use kbsync_core::config::IndexConfig;
use kbsync_core::search::index::{self, ColumnTypeError, INDEX_LOCK, IndexPlan, IndexState};

/// How often the keeper looks at the backlog and the index.
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// Manage the index until cancelled (`Ok`) or a database error (the caller reconnects;
/// the lock goes with the session).
pub async fn run(
    client: &Client,
    config: &IndexConfig,
    cancel: &CancellationToken,
) -> Result<(), ColumnTypeError> {
    // Another daemon manages it: look again now and then, in case it stops.
    loop {
        let won: bool = client
            .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&INDEX_LOCK])
            .await?
            .get(0);
        if won {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(LOOK_EVERY * 5) => {}
        }
    }
    loop {
        let state = index::state(client).await?;
        publish(&state);
        let stored = index::stored_chunks(client).await?;
        let cap = match state {
            IndexState::Valid => (config.defer_above as i64).max((stored + 1) / 2),
            _ => index::build_below(config.defer_above),
        };
        let backlog = index::backlog(client, cap).await?;
        match index::plan(&state, backlog, stored, config.defer_above) {
            IndexPlan::Keep => {}
            IndexPlan::Defer => {
                tracing::info!(
                    backlog,
                    stored,
                    "a large backlog: dropping the embedding index, to build it in bulk afterwards (search is exact meanwhile)"
                );
                index::drop_concurrently(client).await?;
                metrics::counter!("kbsync_index_deferrals_total").increment(1);
            }
            IndexPlan::DropInvalid => {
                tracing::warn!(
                    "the embedding index is invalid (a build was interrupted): dropping it to build it again"
                );
                index::drop_concurrently(client).await?;
            }
            IndexPlan::Build => {
                tracing::info!(
                    stored,
                    memory_mb = config.build_memory_mb,
                    workers = config.build_workers,
                    "building the embedding index"
                );
                publish(&IndexState::Building {
                    phase: "starting".into(),
                    done: 0,
                    total: 0,
                });
                let started = std::time::Instant::now();
                let build =
                    index::build_concurrently(client, config.build_memory_mb, config.build_workers);
                // On shutdown the build is left to finish on the server (the session
                // keeps the lock until it has): stopping it would leave an invalid index.
                tokio::select! {
                    _ = cancel.cancelled() => {
                        tracing::info!("stopping during the index build: the server finishes it");
                        return Ok(());
                    }
                    built = build => built?,
                }
                metrics::histogram!("kbsync_index_build_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "the embedding index is built"
                );
                continue;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

/// Set `kbsync_embedding_index{state}`: 1 for `state`, 0 for the others.
pub fn publish(state: &IndexState) {
    for name in ["valid", "building", "invalid", "missing"] {
        metrics::gauge!("kbsync_embedding_index", "state" => name).set(if state.name() == name {
            1.0
        } else {
            0.0
        });
    }
}
