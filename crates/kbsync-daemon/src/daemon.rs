//! `kbsync run`: the start-up checks, then the supervisor of the daemon's named tasks
//! (`tasks.rs`): the listener, the collector, in logical capture mode the decoder, N
//! workers (`worker.rs`), the index keeper, the model fill, the scheduled sweeps
//! (`sweeps.rs`) and the HTTP endpoint, under one cancellation token. The first task
//! to end before shutdown stops the daemon with its name and reason.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use kbsync_core::config::{CaptureMode, Config};
use kbsync_core::db::{self, ErrorKind};
use kbsync_core::outbox;
use kbsync_core::schema::install::schema_is_current;
use kbsync_core::search::index::ColumnTypeError;
use kbsync_core::sync::embed::EmbedError;

use crate::batch::SourcePipeline;
use crate::health::Health;
use crate::http::{self, HttpState};
use crate::model_switch::{ModelSwitch, SwitchError};
use crate::search_api::{Connections, SearchApi};
use crate::shared::{Shared, connect_with_retry};
use crate::sweeps::scheduled_sweeps;
use crate::tasks::Tasks;
use crate::worker::worker;
use crate::{collector, decoder, index_manager, listener, model_fill, systemd, telemetry};

/// Database connections the search API's requests share.
const SEARCH_CONNECTIONS: usize = 4;
/// How often the daemon logs what it did and what is left (only while there is work).
const SUMMARY_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("database error at start-up: {}", db::describe(.0))]
    Startup(#[from] tokio_postgres::Error),
    #[error(
        "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
    )]
    SchemaNotInstalled,
    #[error(transparent)]
    Provider(#[from] EmbedError),
    #[error("{0}")]
    Source(String),
    /// A task ended before shutdown: which, and why (`Tasks::next_end`).
    #[error("the daemon stopped: {0}")]
    Task(String),
    #[error("{0}")]
    Http(String),
}

pub struct Daemon {
    config: Config,
    url: String,
}

/// The configured priority tenants plus those `priority_tenants_sql` returns, run in
/// a read-only transaction.
async fn load_priority_tenants(
    client: &mut Client,
    config: &Config,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut tenants = config.scheduling.priority_tenants.clone();
    if let Some(sql) = &config.scheduling.priority_tenants_sql {
        let tx = client.build_transaction().read_only(true).start().await?;
        for row in tx.query(sql.as_str(), &[]).await? {
            let tenant: Option<String> = row.try_get(0)?;
            tenants.extend(tenant);
        }
        tx.commit().await?;
    }
    tenants.sort();
    tenants.dedup();
    Ok(tenants)
}

/// Re-read `priority_tenants_sql` every `priority_refresh`; a failure keeps the last
/// list (and says so).
async fn refresh_priority(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.config.scheduling.priority_refresh;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(mut client) = connect_with_retry(&shared.url, &cancel, &shared.health).await
        else {
            return;
        };
        match load_priority_tenants(&mut client, &shared.config).await {
            Ok(list) => {
                *shared.priority.write().unwrap_or_else(|p| p.into_inner()) = list;
            }
            Err(e) => tracing::warn!(
                error = %db::describe(&e),
                "scheduling.priority_tenants_sql failed; keeping the last priority tenants"
            ),
        }
    }
}

impl Daemon {
    pub fn new(config: Config) -> Result<Self, DaemonError> {
        let url = config.database_url().ok_or(db::DbError::NoUrl)?;
        Ok(Self { config, url })
    }

    /// Run until `cancel` fires, then let in-flight batches finish within the drain
    /// timeout; whatever is not finished stays in the outbox.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), DaemonError> {
        // A database that is down at start (a reboot, a failover) is waited for; what
        // waiting cannot fix (a URL that does not parse, a wrong password, an unknown
        // database or role) stops the daemon with the server's own words.
        let mut delays = db::reconnect_backoff();
        let (client, _conn) = loop {
            match db::connect(&self.url).await {
                Ok(connected) => break connected,
                Err(e) if e.is_fatal() => return Err(DaemonError::Db(e)),
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::error!(error = %e, ?delay, "database unavailable at start; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        // Sessions, or nothing works as it should: a transaction-mode pooler is refused
        // with what to change, never silently worked around by polling.
        if let Err(seen) = listener::probe_session(&self.url, &client).await {
            return Err(DaemonError::Source(format!(
                "this database connection does not keep a session ({seen}): kbsync needs LISTEN/NOTIFY and session advisory locks, which a transaction-mode pooler (PgBouncer pool_mode = transaction, Supavisor's or RDS Proxy's transaction port) does not carry. Connect the daemon directly to PostgreSQL, or through the pooler's session mode (PgBouncer pool_mode = session; Supabase's session port 5432)"
            )));
        }
        // The daemon never runs DDL: the schema is `kbsync install`'s job.
        if !schema_is_current(&client).await? {
            return Err(DaemonError::SchemaNotInstalled);
        }
        let unknown =
            kbsync_core::search::unknown_text_search_configs(&client, &self.config).await?;
        if !unknown.is_empty() {
            return Err(DaemonError::Source(format!(
                "text_search {unknown:?} is not a text search configuration of this database: fix the sources' text_search and run `kbsync install`"
            )));
        }
        if self.config.capture.mode == CaptureMode::Logical {
            if let Some(problem) =
                kbsync_core::capture::logical::missing_replication_right(&client).await?
            {
                return Err(DaemonError::Source(problem));
            }
            let slot = kbsync_core::capture::logical::slot_name(&client, &self.config).await?;
            if kbsync_core::capture::logical::slot_state(&client, &slot)
                .await?
                .is_none()
            {
                return Err(DaemonError::Source(format!(
                    "capture.mode = \"logical\" but this database has no replication slot {slot}: run `kbsync install` with this config first (it creates the publication and the slot, and removes the capture triggers)"
                )));
            }
        }
        // A daemon whose config is not the installed capture's would miss changes (a
        // source not captured) or process keys the triggers no longer mean.
        let drift = kbsync_core::schema::install::capture_drift(&client, &self.config)
            .await
            .map_err(|e| match e {
                kbsync_core::schema::install::InstallError::Postgres(e) => DaemonError::Startup(e),
                e => DaemonError::Source(format!(
                    "{e}; correct the config (check it with `kbsync config check`), then run `kbsync install`"
                )),
            })?;
        if !drift.is_empty() {
            return Err(DaemonError::Source(format!(
                "the capture installed in this database is not this config's; `kbsync install` would: {}. Run `kbsync install` with this config, then start the daemon",
                drift.join("; ")
            )));
        }
        let models = Arc::new(ModelSwitch::new(&client, &self.config).await.map_err(
            |e| match e {
                SwitchError::Provider(e) => DaemonError::Provider(e),
                SwitchError::Migration(e) => DaemonError::Source(e.to_string()),
            },
        )?);
        // Chunks are cut as [embedding] cuts them, whichever model is active.
        let chunking_provider = models.configured();
        let search_tokens = self.config.search.api_tokens().map_err(DaemonError::Http)?;
        if search_tokens.is_some() && self.config.http.listen.is_none() {
            return Err(DaemonError::Http(
                "search.api_tokens_env / api_tokens_file is set but http.listen is not: the search API is served on the HTTP endpoint".into(),
            ));
        }
        let mut pipelines = Vec::new();
        for source in self.config.sources() {
            tracing::info!(
                source = %source.name, table = %source.table,
                debounce = ?source.debounce, delete_debounce = ?source.delete_debounce, max_wait = ?source.max_wait,
                "source"
            );
            pipelines.push(
                SourcePipeline::prepare(&client, source.clone(), &self.config, &chunking_provider)
                    .await
                    .map_err(DaemonError::Source)?,
            );
        }
        let mut client = client;
        let priority = load_priority_tenants(&mut client, &self.config)
            .await
            .map_err(|e| {
                DaemonError::Source(format!(
                    "scheduling.priority_tenants_sql: {}",
                    db::describe(&e)
                ))
            })?;
        if !priority.is_empty() {
            tracing::info!(tenants = ?priority, "priority tenants");
        }
        drop(client);
        let (connected_tx, connected_rx) = watch::channel(false);
        let health = Arc::new(Health::new(connected_rx));
        health.database_ok();
        let metrics = telemetry::handle().map_err(DaemonError::Http)?;
        telemetry::register_series(
            &pipelines
                .iter()
                .map(|p| p.source.name.clone())
                .collect::<Vec<_>>(),
            self.config.capture.mode == CaptureMode::Logical,
        );
        // Bound before READY, so a taken port is a clear start-up error.
        let http_listener = match self.config.http.listen {
            Some(addr) => {
                let bound = TcpListener::bind(addr)
                    .await
                    .map_err(|e| DaemonError::Http(format!("http.listen {addr}: {e}")))?;
                let local = bound
                    .local_addr()
                    .map_err(|e| DaemonError::Http(format!("http.listen {addr}: {e}")))?;
                tracing::info!(address = %local, "http endpoint listening: /healthz /readyz /metrics /api/chunking-health");
                Some(bound)
            }
            None => None,
        };
        let workers = self.config.embedding.max_concurrency;
        {
            let current = models.current();
            tracing::info!(
                workers,
                model = current.active.model(),
                other_model = current.other.as_ref().map(|(_, p, _)| p.model()),
                "kbsync daemon started"
            );
        }
        let shortest_window = pipelines
            .iter()
            .map(|p| p.source.debounce.min(p.source.delete_debounce))
            .min()
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            shortest_window,
            priority: std::sync::RwLock::new(priority),
            paused_until: std::sync::Mutex::new(std::collections::HashMap::new()),
            keys_done: std::sync::atomic::AtomicU64::new(0),
            health: health.clone(),
            failure_policy: outbox::FailurePolicy::from_config(&self.config),
            config: self.config,
            url: self.url,
            models,
            pipelines,
        });

        let (notified_tx, notified_rx) = watch::channel(0u64);
        let (wake_tx, wake_rx) = watch::channel(0u64);
        // The collector and, in logical mode, the decoder wake the workers.
        let wake_tx = Arc::new(wake_tx);
        // Not a child of `cancel`: the tasks are told to stop only after we have
        // decided why we stop, so a task ending on shutdown is not taken for a failure.
        let work_cancel = CancellationToken::new();
        let mut tasks = Tasks::default();
        tasks.spawn(
            "listener",
            listener::run(
                shared.url.clone(),
                notified_tx,
                connected_tx,
                work_cancel.clone(),
            ),
        );
        tasks.spawn(
            "collector",
            collect_changes(
                shared.clone(),
                notified_rx,
                wake_tx.clone(),
                work_cancel.clone(),
            ),
        );
        match shared.config.capture.mode {
            CaptureMode::Triggers => shared.health.capture_ok("capture triggers"),
            CaptureMode::Logical => {
                tasks.spawn(
                    "decoder",
                    decoder::run(
                        shared.url.clone(),
                        Arc::new(shared.config.clone()),
                        shared.health.clone(),
                        wake_tx,
                        work_cancel.clone(),
                    ),
                );
            }
        }
        tasks.spawn(
            "model fill",
            model_fill::run(
                shared.url.clone(),
                shared.models.clone(),
                work_cancel.clone(),
            ),
        );
        if shared.config.index.defer_above > 0 {
            tasks.spawn(
                "index keeper",
                keep_index(shared.clone(), work_cancel.clone()),
            );
        }
        if shared.config.reconcile.enabled {
            let schedule = shared
                .config
                .reconcile_schedule()
                .map_err(DaemonError::Source)?;
            tasks.spawn(
                "scheduled sweeps",
                scheduled_sweeps(schedule, shared.clone(), work_cancel.clone()),
            );
        }
        for n in 0..workers {
            tasks.spawn(
                format!("worker {n}"),
                worker(n, shared.clone(), wake_rx.clone(), work_cancel.clone()),
            );
        }

        if let Some(bound) = http_listener {
            let search = search_tokens.map(|tokens| {
                tracing::info!(tokens = tokens.len(), "search API on POST /v1/search");
                Arc::new(SearchApi {
                    tokens,
                    models: shared.models.clone(),
                    config: shared.config.clone(),
                    connections: Connections::new(shared.url.clone(), SEARCH_CONNECTIONS),
                })
            });
            let state = Arc::new(HttpState {
                health,
                metrics,
                config: shared.config.clone(),
                url: shared.url.clone(),
                search,
            });
            let cancel = work_cancel.clone();
            tasks.spawn_fallible("http endpoint", http::serve(bound, state, cancel));
        }
        if shared.config.scheduling.priority_tenants_sql.is_some() {
            tasks.spawn(
                "priority refresh",
                refresh_priority(shared.clone(), work_cancel.clone()),
            );
        }
        tasks.spawn(
            "progress summary",
            summarize_progress(shared.clone(), work_cancel.clone()),
        );
        tasks.spawn("systemd watchdog", systemd::watchdog(work_cancel.clone()));
        systemd::ready(&format!(
            "syncing {} sources with {workers} workers",
            shared.pipelines.len()
        ));

        let failure = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            ended = tasks.next_end() => Some(match ended {
                Some(Ok(name)) => format!("the {name} task ended before shutdown without an error"),
                Some(Err(why)) => why,
                None => "no task was running".to_owned(),
            }),
        };
        work_cancel.cancel();
        systemd::stopping();
        let drain = shared.config.daemon.drain_timeout;
        tracing::info!(?drain, "stopping: finishing in-flight batches");
        if tokio::time::timeout(drain, async {
            while let Some(ended) = tasks.next_end().await {
                // Ending on shutdown is what a task should do; failing then is logged.
                if let Err(why) = ended {
                    tracing::warn!("while stopping, {why}");
                }
            }
        })
        .await
        .is_err()
        {
            tracing::warn!(
                "drain timeout reached; unfinished batches stay in the outbox and are retried after their lease"
            );
            tasks.shutdown().await;
        }
        match failure {
            Some(reason) => Err(DaemonError::Task(reason)),
            None => Ok(()),
        }
    }
}

/// Every `SUMMARY_EVERY` while there is work: keys processed and their rate, what is
/// left and when it will be done at that rate. The per-batch lines are at debug level.
async fn summarize_progress(shared: Arc<Shared>, cancel: CancellationToken) {
    let names: Vec<String> = shared
        .pipelines
        .iter()
        .map(|p| p.source.name.clone())
        .collect();
    let mut last = shared.keys_done.load(std::sync::atomic::Ordering::Relaxed);
    let mut last_at = tokio::time::Instant::now();
    let mut was_behind = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(SUMMARY_EVERY) => {}
        }
        let Some(client) = connect_with_retry(&shared.url, &cancel, &shared.health).await else {
            return;
        };
        let backlog = match kbsync_reconcile::coverage::backlog(&client, &names).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %db::describe(&e), "reading the backlog for the progress summary failed");
                continue;
            }
        };
        let left: i64 = backlog.iter().map(|b| b.pending + b.uncollected).sum();
        let done = shared.keys_done.load(std::sync::atomic::Ordering::Relaxed);
        let keys = done - last;
        let per_second = keys as f64 / last_at.elapsed().as_secs_f64();
        (last, last_at) = (done, tokio::time::Instant::now());
        if keys == 0 && left == 0 {
            if was_behind {
                tracing::info!("caught up: nothing is waiting");
            }
            was_behind = false;
            continue;
        }
        was_behind = left > 0;
        let seconds_left =
            (per_second > 0.0 && left > 0).then(|| (left as f64 / per_second).round());
        tracing::info!(
            keys,
            keys_per_second = (per_second * 10.0).round() / 10.0,
            waiting = left,
            seconds_left,
            "progress"
        );
    }
}

/// The collector on a connection of its own, reconnecting after a database error.
async fn collect_changes(
    shared: Arc<Shared>,
    mut notified: watch::Receiver<u64>,
    wake_workers: Arc<watch::Sender<u64>>,
    cancel: CancellationToken,
) {
    let fallback_poll = shared.config.daemon.fallback_poll;
    loop {
        let Some(client) = connect_with_retry(&shared.url, &cancel, &shared.health).await else {
            return;
        };
        match collector::run(
            &client,
            fallback_poll,
            &mut notified,
            &wake_workers,
            &cancel,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                shared.health.database_failed(&db::describe(&e));
                tracing::warn!(error = %db::describe(&e), "collecting captured changes failed; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// The embedding index's keeper on a connection of its own, reconnecting after a
/// database error. An error it cannot get past (say, the role may not drop the index)
/// is logged each time and retried slowly: the index is only an optimisation, and sync
/// goes on without the keeper.
async fn keep_index(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let Some(client) = connect_with_retry(&shared.url, &cancel, &shared.health).await else {
            return;
        };
        let Err(e) = index_manager::run(&client, &shared.config.index, &cancel).await else {
            return;
        };
        let delay = match &e {
            ColumnTypeError::Postgres(e) if db::classify(e) != ErrorKind::Fatal => {
                Duration::from_secs(1)
            }
            _ => Duration::from_secs(60),
        };
        tracing::warn!(error = %e, ?delay, "managing the embedding index failed; trying again");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
