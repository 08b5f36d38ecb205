//! The advisory locks against each other on a live database: writers sending wake-ups
//! never make a reconcile sweep report "busy", and a running sweep never stops a
//! writer's wake-up NOTIFY (the two once shared one lock id).

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kbsync_core::capture::CHANNEL;
use kbsync_core::config::Config;
use kbsync_core::db::advisory_locks;
use kbsync_reconcile::{Options, Origin, Quiet, ReconcileError};
use kbsync_testkit::{Installed, Listener};
use tokio_util::sync::CancellationToken;

const WRITERS: usize = 8;
const SWEEPS: usize = 50;

/// Installed, with the demo rows (no daemon: the changes wait in the change log).
async fn with_demo_rows() -> Installed {
    let installed = Installed::new(8, "100ms", "100ms").await;
    installed
        .db
        .kbsync_with_config(installed.config.path(), &["demo", "data"])
        .assert_success();
    installed
}

#[tokio::test]
async fn writers_sending_wake_ups_never_make_a_sweep_report_busy() {
    let s = with_demo_rows().await;
    let config = Config::load(s.config.path()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let client = s.db.client().await;
        let (stop, updates) = (stop.clone(), updates.clone());
        // Each statement its own transaction, each trying for the wake-up lock.
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client
                    .execute(
                        "UPDATE web_knowledge_product SET price = price + 0.01
                          WHERE id = (SELECT id FROM web_knowledge_product ORDER BY random() LIMIT 1)",
                        &[],
                    )
                    .await
                    .unwrap();
                updates.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut sweeper = s.db.client().await;
    let cancel = CancellationToken::new();
    let options = Options {
        dry_run: true,
        force: false,
        sources: Vec::new(),
        tenant: None,
        origin: Origin::Cli,
        queue_only: false,
    };
    let (mut busy, mut wake_lock_seen) = (0, 0);
    for _ in 0..SWEEPS {
        // The hazard is there: a writer holds the wake-up lock at this moment.
        if advisory_locks::held(&s.client, advisory_locks::WAKE)
            .await
            .unwrap()
        {
            wake_lock_seen += 1;
        }
        match kbsync_reconcile::sweep(&mut sweeper, &config, &options, &Quiet, &cancel).await {
            Ok(_) => {}
            Err(ReconcileError::Busy) => busy += 1,
            Err(e) => panic!("the sweep failed: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let updates = updates.load(Ordering::Relaxed);
    assert!(
        updates >= SWEEPS as u64 && wake_lock_seen > 0,
        "the writers did not write beside the sweeps ({updates} updates; the wake-up lock seen held {wake_lock_seen} times)"
    );
    assert_eq!(
        busy, 0,
        "{busy} of {SWEEPS} sweeps reported another sweep running beside {WRITERS} writers ({updates} updates)"
    );
}

#[tokio::test]
async fn a_running_sweep_does_not_stop_the_wake_up_notify() {
    let s = with_demo_rows().await;
    // What a sweep holds for its whole run, on a session of its own.
    let sweep = s.db.client().await;
    sweep
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&kbsync_reconcile::SWEEP_LOCK],
        )
        .await
        .unwrap();
    let mut listener = Listener::start(s.db.url(), CHANNEL).await;
    s.client
        .execute(
            "UPDATE web_knowledge_qapair SET answer = answer || ' (edited)'
              WHERE id = (SELECT id FROM web_knowledge_qapair LIMIT 1)",
            &[],
        )
        .await
        .unwrap();
    let notifications = listener.drain(Duration::from_secs(2)).await;
    assert!(
        notifications.iter().any(|(channel, _)| channel == CHANNEL),
        "no wake-up NOTIFY while a sweep held its lock: {notifications:?}"
    );
}
