//! Logical capture (`capture.mode = "logical"`): no trigger on the source tables, the
//! daemon decodes the WAL through a publication and a slot. It must record exactly
//! what the triggers record, switch modes both ways, say clearly what
//! is wrong (no wal_level = logical, a slot dropped by hand, a slot nobody reads), and
//! lose nothing across daemon downtime and PostgreSQL restarts.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_core::outbox;
use kbsync_testkit::demo_state::{converged, decoded};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, Installed, LOGICAL_CAPTURE, PrivateCluster, TempConfig, TestDb,
    connect_url, run_kbsync, sync_config, sync_config_with_max_wait, wait_for,
};
use tokio_postgres::Client;

const DIMS: usize = 8;
const WITHIN: Duration = Duration::from_secs(30);

/// Every kind of write the capture distinguishes, one transaction per statement (so
/// that the last change of a key is well defined in both modes).
const WORKLOAD: &[&str] = &[
    // Unrelated columns, and rows neither eligible before nor after: nothing.
    "UPDATE web_knowledge_qapair SET updated_at = now() + interval '1 hour'",
    "UPDATE web_knowledge_product SET created_at = now() - interval '1 day'",
    "UPDATE web_knowledge_websitepage SET updated_at = now()",
    "UPDATE ai_model_aiprompts SET updated_at = now()",
    "UPDATE web_knowledge_qapair SET answer = answer || ' (edited)' WHERE generation_status <> 'completed'",
    // Repeated edits of one key fold.
    "UPDATE web_knowledge_product SET description = 'edit 1' WHERE id = md5('product-1-headlamp-1')::uuid",
    "UPDATE web_knowledge_product SET description = 'edit 2' WHERE id = md5('product-1-headlamp-1')::uuid",
    "UPDATE web_knowledge_product SET description = 'edit 3' WHERE id = md5('product-1-headlamp-1')::uuid",
    // An eligible edit whose tenant comes through the via table (page → user).
    "UPDATE web_knowledge_qapair SET question = question || ' (reworded)' WHERE id = md5('qa-3-returns-1')::uuid",
    // Leaving the filter, and coming back.
    "UPDATE web_knowledge_qapair SET generation_status = 'failed' WHERE id = md5('qa-1-payment-1')::uuid",
    "UPDATE web_knowledge_qapair SET generation_status = 'failed' WHERE id = md5('qa-1-payment-2')::uuid",
    "UPDATE web_knowledge_qapair SET generation_status = 'completed' WHERE id = md5('qa-1-payment-2')::uuid",
    // A cascade: the page and its QAPairs.
    "DELETE FROM web_knowledge_websitepage WHERE id = md5('page-2-shipping')::uuid",
    // A changed key: the old key deleted, the new one inserted.
    "INSERT INTO accounts_user VALUES (7, 'x', 'X', 'x.example')",
    "UPDATE ai_model_aiprompts SET user_id = 7 WHERE user_id = 2",
    // Inserts, one of them not eligible.
    "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
          VALUES ('00000000-0000-0000-0000-0000000000a1', 7, 'https://x.example/', 'Home', 'Welcome', 'completed')",
    "INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
          VALUES ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000a1', 'Q?', 'A.', 'completed'),
                 ('00000000-0000-0000-0000-0000000000b2', '00000000-0000-0000-0000-0000000000a1', 'Q2?', 'A2.', 'pending')",
    "INSERT INTO web_knowledge_product (id, user_id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 7, 'Thing')",
    // A bulk statement.
    "UPDATE web_knowledge_product SET name = name || ' v2' WHERE user_id = 3",
    // A whole source.
    "TRUNCATE ai_model_aiprompts",
];

async fn run_workload(client: &Client) {
    for statement in WORKLOAD {
        client
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

type Entry = (String, String, String, bool, i64, String);

async fn outbox_entries(client: &Client) -> Vec<Entry> {
    client
        .query(
            "SELECT source, scope, source_key, deleted, version, tenant FROM kbsync.outbox ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

async fn clear_outbox(client: &Client) {
    client
        .batch_execute("DELETE FROM kbsync.outbox; DELETE FROM kbsync.changes")
        .await
        .unwrap();
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Windows so long that the daemon only captures: the outbox keeps every entry.
fn capture_only_config(server: &FakeOpenAi) -> TempConfig {
    sync_config_with_max_wait(&server.base_url(), DIMS, "1h", "1h", "2h")
}

#[tokio::test]
async fn logical_capture_records_exactly_what_the_triggers_record() {
    let server = FakeOpenAi::start(DIMS).await;
    let triggers_config = capture_only_config(&server);
    let logical_config = triggers_config.edited(&[LOGICAL_CAPTURE]);

    let by_triggers = TestDb::create().await.with_demo_schema().await;
    by_triggers
        .kbsync_with_config(triggers_config.path(), &["install"])
        .assert_success();
    by_triggers
        .kbsync_with_config(triggers_config.path(), &["demo", "data"])
        .assert_success();
    let t = by_triggers.client().await;
    clear_outbox(&t).await;
    run_workload(&t).await;
    outbox::collect(&t).await.unwrap();
    let expected = outbox_entries(&t).await;

    let by_wal = TestDb::create().await.with_demo_schema().await;
    by_wal
        .kbsync_with_config(logical_config.path(), &["install"])
        .assert_success();
    let l = by_wal.client().await;
    assert_eq!(
        count(
            &l,
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'kbsync' AND p.proname LIKE 'capture\\_%'"
        )
        .await,
        0,
        "logical capture installs no capture trigger"
    );
    let daemon = DaemonProcess::start(logical_config.path(), by_wal.url());
    by_wal
        .kbsync_with_config(logical_config.path(), &["demo", "data"])
        .assert_success();
    decoded(&l, WITHIN).await;
    let seeded = count(&l, "SELECT count(*) FROM kbsync.outbox").await;
    assert!(seeded > 200, "the demo rows were decoded: {seeded}");
    clear_outbox(&l).await;
    run_workload(&l).await;
    decoded(&l, WITHIN).await;
    // Versions aside: the decoder reads the source rows when it applies a change, not
    // when it was committed, so a page inserted before its FAQ finds the FAQ (one more
    // change of that key, no other entry).
    let without_version = |entries: &[Entry]| -> Vec<(String, String, String, bool, String)> {
        entries
            .iter()
            .map(|(s, scope, k, d, _, t)| (s.clone(), scope.clone(), k.clone(), *d, t.clone()))
            .collect()
    };
    let got = outbox_entries(&l).await;
    assert_eq!(
        without_version(&got),
        without_version(&expected),
        "logical capture (left) differs from trigger capture (right)\ndaemon log:\n{}",
        daemon.log()
    );
    // The workload covered each kind of entry.
    assert!(expected.iter().any(|e| e.1 == "source"), "{expected:?}");
    assert!(expected.iter().any(|e| e.3 && e.0 == "faq"), "{expected:?}");
    assert!(expected.iter().any(|e| e.4 == 3), "{expected:?}");
    assert!(
        expected.iter().any(|e| e.0 == "faq" && e.5 == "7"),
        "{expected:?}"
    );
}

#[tokio::test]
async fn install_switches_capture_modes_both_ways() {
    let server = FakeOpenAi::start(DIMS).await;
    let triggers_config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let logical_config = triggers_config.edited(&[LOGICAL_CAPTURE]);
    let db = TestDb::create().await.with_demo_schema().await;
    let client = db.client().await;
    let kbsync_triggers = "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                            JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE n.nspname = 'kbsync' AND p.proname LIKE 'capture\\_%'";
    let publication = "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'kbsync'";
    let slots = "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()";
    let full_identity = "SELECT count(*) FROM pg_class WHERE relreplident = 'f' AND relname IN
        ('web_knowledge_qapair', 'web_knowledge_product', 'web_knowledge_websitepage', 'ai_model_aiprompts')";

    db.kbsync_with_config(triggers_config.path(), &["install"])
        .assert_success();
    assert_eq!(count(&client, kbsync_triggers).await, 20);
    assert_eq!(count(&client, slots).await, 0);

    let out = db.kbsync_with_config(logical_config.path(), &["install"]);
    out.assert_success();
    assert!(
        out.stdout.contains("logical replication slot") && out.stdout.contains("publication"),
        "{}",
        out.stdout
    );
    assert_eq!(count(&client, kbsync_triggers).await, 0);
    assert_eq!(count(&client, publication).await, 4);
    assert_eq!(count(&client, full_identity).await, 4);
    assert_eq!(count(&client, slots).await, 1);
    db.kbsync_with_config(logical_config.path(), &["install"])
        .assert_success()
        .stdout
        .contains("up to date")
        .then_some(())
        .expect("a second install changes nothing");

    // Logical: edits reach the knowledge base.
    let mut daemon = DaemonProcess::start(logical_config.path(), db.url());
    db.kbsync_with_config(logical_config.path(), &["demo", "data"])
        .assert_success();
    converged(&client, &daemon).await;
    // The slot is in use: install refuses to drop it from under the daemon.
    let refused = db.kbsync_with_config(triggers_config.path(), &["install"]);
    refused.assert_failure();
    assert!(
        refused.stderr.contains("in use by a running kbsync daemon"),
        "{}",
        refused.stderr
    );
    daemon.terminate(Duration::from_secs(30)).await;

    // Back to triggers: triggers first, then publication and slot go, with the advice
    // to sweep for what neither capture saw.
    let back = db.kbsync_with_config(triggers_config.path(), &["install"]);
    back.assert_success();
    assert!(
        back.stdout.contains("run `kbsync reconcile`"),
        "{}",
        back.stdout
    );
    assert_eq!(count(&client, kbsync_triggers).await, 20);
    assert_eq!(count(&client, publication).await, 0);
    assert_eq!(count(&client, slots).await, 0);
    let daemon = DaemonProcess::start(triggers_config.path(), db.url());
    client
        .batch_execute(
            "UPDATE web_knowledge_product SET name = 'After the switch' WHERE id = md5('product-1-headlamp-1')::uuid",
        )
        .await
        .unwrap();
    converged(&client, &daemon).await;
}

#[tokio::test]
async fn a_server_without_wal_level_logical_gets_a_clear_error() {
    let cluster = PrivateCluster::start_with_wal_level("replica");
    let url = cluster.database_url("postgres");
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms").edited(&[LOGICAL_CAPTURE]);
    run_kbsync(
        config.path(),
        &["demo", "schema"],
        &[("DATABASE_URL", &url)],
    )
    .assert_success();
    let out = run_kbsync(config.path(), &["install"], &[("DATABASE_URL", &url)]);
    out.assert_failure();
    assert!(
        out.stderr.contains("wal_level = replica")
            && out.stderr.contains("ALTER SYSTEM SET wal_level = logical")
            && out.stderr.contains("restart PostgreSQL"),
        "{}",
        out.stderr
    );
    // Nothing was half-installed.
    let client = connect_url(&url).await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'kbsync'"
        )
        .await,
        0
    );
}

async fn readiness(daemon: &DaemonProcess) -> (u16, String) {
    daemon.http_get("/readyz").await
}

#[tokio::test]
async fn a_slot_dropped_by_hand_is_a_clear_error_and_install_creates_it_again() {
    let s = Installed::new_logical(DIMS, "100ms", "100ms").await;
    let daemon = s.daemon();
    s.seed();
    converged(&s.client, &daemon).await;
    wait_for(WITHIN, "/readyz to say ready", || async {
        (readiness(&daemon).await.0 == 200).then_some(())
    })
    .await;

    // Dropped by hand: the decoder holds it, so its session goes first.
    wait_for(WITHIN, "the slot to be dropped", || async {
        s.client
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                  WHERE database = current_database() AND active;
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE database = current_database()",
            )
            .await
            .ok()
    })
    .await;
    let (code, body) = wait_for(WITHIN, "/readyz to report the missing slot", || async {
        let (code, body) = readiness(&daemon).await;
        (code == 503 && body.contains("does not exist")).then_some((code, body))
    })
    .await;
    assert!(body.contains("kbsync install"), "{code}: {body}");
    let status = s.db.kbsync_with_config(s.config.path(), &["status"]);
    status.assert_success();
    assert!(
        status.stdout.contains("MISSING") && status.stdout.contains("kbsync install"),
        "{}",
        status.stdout
    );

    // Written while no slot exists: lost to capture, repaired by the sweep.
    s.client
        .batch_execute(
            "UPDATE web_knowledge_product SET name = 'While the slot was gone' WHERE id = md5('product-1-headlamp-1')::uuid",
        )
        .await
        .unwrap();
    let out = s.db.kbsync_with_config(s.config.path(), &["install"]);
    out.assert_success();
    assert!(
        out.stdout.contains("logical replication slot"),
        "{}",
        out.stdout
    );
    wait_for(WITHIN, "/readyz to recover", || async {
        (readiness(&daemon).await.0 == 200).then_some(())
    })
    .await;
    s.db.kbsync_with_config(s.config.path(), &["reconcile"])
        .assert_success();
    converged(&s.client, &daemon).await;
    // And the new slot captures again.
    s.client
        .batch_execute(
            "UPDATE web_knowledge_product SET name = 'After the new slot' WHERE id = md5('product-2-sesame bagel-1')::uuid",
        )
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    assert!(
        daemon.log().contains("does not exist"),
        "the daemon logged the missing slot"
    );
}

#[tokio::test]
async fn a_daemon_down_for_a_while_leaves_wal_retained_then_catches_up_losing_nothing() {
    let s = Installed::new_logical(DIMS, "100ms", "100ms").await;
    s.seed();
    s.client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('offline-' || i)::uuid, 1 + i % 3, 'Offline item ' || i, repeat('Added while kbsync was down. ', 20)
               FROM generate_series(1, 3000) i;
             UPDATE web_knowledge_qapair SET answer = answer || ' (offline edit)' WHERE generation_status = 'completed';
             DELETE FROM web_knowledge_websitepage WHERE id = md5('page-2-shipping')::uuid;",
        )
        .await
        .unwrap();
    // Nobody decodes: the slot holds the WAL, and status says so.
    let status =
        s.db.kbsync_with_config(s.config.path(), &["status", "--json"]);
    status.assert_success();
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let capture = &json["capture"];
    assert_eq!(capture["mode"], "logical", "{json}");
    assert_eq!(capture["active"], false, "{json}");
    let retained = capture["retained_bytes"].as_i64().unwrap();
    let unconfirmed = capture["unconfirmed_bytes"].as_i64().unwrap();
    assert!(unconfirmed > 1_000_000, "{json}");
    assert!(retained >= unconfirmed, "{json}");
    let text = s.db.kbsync_with_config(s.config.path(), &["status"]);
    assert!(
        text.stdout.contains("NO daemon is decoding"),
        "{}",
        text.stdout
    );

    let daemon = s.daemon();
    converged(&s.client, &daemon).await;
    // Caught up: the confirmed position moved past everything written.
    let caught_up_at: String = s
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    decoded(&s.client, WITHIN).await;
    let json: serde_json::Value = serde_json::from_str(
        &s.db
            .kbsync_with_config(s.config.path(), &["status", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(json["capture"]["active"], true, "{json}");
    // The cluster's other databases (parallel tests) keep writing WAL, so what status
    // reports as unconfirmed can only be bounded by the WAL written since catching up.
    let written_since: i64 = s
        .client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&caught_up_at],
        )
        .await
        .unwrap()
        .get(0);
    let now_unconfirmed = json["capture"]["unconfirmed_bytes"].as_i64().unwrap();
    assert!(
        now_unconfirmed <= written_since,
        "status reports {now_unconfirmed} bytes unconfirmed, but only {written_since} were written since the daemon caught up: {json}"
    );
}

async fn restart_and_catch_up(logical: bool) {
    let server = FakeOpenAi::start(DIMS).await;
    let mut config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    if logical {
        config = config.edited(&[LOGICAL_CAPTURE]);
    }
    let cluster = PrivateCluster::start();
    let url = cluster.database_url("postgres");
    let run = |args: &[&str]| {
        run_kbsync(config.path(), args, &[("DATABASE_URL", url.as_str())]).assert_success();
    };
    run(&["demo", "schema"]);
    run(&["install"]);
    run(&["demo", "data"]);
    let daemon = DaemonProcess::start(config.path(), &url);
    let client = connect_url(&url).await;
    converged(&client, &daemon).await;
    drop(client);

    cluster.stop();
    cluster.restart();
    // Written right after the restart, before the daemon's reconnect backoff ends.
    let client = connect_url(&url).await;
    client
        .batch_execute(
            "UPDATE web_knowledge_product SET name = 'Written after the restart' WHERE id = md5('product-1-headlamp-1')::uuid;
             DELETE FROM web_knowledge_qapair WHERE id = md5('qa-2-warranty-1')::uuid;",
        )
        .await
        .unwrap();
    converged(&client, &daemon).await;
    if logical {
        wait_for(WITHIN, "the decoder to reconnect", || async {
            (daemon.log().matches("decoding changes").count() >= 2).then_some(())
        })
        .await;
    } else {
        daemon.wait_until_listening(2, WITHIN).await;
    }
    // A change after the reconnect arrives through the new connection.
    client
        .batch_execute(
            "UPDATE web_knowledge_product SET name = 'After the reconnect' WHERE id = md5('product-2-sesame bagel-1')::uuid",
        )
        .await
        .unwrap();
    converged(&client, &daemon).await;
}

#[tokio::test]
async fn the_daemon_reconnects_after_a_postgresql_restart_and_catches_up() {
    restart_and_catch_up(false).await;
}

#[tokio::test]
async fn logical_capture_reconnects_after_a_postgresql_restart_and_catches_up() {
    restart_and_catch_up(true).await;
}
