//! `kbsync run`: the daemon. SIGINT/SIGTERM stop it (in-flight batches drain);
//! SIGHUP re-reads the config file and, when it is valid, restarts the daemon with
//! it the same way (drain, then start) — an invalid file is reported and the
//! running config kept.

use std::path::Path;

use anyhow::Context;
use kbsync_core::config::Config;
use kbsync_daemon::{Daemon, systemd};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// What the daemon checks at start, checked before a reload switches to `config`: a
/// config the daemon would refuse must not replace a running one. A database that cannot
/// be reached now is no reason to refuse (the daemon waits for it).
async fn fits_the_database(config: &Config) -> Result<(), String> {
    let Some(url) = config.database_url() else {
        return Err(kbsync_core::db::DbError::NoUrl.to_string());
    };
    let client = match kbsync_core::db::connect(&url).await {
        Ok((client, _connection)) => client,
        Err(e) if e.is_fatal() => return Err(e.to_string()),
        Err(_) => return Ok(()),
    };
    let problems = kbsync_core::sync::source_rows::unusable_sources(&client, config).await;
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let drift = kbsync_core::schema::install::capture_drift(&client, config)
        .await
        .map_err(|e| e.to_string())?;
    if !drift.is_empty() {
        return Err(format!(
            "its capture is not the installed one: run `kbsync install` with it first (it would: {})",
            drift.join("; ")
        ));
    }
    Ok(())
}

pub async fn run(path: &Path, mut config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
        stop.cancel();
    });
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        let this_run = shutdown.child_token();
        let mut running = tokio::spawn(Daemon::new(config.clone())?.run(this_run.clone()));
        let reloaded = loop {
            tokio::select! {
                outcome = &mut running => {
                    signals.abort();
                    outcome.context("the daemon task")??;
                    tracing::info!("stopped");
                    return Ok(());
                }
                _ = hangup.recv() => match Config::load(path) {
                    Ok(new) => match fits_the_database(&new).await {
                        Ok(()) => break new,
                        Err(problem) => tracing::error!(%problem, "SIGHUP: the new config does not fit the database; keeping the running config"),
                    },
                    Err(e) => tracing::error!(error = %e, "SIGHUP: the config does not load; keeping the running config"),
                },
            }
        };
        tracing::info!(config = %path.display(), "SIGHUP: config reloaded; restarting the daemon with it");
        systemd::reloading();
        this_run.cancel();
        running.await.context("the daemon task")??;
        config = reloaded;
    }
}
