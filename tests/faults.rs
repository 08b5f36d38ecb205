//! Named faults around the database: down at start, the listener's connection killed
//! by the server, a URL that is not one.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::demo_state::{converged, outbox_len};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, Fault, Installed, PrivateCluster, TestDb, run_kbsync, sync_config,
    wait_for,
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
    daemon.wait_until_listening(1, WAIT).await;
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
    // Listening again (the fallback poll alone would also have found the writes).
    wait_for(WAIT, "the listener back in pg_stat_activity", || async {
        let listeners: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'kbsync-listener' AND datname = current_database()
                    AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (listeners == 1).then_some(())
    })
    .await;
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
            out.stderr
                .contains("the database URL is not valid (postgres://u:***@[::1)")
                && !out.stderr.contains("panicked"),
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

/// Where in a batch the daemon is SIGKILLed. Each point is reached for certain, not
/// by timing: the next step is held up by the test until the daemon is seen there.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// Claimed, its embedding request in flight (the provider does not answer).
    BetweenClaimAndWrite,
    /// In the write transaction, its chunk upsert waiting for a lock the test holds
    /// on tenant_knowledge.
    MidTransaction,
    /// In the write transaction, the chunks written (its row-exclusive lock on
    /// tenant_knowledge granted), the acknowledgement waiting for a lock the test
    /// holds on kbsync.dead_letters.
    AfterWriteBeforeAck,
}

/// Kill the daemon at `point` in its first batch, check nothing of that batch is
/// visible, let go, restart, and require the exact table.
async fn killed_at(point: KillPoint) {
    let Installed {
        db,
        client,
        server,
        config,
    } = Installed::new(DIMS, "100ms", "100ms").await;
    let blocker = db.client().await;
    match point {
        KillPoint::BetweenClaimAndWrite => server.set_latency(Duration::from_secs(120)),
        KillPoint::MidTransaction => blocker
            .batch_execute("BEGIN; LOCK TABLE tenant_knowledge IN SHARE MODE")
            .await
            .unwrap(),
        KillPoint::AfterWriteBeforeAck => blocker
            .batch_execute("BEGIN; LOCK TABLE kbsync.dead_letters IN SHARE MODE")
            .await
            .unwrap(),
    }
    let mut daemon = DaemonProcess::start(config.path(), db.url());
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();

    let reached = match point {
        KillPoint::BetweenClaimAndWrite => {
            "SELECT EXISTS (SELECT FROM kbsync.outbox WHERE claim_token IS NOT NULL)"
        }
        KillPoint::MidTransaction => {
            "SELECT EXISTS (
                SELECT FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'kbsync'
                   AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO public.tenant_knowledge%')"
        }
        KillPoint::AfterWriteBeforeAck => {
            "SELECT EXISTS (
                SELECT FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                 WHERE a.datname = current_database() AND a.application_name = 'kbsync'
                   AND a.wait_event_type = 'Lock' AND a.query LIKE '%DELETE FROM kbsync.dead_letters%'
                   AND l.relation = 'public.tenant_knowledge'::regclass
                   AND l.mode = 'RowExclusiveLock' AND l.granted)"
        }
    };
    wait_for(WAIT, &format!("the daemon at {point:?}"), || async {
        let at: bool = client.query_one(reached, &[]).await.unwrap().get(0);
        let in_flight = server.request_count() > 0;
        (at && (in_flight || !matches!(point, KillPoint::BetweenClaimAndWrite))).then_some(())
    })
    .await;
    daemon.kill();

    // Nothing of the killed batch is visible: the write and its acknowledgement are one
    // transaction that never committed.
    let visible: i64 = client
        .query_one("SELECT count(*) FROM tenant_knowledge", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(visible, 0, "{point:?}");
    assert!(outbox_len(&client).await > 0, "{point:?}");
    server.set_latency(Duration::ZERO);
    blocker.batch_execute("ROLLBACK").await.ok();

    let daemon = DaemonProcess::start(config.path(), db.url());
    converged(&client, &daemon).await;
}

#[tokio::test]
async fn a_daemon_killed_between_claim_and_write_loses_nothing() {
    killed_at(KillPoint::BetweenClaimAndWrite).await;
}

#[tokio::test]
async fn a_daemon_killed_mid_transaction_loses_nothing() {
    killed_at(KillPoint::MidTransaction).await;
}

#[tokio::test]
async fn a_daemon_killed_after_writing_before_acknowledging_loses_nothing() {
    killed_at(KillPoint::AfterWriteBeforeAck).await;
}

#[tokio::test]
async fn provider_timeouts_and_cut_connections_during_a_sync_lose_nothing() {
    let s = Installed::new(DIMS, "100ms", "100ms").await;
    let config = s
        .config
        .edited(&[("request_timeout = \"10s\"", "request_timeout = \"500ms\"")]);
    s.server.push_faults([
        Fault::Stall(Duration::from_secs(3)),
        Fault::DropConnection,
        Fault::Stall(Duration::from_secs(3)),
        Fault::DropConnection,
        Fault::Status(502, vec![]),
    ]);
    let daemon = s.daemon_with(&config);
    s.seed();
    converged(&s.client, &daemon).await;
    let log = daemon.log();
    assert!(log.contains("timed out"), "{log}");
    assert!(
        log.contains("connection closed before message completed"),
        "{log}"
    );
    assert!(s.server.request_count() >= 6, "five faults, then answers");
}

#[tokio::test]
async fn a_write_transaction_longer_than_a_lease_renewal_still_commits() {
    // A user's trigger on the knowledge table makes one write take 5 s: longer than
    // the lease renewal period (10 s lease in the test config, renewed every ~3.3 s)
    // while the write transaction holds its claim's rows.
    let s = Installed::new(DIMS, "100ms", "100ms").await;
    s.client
        .batch_execute(
            "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.content LIKE '%SLOW-BUT-FINE%' THEN PERFORM pg_sleep(5); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow_write BEFORE INSERT OR UPDATE ON tenant_knowledge
                 FOR EACH ROW EXECUTE FUNCTION slow_write();",
        )
        .await
        .unwrap();
    s.seed();
    s.client
        .batch_execute(
            "UPDATE web_knowledge_product SET description = description || ' SLOW-BUT-FINE'
              WHERE id = md5('product-3-U-lock-2')::uuid",
        )
        .await
        .unwrap();
    let daemon = s.daemon();
    converged(&s.client, &daemon).await;
}

#[tokio::test]
async fn an_entry_locked_by_another_transaction_does_not_spin_the_daemon() {
    let s = Installed::new(DIMS, "100ms", "100ms").await;
    s.seed();
    // Every change collected, and one entry locked as a batch's fence locks it (a batch
    // of ours outliving its lease, say): due, but no claim can take it. An application's
    // open transaction can no longer lock an entry: it only appends to the change log.
    kbsync_core::outbox::collect(&s.client).await.unwrap();
    let holder = s.db.client().await;
    holder
        .batch_execute(
            "BEGIN;
             SELECT 1 FROM kbsync.outbox
              WHERE source = 'product' AND source_key = md5('product-3-U-lock-2')::uuid::text
                FOR KEY SHARE",
        )
        .await
        .unwrap();
    let daemon = s.daemon();
    wait_for(WAIT, "everything else written", || async {
        let left = outbox_len(&s.client).await;
        (left == 1).then_some(())
    })
    .await;
    let transactions = || async {
        let row = s
            .client
            .query_one(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let before = transactions().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    let during = transactions().await - before;
    // Measured here: a worker that spins made 7,718 statements in these 3 s, one that
    // backs off 329 (most while its wait grows to the 1 s fallback poll). The
    // statistics may lag, which can only lower the count.
    assert!(
        during < 1500,
        "{during} transactions in 3 s with the entry locked"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    converged(&s.client, &daemon).await;
}
