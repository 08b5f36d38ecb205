//! What every task of one daemon shares: the config, the sources' pipelines, the
//! models, health, priorities and paused sources; and how a task (re)connects.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use kbsync_core::config::Config;
use kbsync_core::db;
use kbsync_core::outbox;

use crate::batch::SourcePipeline;
use crate::health::Health;
use crate::leases::give_back;
use crate::model_switch::ModelSwitch;

pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The shortest debounce or delete window of any source: a change just captured
    /// is ready no sooner than this.
    pub(crate) shortest_window: Duration,
    pub(crate) url: String,
    /// The model written into `embedding` now, and during a model migration the other.
    pub(crate) models: Arc<ModelSwitch>,
    pub(crate) pipelines: Vec<SourcePipeline>,
    pub(crate) failure_policy: outbox::FailurePolicy,
    pub(crate) health: Arc<Health>,
    /// scheduling.priority_tenants plus what priority_tenants_sql last returned.
    pub(crate) priority: std::sync::RwLock<Vec<String>>,
    /// Keys processed since start, for the periodic summary.
    pub(crate) keys_done: std::sync::atomic::AtomicU64,
    /// Broken sources (see `source_broken`): not claimed from until this time.
    pub(crate) paused_until:
        std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
}

impl Shared {
    /// Whether `source` is broken and its next try has not come yet.
    pub(crate) fn paused(&self, source: &str) -> bool {
        self.paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .is_some_and(|until| tokio::time::Instant::now() < *until)
    }

    /// A batch of `source` failed in a way waiting alone does not fix (a column the
    /// config names is missing, no privilege on the table): the source is marked broken
    /// — `/readyz`, `kbsync_source_broken`, `kbsync status` — its claims go back
    /// without an attempt counted, and it is tried again after `retry` (the failure
    /// policy's: `daemon.broken_source_retry`), not in a loop.
    pub(crate) async fn source_broken(
        &self,
        lease_client: &Client,
        token: Uuid,
        source: &str,
        err: &tokio_postgres::Error,
        retry: Duration,
    ) {
        let error = db::describe(err);
        let fix = kbsync_core::sync::source_problems::fix_for(source, err, retry);
        self.paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.to_owned(), tokio::time::Instant::now() + retry);
        metrics::gauge!("kbsync_source_broken", "source" => source.to_owned()).set(1.0);
        if self.health.source_broken(source, &error) {
            tracing::warn!(source, %error, "source still broken; tried again later");
        } else {
            tracing::error!(source, %error, %fix, "source broken: no batch of it can be written until this is fixed");
        }
        give_back(lease_client, token, retry, &error).await;
        if let Err(e) =
            kbsync_core::sync::source_problems::record(lease_client, source, &error, &fix).await
        {
            tracing::warn!(source, error = %db::describe(&e), "could not record the broken source for `kbsync status`");
        }
    }

    /// A batch of `source` went through: if it was broken, it is not any more.
    pub(crate) async fn source_ok(&self, client: &Client, source: &str) {
        if !self.health.source_ok(source) {
            return;
        }
        self.paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source);
        metrics::gauge!("kbsync_source_broken", "source" => source.to_owned()).set(0.0);
        tracing::info!(source, "source works again");
        if let Err(e) = kbsync_core::sync::source_problems::clear(client, source).await {
            tracing::warn!(source, error = %db::describe(&e), "could not clear the broken source's record");
        }
    }

    pub(crate) fn priority_tenants(&self) -> Vec<String> {
        self.priority
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Connect, retrying with backoff until it works or we are cancelled.
pub(crate) async fn connect_with_retry(
    url: &str,
    cancel: &CancellationToken,
    health: &Health,
) -> Option<Client> {
    let mut delays = db::reconnect_backoff();
    loop {
        match db::connect(url).await {
            Ok((client, _)) => return Some(client),
            Err(e) => {
                health.database_failed(&e.to_string());
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, ?delay, "database unavailable; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
