//! Scheduling across tenants and daemons: round-robin fairness, priority tenants, and
//! a provider rate limit held by several daemons together.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::{DaemonProcess, FakeOpenAi, TempConfig, TestDb, sync_config, wait_for};
use tokio_postgres::Client;

const DIMS: usize = 8;

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Demo tables with three tenants and no rows, kbsync installed; no daemon yet.
async fn empty_shop(config: &TempConfig) -> (TestDb, Client) {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO accounts_user VALUES (1, 'a', 'A', 'a.example'), (2, 'b', 'B', 'b.example'), (3, 'c', 'C', 'c.example')",
        )
        .await
        .unwrap();
    (db, client)
}

/// `n` new products of `tenant`, queued by the triggers.
async fn import(client: &Client, tenant: i32, n: i32) {
    client
        .execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('bulk-' || $1::int || '-' || g)::uuid, $1, 'Bulk item ' || g, 'Imported in bulk.'
               FROM generate_series(1, $2::int) g",
            &[&tenant, &n],
        )
        .await
        .unwrap();
}

/// Wait until tenant B's one product edit has its chunk.
async fn b_edit_written(client: &Client) {
    wait_for(
        Duration::from_secs(120),
        "tenant B's edit to be written",
        || async {
            (count(
                client,
                "SELECT count(*) FROM tenant_knowledge WHERE tenant_id = '2'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn one_tenants_edit_is_not_held_up_by_another_tenants_20k_backlog() {
    let server = FakeOpenAi::start(DIMS).await;
    server.set_latency(Duration::from_millis(20));
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms")
        .edited(&[("batch_size = 256", "batch_size = 64")]);
    let (db, client) = empty_shop(&config).await;
    import(&client, 1, 20_000).await;
    client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name) VALUES (md5('b-edit')::uuid, 2, 'One edit of tenant B')",
        )
        .await
        .unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM kbsync.changes").await,
        20_001
    );
    let daemon = DaemonProcess::start(config.path(), db.url());
    b_edit_written(&client).await;
    let a_before_b = count(
        &client,
        "SELECT count(*) FROM tenant_knowledge
          WHERE tenant_id = '1' AND created_at <= (SELECT created_at FROM tenant_knowledge WHERE tenant_id = '2')",
    )
    .await;
    assert!(
        a_before_b < 2_000,
        "{a_before_b} of tenant A's 20,000 rows were written before tenant B's one edit\n{}",
        daemon.log()
    );
}

/// Batches are sized by time (`daemon.batch_duration`, 200 ms), not only by count: an
/// edit that arrives behind another tenant's backlog waits for a short batch in
/// progress, not for 256 slow keys.
#[tokio::test]
async fn an_edit_behind_a_slow_backlog_waits_for_a_short_batch_not_a_full_one() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "0s", "0s");
    let (db, client) = empty_shop(&config).await;
    // Every chunk written costs at least 10 ms (a loaded database): at most 100 keys/s
    // per worker, so batches sized to take 200 ms (or twice their fixed cost, far less
    // here) hold about 20 keys.
    client
        .batch_execute(
            "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$;
             CREATE TRIGGER slow_write BEFORE INSERT ON tenant_knowledge
               FOR EACH ROW EXECUTE FUNCTION slow_write();",
        )
        .await
        .unwrap();
    import(&client, 1, 3_000).await;
    let daemon = DaemonProcess::start(config.path(), db.url());
    let a_written = "SELECT count(*) FROM tenant_knowledge WHERE tenant_id = '1'";
    // Past the first batch of each of the two workers (256 keys each, before any
    // batch was measured).
    wait_for(
        Duration::from_secs(60),
        "the workers' first batches",
        || async { (count(&client, a_written).await > 2 * 256 + 40).then_some(()) },
    )
    .await;
    client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name) VALUES (md5('b-edit')::uuid, 2, 'One edit of tenant B')",
        )
        .await
        .unwrap();
    let a_at_commit = count(&client, a_written).await;
    b_edit_written(&client).await;
    let a_meanwhile = count(&client, a_written).await - a_at_commit;
    let log = daemon.log();
    let sizes: Vec<usize> = log
        .lines()
        .filter(|l| l.contains("batch done"))
        .filter_map(|l| {
            let at = l.find("keys=")? + "keys=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    // Only each worker's first batch, before anything was measured, may be large.
    let large = sizes.iter().filter(|&&n| n > 40).count();
    assert!(large <= 2, "batch sizes {sizes:?}\n{log}");
    // B's edit rode in a short batch: a 256-key batch would have brought 255 of A's
    // keys with it, and the batches in progress when B committed theirs.
    assert!(
        a_meanwhile < 200,
        "{a_meanwhile} of tenant A's rows were written between B's commit and B's chunk; batch sizes {sizes:?}"
    );
    assert!(
        count(&client, a_written).await < 3_000,
        "tenant A's backlog was already drained"
    );
}

#[tokio::test]
async fn a_priority_tenants_backlog_is_drained_before_a_normal_ones() {
    let server = FakeOpenAi::start(DIMS).await;
    server.set_latency(Duration::from_millis(20));
    let base = sync_config(&server.base_url(), DIMS, "100ms", "100ms")
        .edited(&[("batch_size = 256", "batch_size = 64")]);
    let config = TempConfig::new(&format!(
        "{}\n[scheduling]\npriority_tenants = [\"3\"]\n",
        std::fs::read_to_string(base.path()).unwrap()
    ));
    let (db, client) = empty_shop(&config).await;
    // The normal tenant's backlog is older: without priority it would go first.
    import(&client, 1, 1_000).await;
    import(&client, 3, 1_000).await;
    let daemon = DaemonProcess::start(config.path(), db.url());
    wait_for(
        Duration::from_secs(120),
        "both backlogs written",
        || async {
            (count(&client, "SELECT count(*) FROM tenant_knowledge").await == 2_000).then_some(())
        },
    )
    .await;
    // Normal rows written before the priority backlog was done: at most what the two
    // workers had in flight when the priority tenant ran out of ready work.
    let normal_first = count(
        &client,
        "SELECT count(*) FROM tenant_knowledge
          WHERE tenant_id = '1' AND created_at < (SELECT max(created_at) FROM tenant_knowledge WHERE tenant_id = '3')",
    )
    .await;
    assert!(
        normal_first <= 2 * 64,
        "{normal_first} normal rows were written before the priority backlog was drained\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("priority tenants"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn three_daemons_together_keep_the_providers_requests_per_minute() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms").edited(&[
        ("batch_size = 256", "batch_size = 10"),
        ("max_inputs_per_request = 64", "max_inputs_per_request = 1"),
        (
            "max_concurrency = 2",
            "max_concurrency = 2\nrequests_per_minute = 120",
        ),
    ]);
    let (db, client) = empty_shop(&config).await;
    // One request per row (one input per request): far more than 120 a minute.
    import(&client, 1, 400).await;
    let daemons: Vec<DaemonProcess> = (0..3)
        .map(|_| DaemonProcess::start(config.path(), db.url()))
        .collect();
    // Let them compete for a little over a minute.
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(120), "65 s of work", || async {
        (started.elapsed() >= Duration::from_secs(65)).then_some(())
    })
    .await;
    let most = server.most_requests_within(Duration::from_secs(60));
    let written = count(&client, "SELECT count(*) FROM tenant_knowledge").await;
    let logs: String = daemons.iter().map(DaemonProcess::log).collect();
    assert!(
        most <= 132,
        "{most} requests within one minute, limit 120 (+10%)\n{logs}"
    );
    // The limit, not idleness, was what held them: the minute was (nearly) full.
    assert!(most >= 100, "only {most} requests within a minute\n{logs}");
    let working = daemons
        .iter()
        .filter(|d| d.log().contains("batch done"))
        .count();
    assert!(working >= 2, "only {working} daemons did work\n{logs}");
    // Held back by the limit (not all 400 done), yet working throughout. The rows
    // written trail the requests (each batch is written when its ten are embedded).
    assert!((50..400).contains(&written), "{written} rows written");
}
