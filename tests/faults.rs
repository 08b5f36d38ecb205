//! Named faults around the database: down at start, the listener's connection killed
//! by the server, a URL that is not one.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::demo_state::converged;
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, PrivateCluster, TestDb, run_kbsync, sync_config, wait_for,
};
use tokio_postgres::NoTls;

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_database_down_at_start_is_waited_for_not_a_crash() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let (cluster, url) = PrivateCluster::with_demo_schema(&config);
    cluster.stop();
    let mut daemon = DaemonProcess::start(config.path(), &url);
    wait_for(WAIT, "the start-up retry in the log", || async {
        daemon
            .log()
            .contains("database unavailable at start; retrying")
            .then_some(())
    })
    .await;
    assert!(daemon.exited().is_none(), "{}", daemon.log());
    cluster.restart();
    run_kbsync(
        config.path(),
        &["demo", "data"],
        &[("DATABASE_URL", url.as_str())],
    )
    .assert_success();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    converged(&client, &daemon).await;
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[tokio::test]
async fn the_listener_killed_by_pg_terminate_backend_reconnects_and_nothing_is_missed() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let daemon = DaemonProcess::start(config.path(), db.url());
    let client = db.client().await;
    wait_for(WAIT, "the listener to connect", || async {
        daemon.log().contains("listening").then_some(())
    })
    .await;
    let killed: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                    WHERE application_name = 'kbsync-listener' AND datname = current_database()) k",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // Written while the listener is away: found on its reconnect (or by the poll).
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    converged(&client, &daemon).await;
    assert!(
        daemon
            .log()
            .contains("listener connection lost; reconnecting"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn a_database_url_that_is_not_one_is_a_clear_error() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    for args in [&["run"][..], &["reconcile"], &["status"]] {
        let out = run_kbsync(
            config.path(),
            args,
            &[
                ("DATABASE_URL", "postgres://u:s3cret@[::1"),
                ("OPENAI_API_KEY", "k"),
            ],
        );
        out.assert_failure();
        assert!(
            out.stderr.contains("cannot connect to PostgreSQL") && !out.stderr.contains("panicked"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("s3cret"),
            "the password leaked: {}",
            out.stderr
        );
    }
}
