//! systemd's notify protocol (`Type=notify`): READY once the daemon works, STOPPING
//! when it drains, and WATCHDOG pings while its runtime is responsive. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the config"),
    ]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight batches"),
    ]);
}

/// Ping the watchdog at half its interval (`WatchdogSec=`) until cancelled. A ping
/// proves the async runtime still schedules tasks; a wedged process is restarted.
pub async fn watchdog(cancel: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        cancel.cancelled().await;
        return;
    };
    let mut tick = tokio::time::interval((timeout / 2).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}
