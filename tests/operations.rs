//! Running kbsync in production: readiness that follows the real state of the
//! database, Prometheus metrics that move with real work, the chunking-health API
//! against SQL counts, `status`, `search`, `errors retry`, and SIGHUP.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::demo_state::{converged, outbox_len};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, PrivateCluster, TempConfig, TestDb, local_model_config, run_kbsync,
    sync_config, wait_for,
};
use tokio_postgres::{Client, NoTls};

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Sum of a metric's samples whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text ({e}):\n{text}"));
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// A fresh database with the demo tables and kbsync installed, and a daemon on it.
async fn installed_and_running(config: &TempConfig) -> (TestDb, DaemonProcess, Client) {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let daemon = DaemonProcess::start(config.path(), db.url());
    let client = db.client().await;
    (db, daemon, client)
}

#[tokio::test]
async fn readiness_follows_the_database_down_and_back_up() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let (cluster, url) = PrivateCluster::with_demo_schema(&config);
    let daemon = DaemonProcess::start(config.path(), &url);
    let ready = |want: u16| {
        let daemon = &daemon;
        async move {
            let (status, body) = daemon.http_get("/readyz").await;
            (status == want).then_some(body)
        }
    };
    wait_for(WAIT, "/readyz to say ready", || ready(200)).await;
    assert_eq!(daemon.http_get("/healthz").await, (200, "ok\n".to_owned()));

    cluster.stop();
    let body = wait_for(WAIT, "/readyz to say not ready", || ready(503)).await;
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readiness["ready"], false);
    assert!(
        readiness["database"]["ok"] == false || readiness["listener"]["ok"] == false,
        "{readiness}"
    );
    assert_eq!(
        daemon.http_get("/healthz").await.0,
        200,
        "alive while not ready"
    );

    cluster.restart();
    wait_for(WAIT, "/readyz to say ready again", || ready(200)).await;
    // And it works again, not only says so.
    run_kbsync(
        config.path(),
        &["demo", "data"],
        &[("DATABASE_URL", url.as_str())],
    )
    .assert_success();
    converged(&connect(&url).await, &daemon).await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_real_work() {
    let server = FakeOpenAi::start(DIMS).await;
    // A 1 s window: the ten quick edits below surely fold into one pass.
    let config = sync_config(&server.base_url(), DIMS, "1s", "100ms");
    let (db, daemon, client) = installed_and_running(&config).await;
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    converged(&client, &daemon).await;
    let before = daemon.http_get("/metrics").await.1;
    let product = [("source", "product")];
    let written = metric(&before, "kbsync_chunks_written_total", &product);
    assert_eq!(
        written,
        count(
            &client,
            "SELECT count(*) FROM tenant_knowledge WHERE source = 'product'"
        )
        .await as f64
    );
    let inputs = metric(&before, "kbsync_embedding_inputs_total", &[]);
    assert_eq!(inputs, server.inputs_total() as f64);

    // Ten edits of one product inside its window, and five new products.
    for i in 0..10 {
        client
            .execute(
                "UPDATE web_knowledge_product SET description = $1 WHERE id = md5('product-1-headlamp-1')::uuid",
                &[&format!("Edit {i}.")],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description, price)
             SELECT md5('metrics-' || g)::uuid, 1, 'Metrics lamp ' || g, 'New.', 5 FROM generate_series(1, 5) g",
        )
        .await
        .unwrap();
    converged(&client, &daemon).await;
    let after = daemon.http_get("/metrics").await.1;
    assert_eq!(
        metric(&after, "kbsync_chunks_written_total", &product) - written,
        6.0
    );
    assert_eq!(
        metric(&after, "kbsync_embedding_inputs_total", &[]) - inputs,
        6.0
    );
    assert!(metric(&after, "kbsync_embedding_requests_total", &[]) >= 1.0);
    assert!(metric(&after, "kbsync_embedding_tokens_total", &[]) > 0.0);
    // Ten changes folded into one key's pass: changes move more than keys.
    let changes = metric(&after, "kbsync_changes_total", &product)
        - metric(&before, "kbsync_changes_total", &product);
    let keys = metric(&after, "kbsync_keys_processed_total", &product)
        - metric(&before, "kbsync_keys_processed_total", &product);
    assert!(
        changes >= 15.0 && keys < changes,
        "changes {changes}, keys {keys}"
    );
    assert!(
        metric(&after, "kbsync_sync_lag_seconds", &product)
            > metric(&before, "kbsync_sync_lag_seconds", &product)
    );
    assert_eq!(metric(&after, "kbsync_outbox_backlog", &product), 0.0);
    assert_eq!(metric(&after, "kbsync_ready", &[]), 1.0);
    assert!(metric(&after, "kbsync_notifications_total", &[]) >= 1.0);
}

#[tokio::test]
async fn chunking_health_and_status_match_sql_counts() {
    let server = FakeOpenAi::start(DIMS).await;
    let base = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    // Pages wait an hour, so their changes stay in the backlog.
    let config = base.edited(&[(
        "metadata = [\"url\", \"title\"]\ndebounce = \"100ms\"\nmax_wait = \"30s\"",
        "metadata = [\"url\", \"title\"]\ndebounce = \"1h\"\nmax_wait = \"2h\"",
    )]);
    let (db, daemon, client) = installed_and_running(&config).await;
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    // Pages are in the hour-long window: the rest converges.
    wait_for(WAIT, "every source but page to be written", || async {
        let pending = count(
            &client,
            "SELECT (SELECT count(*) FROM kbsync.outbox WHERE source <> 'page')
                  + (SELECT count(*) FROM kbsync.changes WHERE source <> 'page')",
        )
        .await;
        let faqs = count(
            &client,
            "SELECT count(*) FROM tenant_knowledge WHERE source = 'faq'",
        )
        .await;
        (pending == 0 && faqs == 63).then_some(())
    })
    .await;
    client
        .batch_execute(
            "UPDATE tenant_knowledge SET embedding = NULL WHERE source = 'product' AND source_key = md5('product-1-headlamp-1')::uuid::text;
             INSERT INTO kbsync.dead_letters (source, source_key, error, attempts) VALUES ('faq', 'k', 'refused', 5);",
        )
        .await
        .unwrap();
    let (status, body) = daemon.http_get("/api/chunking-health").await;
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    let status_json = db.kbsync_with_config(config.path(), &["status", "--json"]);
    status_json.assert_success();
    let status: serde_json::Value = serde_json::from_str(&status_json.stdout).unwrap();
    for (source, eligible_sql) in [
        (
            "faq",
            "SELECT count(*) FROM web_knowledge_qapair WHERE generation_status = 'completed'",
        ),
        ("product", "SELECT count(*) FROM web_knowledge_product"),
        (
            "page",
            "SELECT count(*) FROM web_knowledge_websitepage WHERE crawl_status = 'completed'",
        ),
        ("manual", "SELECT count(*) FROM ai_model_aiprompts"),
    ] {
        let lit = format!("'{source}'");
        let want = serde_json::json!({
            "eligible_rows": count(&client, eligible_sql).await,
            "rows_with_chunks": count(&client, &format!("SELECT count(DISTINCT source_key) FROM tenant_knowledge WHERE source = {lit}")).await,
            "chunks": count(&client, &format!("SELECT count(*) FROM tenant_knowledge WHERE source = {lit}")).await,
            "chunks_without_embedding": count(&client, &format!("SELECT count(*) FROM tenant_knowledge WHERE source = {lit} AND embedding IS NULL")).await,
            "backlog": count(&client, &format!("SELECT count(*) FROM kbsync.outbox WHERE source = {lit}")).await,
            "dead_letters": count(&client, &format!("SELECT count(*) FROM kbsync.dead_letters WHERE source = {lit}")).await,
        });
        for report in [&health, &status] {
            let got = report["sources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["source"] == source)
                .unwrap();
            for field in want.as_object().unwrap().keys() {
                assert_eq!(got[field], want[field], "{source}.{field}: {got}");
            }
        }
    }
    let page = health["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "page")
        .unwrap();
    assert_eq!(page["rows_with_chunks"], 0, "pages wait an hour");
    assert!(page["backlog"].as_i64().unwrap() > 0);
    assert!(page["oldest_pending_seconds"].as_f64().unwrap() > 0.0);

    let table = db.kbsync_with_config(config.path(), &["status"]);
    table.assert_success();
    assert!(
        table.stdout.contains("coverage") && table.stdout.contains("product"),
        "{}",
        table.stdout
    );
}

#[tokio::test]
async fn search_finds_the_paraphrased_faq_and_never_another_tenants_chunks() {
    let config = local_model_config("100ms");
    let (db, daemon, client) = installed_and_running(&config).await;
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    wait_for(
        Duration::from_secs(180),
        "the demo data embedded",
        || async {
            let chunks = count(&client, "SELECT count(*) FROM tenant_knowledge").await;
            (outbox_len(&client).await == 0 && chunks == 204).then_some(())
        },
    )
    .await;
    drop(daemon);

    let search = |tenant: &str, question: &str| {
        let out = db.kbsync_with_config(
            config.path(),
            &["search", "--tenant", tenant, question, "-k", "5", "--json"],
        );
        out.assert_success();
        serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    // Tenant 2 (the bakery) asks about delivery in other words.
    let hits = search("2", "how many days until my parcel arrives?");
    assert_eq!(hits.len(), 5);
    let top = &hits[0];
    assert_eq!(top["source"], "faq", "{hits:#?}");
    let content = top["content"].as_str().unwrap();
    assert!(
        content.contains("How long does delivery take?"),
        "{hits:#?}"
    );
    for tenant in ["1", "2", "3"] {
        for hit in search(tenant, "how many days until my parcel arrives?") {
            assert_eq!(hit["tenant"], tenant, "{hit}");
            let owner = count(
                &client,
                &format!(
                    "SELECT count(*) FROM tenant_knowledge WHERE source = '{}' AND source_key = '{}' AND tenant_id = '{tenant}'",
                    hit["source"].as_str().unwrap(),
                    hit["key"].as_str().unwrap()
                ),
            )
            .await;
            assert_eq!(owner, 1, "a chunk of another tenant: {hit}");
        }
    }
    assert!(search("no-such-tenant", "delivery").is_empty());
}

#[tokio::test]
async fn errors_retry_replays_a_dead_letter_once_its_cause_is_fixed() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let (db, daemon, client) = installed_and_running(&config).await;
    server.poison("Poisoned lamp");
    client
        .batch_execute(
            "INSERT INTO accounts_user VALUES (1, 'u', 'c', 'd');
             INSERT INTO web_knowledge_product (id, user_id, name) VALUES (md5('poison')::uuid, 1, 'Poisoned lamp')",
        )
        .await
        .unwrap();
    wait_for(WAIT, "the poisoned key to be parked", || async {
        (count(&client, "SELECT count(*) FROM kbsync.dead_letters").await == 1).then_some(())
    })
    .await;
    let listed = db.kbsync_with_config(config.path(), &["errors"]);
    listed.assert_success();
    assert!(listed.stdout.contains("product"), "{}", listed.stdout);

    // The cause is fixed; replay.
    server.clear_poison();
    let retried = db.kbsync_with_config(config.path(), &["errors", "retry", "--source", "product"]);
    retried.assert_success();
    assert!(retried.stdout.contains("1 of 1"), "{}", retried.stdout);
    wait_for(WAIT, "the replayed key to be written", || async {
        let written = count(
            &client,
            "SELECT count(*) FROM tenant_knowledge WHERE source_key = md5('poison')::uuid::text AND embedding IS NOT NULL",
        )
        .await;
        let parked = count(&client, "SELECT count(*) FROM kbsync.dead_letters").await;
        (written == 1 && parked == 0).then_some(())
    })
    .await;
    let none = db.kbsync_with_config(config.path(), &["errors", "retry", "--id", "999"]);
    none.assert_failure();
    assert!(
        none.stderr.contains("no dead letter with id 999"),
        "{}",
        none.stderr
    );
    drop(daemon);
}

#[tokio::test]
async fn sighup_reloads_a_valid_config_and_keeps_running_on_an_invalid_one() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let (db, daemon, client) = installed_and_running(&config).await;
    daemon.http_address().await;

    let original = std::fs::read_to_string(config.path()).unwrap();
    std::fs::write(config.path(), "this is [not toml").unwrap();
    daemon.signal("HUP");
    wait_for(WAIT, "the reload failure in the log", || async {
        daemon
            .log()
            .contains("SIGHUP: the config does not load")
            .then_some(())
    })
    .await;
    std::fs::write(
        config.path(),
        original.replace("batch_size = 256", "batch_size = 7"),
    )
    .unwrap();
    daemon.signal("HUP");
    wait_for(WAIT, "the reload in the log", || async {
        daemon
            .log()
            .contains("SIGHUP: config reloaded")
            .then_some(())
    })
    .await;
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    converged(&client, &daemon).await;
    let mut daemon = daemon;
    assert!(daemon.exited().is_none(), "{}", daemon.log());
    let status = daemon.terminate(WAIT).await;
    assert!(status.success(), "{}", daemon.log());
}
