//! LISTEN on a dedicated connection, driven through `Connection::poll_message`
//! (the only way tokio-postgres hands out notifications). Every notification — its
//! payload is only a hint, and garbage from other clients is harmless — and every
//! (re)connect bumps a wake-up counter the collector watches; the collector then
//! folds the change log into the outbox and wakes the workers, so a change committed
//! while we were disconnected is never missed.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use kbsync_core::capture::CHANNEL;

/// Why a listening session ended.
enum Ended {
    Cancelled,
    /// Lost before or after LISTEN took effect (`listened`).
    Lost {
        error: String,
        listened: bool,
    },
}

pub async fn run(
    url: String,
    wake: watch::Sender<u64>,
    connected: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut delays = kbsync_core::db::reconnect_backoff();
    loop {
        match listen_once(&url, &wake, &connected, &cancel).await {
            Ended::Cancelled => return,
            Ended::Lost { error, listened } => {
                connected.send_replace(false);
                if listened {
                    delays = kbsync_core::db::reconnect_backoff();
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(%error, ?delay, "listener connection lost; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn bump(wake: &watch::Sender<u64>) {
    wake.send_modify(|n| *n = n.wrapping_add(1));
}

async fn listen_once(
    url: &str,
    wake: &watch::Sender<u64>,
    connected: &watch::Sender<bool>,
    cancel: &CancellationToken,
) -> Ended {
    let lost = |error: String, listened: bool| Ended::Lost { error, listened };
    let mut settings = match kbsync_core::db::connection_settings(url) {
        Ok(s) => s,
        Err(e) => return lost(e.to_string(), false),
    };
    // Keepalives so that a dead peer is noticed in ~25 s rather than never.
    settings
        .config
        .application_name("kbsync-listener")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    let connect = tokio::select! {
        _ = cancel.cancelled() => return Ended::Cancelled,
        c = settings.connect() => c,
    };
    let (client, mut connection) = match connect {
        Ok(pair) => pair,
        Err(e) => return lost(e.to_string(), false),
    };
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The shared daemon lock on this session tells `kbsync status` a daemon runs.
    let listen_sql = format!(
        "LISTEN \"{CHANNEL}\"; SELECT pg_advisory_lock_shared({})",
        kbsync_core::db::advisory_locks::DAEMON
    );
    let listen = client.batch_execute(&listen_sql);
    tokio::pin!(listen);
    // The connection has to be polled for LISTEN itself to complete.
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ended::Cancelled,
            done = &mut listen => match done {
                Ok(()) => break,
                Err(e) => return lost(kbsync_core::db::describe(&e), false),
            },
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return lost(e.to_string(), false),
                None => return lost("connection closed".into(), false),
            },
        }
    }
    tracing::info!(channel = CHANNEL, "listening");
    connected.send_replace(true);
    // Whatever was committed while we were away is in the outbox: look now.
    bump(wake);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ended::Cancelled,
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    tracing::trace!(payload = n.payload(), "notification");
                    metrics::counter!("kbsync_notifications_total").increment(1);
                    bump(wake);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return lost(kbsync_core::db::describe(&e), true),
                None => return lost("connection closed by the server".into(), true),
            },
        }
    }
}

/// How long the start-up probe waits for its own notification.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Whether this database connection keeps a session: LISTEN on one connection, NOTIFY
/// from `notifier`, and see whether the notification arrives. Behind a transaction-mode
/// pooler (PgBouncer `pool_mode = transaction`, many managed poolers' default port) the
/// LISTEN's server session is handed to other clients, so it does not; then wake-ups,
/// session advisory locks and the index build would all fail quietly. `Err`: what the
/// probe saw, in words.
pub async fn probe_session(url: &str, notifier: &tokio_postgres::Client) -> Result<(), String> {
    let mut settings = kbsync_core::db::connection_settings(url).map_err(|e| e.to_string())?;
    settings.config.application_name("kbsync-probe");
    let (client, mut connection) = settings.connect().await.map_err(|e| e.to_string())?;
    let channel = format!("kbsync_probe_{}", uuid::Uuid::new_v4().simple());
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let listen_sql = format!("LISTEN \"{channel}\"");
    let listen = client.batch_execute(&listen_sql);
    tokio::pin!(listen);
    loop {
        tokio::select! {
            done = &mut listen => {
                done.map_err(|e| kbsync_core::db::describe(&e))?;
                break;
            }
            message = messages.next() => if message.is_none() {
                return Err("the probe's connection closed".into());
            },
        }
    }
    notifier
        .execute("SELECT pg_notify($1, 'probe')", &[&channel])
        .await
        .map_err(|e| kbsync_core::db::describe(&e))?;
    let arrived = tokio::time::timeout(PROBE_WAIT, async {
        while let Some(message) = messages.next().await {
            if let Ok(AsyncMessage::Notification(n)) = message
                && n.channel() == channel
            {
                return true;
            }
        }
        false
    })
    .await;
    match arrived {
        Ok(true) => Ok(()),
        _ => Err(format!(
            "a NOTIFY sent to this connection's LISTEN did not arrive within {PROBE_WAIT:?}"
        )),
    }
}
