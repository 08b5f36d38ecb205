//! `kbsync run`: the daemon.

use anyhow::bail;
use kbsync_core::config::Config;
use kbsync_core::install::schema_is_current;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = crate::connect(&config).await?;
    // The daemon never runs DDL: the schema is `kbsync install`'s job.
    if !schema_is_current(&client).await? {
        bail!(
            "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
        );
    }
    for source in config.sources() {
        tracing::info!(
            source = %source.name,
            table = %source.table,
            debounce = ?source.debounce,
            delete_debounce = ?source.delete_debounce,
            max_wait = ?source.max_wait,
            "source configured"
        );
    }
    let backlog: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await?
        .get(0);
    tracing::warn!(
        backlog,
        "the sync pipeline (outbox -> windows -> chunk -> embed -> write) is not built yet; changes are captured durably in kbsync.outbox and nothing is processed. Waiting for SIGINT/SIGTERM"
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
    Ok(())
}
