//! The batch-failure policy: what a batch that could not be written means for its claims,
//! the daemon's health, the batch metric and the worker's connection — one pure function
//! (`respond`), tested without a database; `diagnose` only finds out which failure it was.

use std::time::Duration;

use tokio_postgres::Client;

use kbsync_core::db::{self, ErrorKind};
use kbsync_core::outbox;

use crate::batch::BatchError;
use crate::shared::Shared;

/// Why a batch was not written, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The embedding provider failed (after the provider client's own retries).
    Provider,
    /// A model cut-over, rollback or finish committed while the batch ran: nothing was
    /// written with the model that is no longer active.
    Superseded,
    /// The chunking thread panicked: a bug, so not retried at once.
    Chunking,
    /// A statement failed on a live connection with an error no retry fixes: a missing
    /// column, no privilege — the source's fault, not a key's (a key PostgreSQL rejects
    /// is failed on its own inside the batch).
    SourceBroken,
    /// The connection or the server.
    Database { connection_lost: bool },
}

/// What the health state records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HealthEffect {
    None,
    ProviderFailed,
    DatabaseFailed,
    /// `Shared::source_broken`: the source paused, recorded for `kbsync status`.
    SourceBroken,
}

/// The policy's answer for one failed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Response {
    /// The `outcome` label of `kbsync_batches_total`; `None` when the batch is not a
    /// failure (it is redone with the model now active).
    pub outcome: Option<&'static str>,
    /// When the batch's keys are claimable again (no attempt is counted against them).
    pub retry_in: Duration,
    pub health: HealthEffect,
    /// Consecutive provider failures after this one (the provider backoff's exponent).
    pub provider_failures: u32,
    /// The worker's connection must be made again before anything else.
    pub reconnect: bool,
    /// Logged as an error (something an operator should see), else as information.
    pub is_error: bool,
    pub what_happens: &'static str,
}

/// The one place that maps a failed batch to its delay, health, metric and reconnect.
pub(crate) fn respond(
    failure: Failure,
    provider_failures: u32,
    broken_source_retry: Duration,
) -> Response {
    let base = Response {
        outcome: None,
        retry_in: Duration::ZERO,
        health: HealthEffect::None,
        provider_failures,
        reconnect: false,
        is_error: true,
        what_happens: "",
    };
    match failure {
        Failure::Provider => {
            let failures = provider_failures.saturating_add(1);
            Response {
                outcome: Some("provider_error"),
                // retry_delay caps its exponent at 8; min keeps the cast exact.
                retry_in: outbox::retry_delay(failures.min(64) as i32),
                health: HealthEffect::ProviderFailed,
                provider_failures: failures,
                what_happens: "embedding provider failed; the batch is retried later",
                ..base
            }
        }
        Failure::Superseded => Response {
            is_error: false,
            what_happens: "the embedding model switched during the batch; redoing it with the active model",
            ..base
        },
        Failure::Chunking => Response {
            outcome: Some("chunking_error"),
            retry_in: Duration::from_secs(30),
            what_happens: "chunking a batch failed; it is retried in 30 s",
            ..base
        },
        Failure::SourceBroken => Response {
            outcome: Some("source_broken"),
            retry_in: broken_source_retry,
            health: HealthEffect::SourceBroken,
            what_happens: "a statement of the source failed; its batches wait until it is fixed",
            ..base
        },
        Failure::Database { connection_lost } => Response {
            outcome: Some("database_error"),
            retry_in: Duration::from_secs(1),
            health: HealthEffect::DatabaseFailed,
            reconnect: connection_lost,
            what_happens: "database error while processing a batch; it is retried",
            ..base
        },
    }
}

/// Which failure `err` is. A database error on a live connection is first checked
/// against the migration state: a cut-over renames the columns a batch's statements name.
pub(crate) async fn diagnose(
    err: &BatchError,
    client: &Client,
    shared: &Shared,
    batch_generation: i64,
) -> Failure {
    match err {
        BatchError::Provider(_) => Failure::Provider,
        BatchError::Chunking(_) => Failure::Chunking,
        BatchError::ModelChanged => {
            if let Err(e) = shared.models.refresh(client).await {
                tracing::error!(error = %e, "reading the model migration failed");
            }
            Failure::Superseded
        }
        BatchError::Db(e) => {
            if db::connection_failed(client, e) {
                return Failure::Database {
                    connection_lost: true,
                };
            }
            match shared.models.refresh(client).await {
                Ok(()) if shared.models.current().generation != batch_generation => {
                    return Failure::Superseded;
                }
                Ok(()) => {}
                // The batch's error is what gets reported; this one only means the
                // migration state is not known to have moved.
                Err(refresh) => {
                    tracing::warn!(error = %refresh, "reading the model migration after a failed batch failed");
                }
            }
            if db::classify(e) == ErrorKind::Fatal {
                Failure::SourceBroken
            } else {
                Failure::Database {
                    connection_lost: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKEN_RETRY: Duration = Duration::from_secs(60);

    #[test]
    fn provider_failures_back_off_further_each_time_and_mark_the_provider_failed() {
        let first = respond(Failure::Provider, 0, BROKEN_RETRY);
        let second = respond(Failure::Provider, first.provider_failures, BROKEN_RETRY);
        assert_eq!(first.provider_failures, 1);
        assert_eq!(second.provider_failures, 2);
        assert!(
            second.retry_in > first.retry_in,
            "{first:?} then {second:?}"
        );
        assert_eq!(first.health, HealthEffect::ProviderFailed);
        assert_eq!(first.outcome, Some("provider_error"));
        assert!(!first.reconnect);
        let many = respond(Failure::Provider, 1_000, BROKEN_RETRY);
        assert_eq!(
            many.retry_in,
            Duration::from_secs(300),
            "capped at five minutes"
        );
    }

    #[test]
    fn a_batch_superseded_by_a_model_switch_is_redone_at_once_and_is_not_a_failure() {
        let r = respond(Failure::Superseded, 3, BROKEN_RETRY);
        assert_eq!(r.retry_in, Duration::ZERO);
        assert_eq!(r.outcome, None);
        assert_eq!(r.health, HealthEffect::None);
        assert_eq!(r.provider_failures, 3, "says nothing about the provider");
        assert!(!r.is_error);
    }

    #[test]
    fn a_broken_source_waits_for_its_retry_interval() {
        let r = respond(Failure::SourceBroken, 0, BROKEN_RETRY);
        assert_eq!(r.retry_in, BROKEN_RETRY);
        assert_eq!(r.health, HealthEffect::SourceBroken);
        assert_eq!(r.outcome, Some("source_broken"));
        assert!(!r.reconnect, "the connection is fine; the source is not");
    }

    #[test]
    fn database_errors_retry_in_a_second_and_reconnect_only_when_the_connection_is_lost() {
        let lost = respond(
            Failure::Database {
                connection_lost: true,
            },
            2,
            BROKEN_RETRY,
        );
        let live = respond(
            Failure::Database {
                connection_lost: false,
            },
            2,
            BROKEN_RETRY,
        );
        assert!(lost.reconnect);
        assert!(!live.reconnect);
        for r in [lost, live] {
            assert_eq!(r.retry_in, Duration::from_secs(1));
            assert_eq!(r.health, HealthEffect::DatabaseFailed);
            assert_eq!(r.outcome, Some("database_error"));
            assert_eq!(r.provider_failures, 2);
        }
    }

    #[test]
    fn a_chunking_failure_is_an_error_retried_after_thirty_seconds() {
        let r = respond(Failure::Chunking, 0, BROKEN_RETRY);
        assert_eq!(r.retry_in, Duration::from_secs(30));
        assert_eq!(r.outcome, Some("chunking_error"));
        assert!(r.is_error);
        assert_eq!(r.health, HealthEffect::None);
    }
}
