//! A team adopts kbsync on a database that already holds data: `kbsync install` queues
//! the rows that existed before their capture, says so, and the daemon alone brings
//! coverage to 100% (no `kbsync reconcile`, no wait for the nightly sweep), in both
//! capture modes. `kbsync status` says what to run when rows have no chunks and nothing
//! is queued, and when no daemon is running.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use kbsync_testkit::demo_state::{converged, expected};
use kbsync_testkit::{DaemonProcess, FakeOpenAi, LOGICAL_CAPTURE, TestDb, sync_config};

const DIMS: usize = 8;

async fn rows_before_install_reach_full_coverage(logical: bool) {
    let server = FakeOpenAi::start(DIMS).await;
    let mut config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    if logical {
        config = config.edited(&[LOGICAL_CAPTURE]);
    }
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    let client = db.client().await;
    let want = expected(&client).await;
    let faqs = want.iter().filter(|(source, ..)| source == "faq").count();
    assert!(faqs > 0 && want.len() > faqs);

    let install = db.kbsync_with_config(config.path(), &["install"]);
    install.assert_success();
    assert!(
        install.stdout.contains(&format!(
            "faq          {faqs} eligible rows; {faqs} without up-to-date chunks: {faqs} queued for the daemon"
        )),
        "{}",
        install.stdout
    );
    let queued: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued as usize, want.len());

    // Before any daemon runs, status shows the backlog and that nobody works it off.
    let status = db.kbsync_with_config(config.path(), &["status"]);
    status.assert_success();
    let faq_line = status
        .stdout
        .lines()
        .find(|l| l.starts_with("faq "))
        .unwrap()
        .to_owned();
    let columns: Vec<&str> = faq_line.split_whitespace().collect();
    assert_eq!(columns[1], faqs.to_string(), "eligible: {faq_line}");
    assert_eq!(columns[6], faqs.to_string(), "backlog: {faq_line}");
    assert!(
        status.stdout.contains("daemons: none running"),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stdout
            .contains("attention: no daemon is running, so the backlog is not being worked off"),
        "{}",
        status.stdout
    );

    let daemon = DaemonProcess::start(config.path(), db.url());
    converged(&client, &daemon).await;
    let status = db.kbsync_with_config(config.path(), &["status"]);
    assert!(
        status.stdout.contains("daemons: 1 running"),
        "{}",
        status.stdout
    );
    assert!(!status.stdout.contains("attention:"), "{}", status.stdout);
    let reconcile_runs: Vec<String> = client
        .query("SELECT origin FROM kbsync.reconcile_runs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reconcile_runs, ["install"], "only install's sweep ran");
}

#[tokio::test]
async fn rows_written_before_install_are_synced_by_the_daemon_alone_with_triggers() {
    rows_before_install_reach_full_coverage(false).await;
}

#[tokio::test]
async fn rows_written_before_install_are_synced_by_the_daemon_alone_with_logical_decoding() {
    rows_before_install_reach_full_coverage(true).await;
}

#[tokio::test]
async fn status_says_what_to_run_for_rows_nobody_queued() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    // Changes lost before they reached the outbox (say, written while the capture was
    // being replaced): the rows exist, no chunk, nothing queued.
    let client = db.client().await;
    client
        .batch_execute("TRUNCATE kbsync.changes; TRUNCATE kbsync.outbox")
        .await
        .unwrap();
    let status = db.kbsync_with_config(config.path(), &["status"]);
    status.assert_success();
    let hint = status
        .stdout
        .lines()
        .find(|l| l.starts_with("attention: faq: "))
        .unwrap_or_else(|| panic!("no hint for faq:\n{}", status.stdout));
    assert!(
        hint.contains("have no chunks and none is queued") && hint.contains("`kbsync reconcile`"),
        "{hint}"
    );
    let reconcile = db.kbsync_with_config(config.path(), &["reconcile"]);
    reconcile.assert_success();
    assert!(
        reconcile
            .stdout
            .contains("queued keys wait for a daemon: none is running"),
        "{}",
        reconcile.stdout
    );
    let status = db.kbsync_with_config(config.path(), &["status"]);
    assert!(
        !status.stdout.contains("none is queued"),
        "queued now: {}",
        status.stdout
    );
}
