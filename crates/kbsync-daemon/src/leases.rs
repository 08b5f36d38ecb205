//! A batch's claim while it is worked on: its lease renewed beside the work, and the
//! claims given back to the outbox when the batch cannot go on.

use std::time::Duration;

use tokio_postgres::Client;
use uuid::Uuid;

use kbsync_core::db;
use kbsync_core::outbox;

/// Give a batch's claims back to the outbox, to be tried again after `delay`, with no
/// attempt counted. A failure is logged: the claims then come back when their lease
/// lapses, later but not lost.
pub(crate) async fn give_back(lease_client: &Client, token: Uuid, delay: Duration, why: &str) {
    if let Err(e) = outbox::postpone(lease_client, token, delay, why).await {
        tracing::warn!(error = %db::describe(&e), "could not give the batch back; its claims return when their lease lapses");
    }
}

/// Run `work`, renewing the claim's lease every third of it meanwhile. The renewals
/// run beside the work, never instead of it: a renewal that waits (on the row locks
/// the batch's own write transaction holds, say) must not stop that transaction from
/// going on to its commit.
pub(crate) async fn with_lease<T>(
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
