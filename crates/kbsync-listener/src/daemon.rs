//! `kbsync run`: one listener task, one collector task, in logical capture mode one
//! decoder task, and N worker tasks under one cancellation token. The listener hears
//! NOTIFYs; the collector then moves what the capture triggers (or the decoder)
//! appended into the outbox and wakes the workers. Each worker
//! loops: claim a ready batch from some source, process it while keeping its lease
//! alive, and when nothing is ready sleep until a wake-up, the next window closing,
//! or the fallback poll. Task failures are never silent: a worker that
//! panics stops the daemon with an error.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use kbsync_core::config::{CaptureMode, Config, ProviderKind, Source};
use kbsync_core::db::{self, ErrorKind};
use kbsync_core::embed::EmbedError;
use kbsync_core::install::schema_is_current;
use kbsync_core::knowledge_index::ColumnTypeError;
use kbsync_core::outbox;

use kbsync_reconcile::{Options, Origin, Quiet, ReconcileError, SourceReport};

use crate::batch::{self, BatchError, SourcePipeline};
use crate::batch_sizing::BatchSizer;
use crate::health::Health;
use crate::http::{self, HttpState};
use crate::model_switch::{ModelSwitch, SwitchError};
use crate::search_api::{Connections, SearchApi};
use crate::tasks::Tasks;
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
    #[error("a worker task failed: {0}")]
    Task(String),
    #[error("{0}")]
    Http(String),
}

pub struct Daemon {
    config: Config,
    url: String,
}

struct Shared {
    config: Config,
    /// The shortest debounce or delete window of any source: a change just captured
    /// is ready no sooner than this.
    shortest_window: Duration,
    url: String,
    /// The model written into `embedding` now, and during a model migration the other.
    models: Arc<ModelSwitch>,
    pipelines: Vec<SourcePipeline>,
    failure_policy: outbox::FailurePolicy,
    health: Arc<Health>,
    /// scheduling.priority_tenants plus what priority_tenants_sql last returned.
    priority: std::sync::RwLock<Vec<String>>,
    /// Keys processed since start, for the periodic summary.
    keys_done: std::sync::atomic::AtomicU64,
    /// Broken sources (see `source_broken`): not claimed from until this time.
    paused_until: std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
}

impl Shared {
    /// Whether `source` is broken and its next try has not come yet.
    fn paused(&self, source: &str) -> bool {
        self.paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .is_some_and(|until| tokio::time::Instant::now() < *until)
    }

    /// A batch of `source` failed in a way waiting alone does not fix (a column the
    /// config names is missing, no privilege on the table): the source is marked broken
    /// — `/readyz`, `kbsync_source_broken`, `kbsync status` — its claims go back
    /// without an attempt counted, and it is tried again after
    /// `daemon.broken_source_retry`, not in a loop.
    async fn source_broken(
        &self,
        lease_client: &Client,
        token: Uuid,
        source: &str,
        err: &tokio_postgres::Error,
    ) {
        let retry = self.config.daemon.broken_source_retry;
        let error = db::describe(err);
        let fix = kbsync_core::source_problems::fix_for(source, err, retry);
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
            kbsync_core::source_problems::record(lease_client, source, &error, &fix).await
        {
            tracing::warn!(source, error = %db::describe(&e), "could not record the broken source for `kbsync status`");
        }
    }

    /// A batch of `source` went through: if it was broken, it is not any more.
    async fn source_ok(&self, client: &Client, source: &str) {
        if !self.health.source_ok(source) {
            return;
        }
        self.paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source);
        metrics::gauge!("kbsync_source_broken", "source" => source.to_owned()).set(0.0);
        tracing::info!(source, "source works again");
        if let Err(e) = kbsync_core::source_problems::clear(client, source).await {
            tracing::warn!(source, error = %db::describe(&e), "could not clear the broken source's record");
        }
    }

    fn priority_tenants(&self) -> Vec<String> {
        self.priority
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
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
                kbsync_core::replication::missing_replication_right(&client).await?
            {
                return Err(DaemonError::Source(problem));
            }
            let slot = kbsync_core::replication::slot_name(&client, &self.config).await?;
            if kbsync_core::replication::slot_state(&client, &slot)
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
        let drift = kbsync_core::install::capture_drift(&client, &self.config)
            .await
            .map_err(|e| match e {
                kbsync_core::install::InstallError::Postgres(e) => DaemonError::Startup(e),
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
                SourcePipeline::prepare(&client, source, &self.config, &chunking_provider)
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

/// Connect, retrying with backoff until it works or we are cancelled.
async fn connect_with_retry(
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

async fn worker(
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
                        Err(BatchError::Provider(e)) => {
                            metrics::counter!("kbsync_batches_total", "source" => pipeline.source.name.clone(), "outcome" => "provider_error").increment(1);
                            shared.health.provider_failed(&e.to_string());
                            provider_failures += 1;
                            let delay = outbox::retry_delay(provider_failures as i32);
                            tracing::error!(source = %pipeline.source.name, error = %e, ?delay, "embedding provider failed; the batch is retried later");
                            give_back(&lease_client, token, delay, &e.to_string()).await;
                        }
                        Err(BatchError::ModelChanged) => {
                            // A cut-over or rollback committed while the batch embedded
                            // with the model active before it: nothing was written; it
                            // is redone at once with the active model, no attempt counted.
                            tracing::info!(source = %pipeline.source.name, "the embedding model switched during the batch; redoing it with the active model");
                            give_back(
                                &lease_client,
                                token,
                                Duration::ZERO,
                                "the embedding model switched during the batch",
                            )
                            .await;
                            if let Err(e) = shared.models.refresh(&client).await {
                                tracing::error!(error = %e, "reading the model migration failed");
                            }
                        }
                        Err(BatchError::Chunking(e)) => {
                            metrics::counter!("kbsync_batches_total", "source" => pipeline.source.name.clone(), "outcome" => "chunking_error").increment(1);
                            tracing::error!(source = %pipeline.source.name, error = %e, "chunking a batch failed; it is retried in 30 s");
                            give_back(&lease_client, token, Duration::from_secs(30), &e).await;
                        }
                        Err(BatchError::Db(e))
                            if !db::connection_failed(&client, &e)
                                && shared.models.refresh(&client).await.is_ok()
                                && shared.models.current().generation != models.generation =>
                        {
                            // A cut-over, rollback or finish renamed or dropped the
                            // column the batch's statements named: redone at once.
                            tracing::info!(source = %pipeline.source.name, error = %db::describe(&e), "the model migration moved on during the batch; redoing it");
                            give_back(
                                &lease_client,
                                token,
                                Duration::ZERO,
                                "the model migration moved on during the batch",
                            )
                            .await;
                        }
                        Err(BatchError::Db(e))
                            if !db::connection_failed(&client, &e)
                                && db::classify(&e) == ErrorKind::Fatal =>
                        {
                            // Keys PostgreSQL rejects are failed one by one inside the
                            // batch: a statement that fails on a live connection is the
                            // source's (a missing column, no privilege), not a key's.
                            metrics::counter!("kbsync_batches_total", "source" => pipeline.source.name.clone(), "outcome" => "source_broken").increment(1);
                            shared
                                .source_broken(&lease_client, token, &pipeline.source.name, &e)
                                .await;
                        }
                        Err(BatchError::Db(e)) => {
                            // What is left here is the connection or the server.
                            metrics::counter!("kbsync_batches_total", "source" => pipeline.source.name.clone(), "outcome" => "database_error").increment(1);
                            shared.health.database_failed(&db::describe(&e));
                            let kind = db::classify(&e);
                            tracing::error!(source = %pipeline.source.name, error = %db::describe(&e), ?kind, "database error while processing a batch; it is retried");
                            give_back(
                                &lease_client,
                                token,
                                Duration::from_secs(1),
                                &db::describe(&e),
                            )
                            .await;
                            if db::connection_failed(&client, &e) {
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

/// Give a batch's claims back to the outbox, to be tried again after `delay`, with no
/// attempt counted. A failure is logged: the claims then come back when their lease
/// lapses, later but not lost.
async fn give_back(lease_client: &Client, token: Uuid, delay: Duration, why: &str) {
    if let Err(e) = outbox::postpone(lease_client, token, delay, why).await {
        tracing::warn!(error = %db::describe(&e), "could not give the batch back; its claims return when their lease lapses");
    }
}

/// The reconcile sweep on `reconcile.schedule`. A sweep another daemon is running is
/// skipped (the lock makes them exclusive); a failed sweep is logged and recorded in
/// kbsync.reconcile_runs, and the next one runs on schedule.
async fn scheduled_sweeps(
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

/// Run `work`, renewing the claim's lease every third of it meanwhile. The renewals
/// run beside the work, never instead of it: a renewal that waits (on the row locks
/// the batch's own write transaction holds, say) must not stop that transaction from
/// going on to its commit.
async fn with_lease<T>(
    client: &Client,
    token: Uuid,
    lease: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::select! {
        out = work => out,
        never = keep_renewing(client, token, lease) => match never {},
    }
}

async fn keep_renewing(client: &Client, token: Uuid, lease: Duration) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(lease / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = outbox::renew(client, token, lease).await {
            tracing::warn!(error = %db::describe(&e), "renewing a claim failed");
        }
    }
}
