//! The databases the benchmarks run against: demo tables with kbsync installed, and
//! QAPairs loaded in bulk.

use std::time::{Duration, Instant};

use kbsync_testkit::demo_state::outbox_len;
use kbsync_testkit::{DaemonProcess, TempConfig, TestDb};
use tokio_postgres::{Client, NoTls};

/// Wait until nothing is pending (outbox entries and uncollected changes), at most
/// `within`; a timeout shows the daemons' logs.
pub async fn drained(client: &Client, daemons: &[&DaemonProcess], within: Duration) {
    let deadline = Instant::now() + within;
    while outbox_len(client).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain in {within:?}:\n{}",
            daemons.iter().map(|d| d.log()).collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("bench connection");
    tokio::spawn(conn);
    client
}

/// A fresh database with the demo tables and kbsync installed with `config`.
pub async fn demo_db(config: &TempConfig) -> (TestDb, Client) {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let client = connect(db.url()).await;
    (db, client)
}

/// `n` completed QAPairs of one tenant (user 1) on one page whose crawl status is
/// `page_status` ('pending' keeps the page itself out of the knowledge base).
pub async fn load_qapairs(client: &Client, n: i64, page_status: &str) {
    client
        .execute(
            "WITH u AS (INSERT INTO accounts_user VALUES (1, 'u', 'c', 'd') RETURNING id),
                  p AS (INSERT INTO web_knowledge_websitepage (id, user_id, url, crawl_status)
                        SELECT md5('bench-page')::uuid, id, 'https://example/', $2 FROM u RETURNING id)
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
             SELECT md5('bench-' || g)::uuid, p.id, 'How do I do thing number ' || g || '?',
                    'Thing ' || g || ' is done in three steps: open the settings, choose it, save.', 'completed'
               FROM p, generate_series(1, $1::bigint) g",
            &[&n, &page_status],
        )
        .await
        .expect("loading QAPairs");
}
