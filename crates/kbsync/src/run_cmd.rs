//! `kbsync run`: the daemon, stopped by SIGINT/SIGTERM.

use anyhow::bail;
use kbsync_core::config::{Config, ProviderKind};
use kbsync_core::install::schema_is_current;
use kbsync_listener::Daemon;
use tokio_util::sync::CancellationToken;

pub async fn run(config: Config) -> anyhow::Result<()> {
    if config.embedding.provider == ProviderKind::Local {
        return wait_without_local_model(config).await;
    }
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let signals = tokio::spawn(async move {
        let result = shutdown_signal().await;
        stop.cancel();
        result
    });
    let outcome = Daemon::new(config)?.run(cancel).await;
    signals.abort();
    outcome?;
    tracing::info!("stopped");
    Ok(())
}

/// The local model is not built into this kbsync yet: say so and keep capturing.
async fn wait_without_local_model(config: Config) -> anyhow::Result<()> {
    let client = crate::connect(&config).await?;
    if !schema_is_current(&client).await? {
        bail!(
            "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
        );
    }
    let backlog: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await?
        .get(0);
    tracing::warn!(
        backlog,
        "embedding provider \"local\" is not built into this kbsync yet, so nothing is embedded: changes are captured durably in kbsync.outbox and wait there. Use provider = \"openai\" with any OpenAI-compatible server to process them. Waiting for SIGINT/SIGTERM"
    );
    shutdown_signal().await?;
    tracing::info!("shutting down");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    Ok(())
}
