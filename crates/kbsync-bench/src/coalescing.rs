//! What edits cost in embedding inputs (coalescing, no-op updates), and what one
//! tenant's bulk import costs another tenant's edit (fairness).

use std::time::{Duration, Instant};

use kbsync_testkit::{DaemonProcess, FakeOpenAi, sync_config};
use tokio_postgres::Client;

use crate::bench_db::{demo_db, drained};
use kbsync_testkit::demo_state::outbox_len;

const DIMS: usize = 8;

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

pub async fn rows() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "1s", "100ms");
    let (db, client) = demo_db(&config).await;
    let daemon = DaemonProcess::start_as_shipped(config.path(), db.url());
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    drained(&client, &[&daemon], Duration::from_secs(600)).await;

    // 10 edits of each of 20 products inside their 1 s window.
    let before = server.inputs_total();
    for i in 0..10 {
        client
            .execute(
                "UPDATE web_knowledge_product SET description = 'Revision ' || $1::int || ' of ' || name
                  WHERE user_id = 1 AND name LIKE 'Classic%'",
                &[&i],
            )
            .await
            .expect("edits");
    }
    let edited = count(
        &client,
        "SELECT count(*) FROM web_knowledge_product WHERE user_id = 1 AND name LIKE 'Classic%'",
    )
    .await;
    drained(&client, &[&daemon], Duration::from_secs(600)).await;
    out.push((
        format!("embedding inputs per row, 10 edits of each of {edited} rows inside the window (target 1)"),
        format!("{:.2}", (server.inputs_total() - before) as f64 / edited as f64),
    ));

    // 1,000 updates that touch no column of any text.
    let before = server.inputs_total();
    let queued_before = outbox_len(&client).await;
    for _ in 0..10 {
        client
            .batch_execute(
                "UPDATE web_knowledge_product SET updated_at = now() WHERE id IN (SELECT id FROM web_knowledge_product LIMIT 100)",
            )
            .await
            .expect("touches");
    }
    let queued = outbox_len(&client).await - queued_before;
    drained(&client, &[&daemon], Duration::from_secs(600)).await;
    out.push((
        "embedding inputs for 1,000 updated_at touches (target 0)".into(),
        format!(
            "{} (outbox entries made: {queued})",
            server.inputs_total() - before
        ),
    ));
    drop(daemon);

    // Fairness: tenant 2's one edit while tenant 1's 50,000-row import is processed.
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "0s", "0s");
    let (db, client) = demo_db(&config).await;
    client
        .batch_execute(
            "INSERT INTO accounts_user VALUES (1, 'a', 'A', 'a.example'), (2, 'b', 'B', 'b.example');
             INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('import-' || g)::uuid, 1, 'Imported ' || g, 'Bulk.' FROM generate_series(1, 50000) g;",
        )
        .await
        .expect("tenant 1's import");
    let daemon = DaemonProcess::start_as_shipped(config.path(), db.url());
    // Let the import get going, then tenant 2 edits.
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&client, "SELECT count(*) FROM tenant_knowledge").await < 2_000 {
        assert!(Instant::now() < deadline, "the import did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name) VALUES (md5('b')::uuid, 2, 'Tenant B lamp')",
        )
        .await
        .expect("tenant 2's edit");
    while count(
        &client,
        "SELECT count(*) FROM tenant_knowledge WHERE tenant_id = '2'",
    )
    .await
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "tenant 2's edit never written:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let latency = started.elapsed();
    let import_done = count(
        &client,
        "SELECT count(*) FROM tenant_knowledge WHERE tenant_id = '1'",
    )
    .await;
    out.push((
        "tenant B's one edit, commit → visible, during tenant A's 50,000-row import".into(),
        format!(
            "{:.0} ms (A's rows written by then: {import_done} of 50,000)",
            latency.as_secs_f64() * 1000.0
        ),
    ));
    out
}
