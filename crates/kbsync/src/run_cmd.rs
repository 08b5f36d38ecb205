//! `kbsync run`: the daemon, stopped by SIGINT/SIGTERM.

use kbsync_core::config::Config;
use kbsync_listener::Daemon;
use tokio_util::sync::CancellationToken;

pub async fn run(config: Config) -> anyhow::Result<()> {
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
