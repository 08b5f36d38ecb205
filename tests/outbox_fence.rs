//! Claims and the claim fence: workers claiming at once take different entries, and
//! a worker whose lease ran out and whose entry was claimed again by another worker
//! can no longer write or acknowledge it.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_core::config::{Config, Source};
use kbsync_core::outbox::{self, Scope};
use kbsync_testkit::{TestDb, shipped_config, wait_for};

/// A database with one AIPrompts row captured in the outbox, and the `manual`
/// source with no debounce.
async fn one_prompt() -> (TestDb, tokio_postgres::Client, Source) {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO accounts_user VALUES (1, 'a', 'A', 'a.example');
             INSERT INTO ai_model_aiprompts (user_id, manual_prompt) VALUES (1, 'Hello');",
        )
        .await
        .unwrap();
    outbox::collect(&client).await.unwrap();
    (db, client, undebounced("manual"))
}

/// The shipped config's source `name`, with no debounce.
fn undebounced(name: &str) -> Source {
    let config = Config::load(&shipped_config()).unwrap();
    let mut source = config.source_named(name).unwrap();
    source.debounce = Duration::ZERO;
    source
}

#[tokio::test]
async fn a_slower_worker_cannot_write_over_a_newer_claim() {
    let (_db, client, source) = one_prompt().await;
    let slow = uuid::Uuid::new_v4();
    let fast = uuid::Uuid::new_v4();
    let claimed = outbox::claim(&client, &source, slow, Duration::from_millis(100), 10, None)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(
        outbox::claim(&client, &source, fast, Duration::from_secs(60), 10, None)
            .await
            .unwrap()
            .is_empty(),
        "a live claim was taken"
    );
    // Once the slow worker's lease has run out, another worker takes the entry.
    let taken = wait_for(Duration::from_secs(10), "the lease to run out", || async {
        let c = outbox::claim(&client, &source, fast, Duration::from_secs(60), 10, None)
            .await
            .unwrap();
        (!c.is_empty()).then_some(c)
    })
    .await;
    let keys = vec!["1".to_owned()];
    assert!(
        outbox::fence(&client, "manual", slow, Scope::Row, &keys)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        outbox::fence(&client, "manual", fast, Scope::Row, &keys)
            .await
            .unwrap(),
        keys
    );
    // The slow worker's acknowledgement removes nothing; the fast one's does.
    outbox::acknowledge(
        &client,
        "manual",
        slow,
        Scope::Row,
        &[("1".into(), taken[0].version)],
    )
    .await
    .unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    outbox::acknowledge(
        &client,
        "manual",
        fast,
        Scope::Row,
        &[("1".into(), taken[0].version)],
    )
    .await
    .unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn an_entry_changed_during_processing_stays_for_another_pass() {
    let (_db, client, source) = one_prompt().await;
    let token = uuid::Uuid::new_v4();
    let claimed = outbox::claim(&client, &source, token, Duration::from_secs(60), 10, None)
        .await
        .unwrap();
    // The application edits the row while the worker is embedding the old text.
    client
        .batch_execute(
            "UPDATE ai_model_aiprompts SET manual_prompt = 'Hello again' WHERE user_id = 1",
        )
        .await
        .unwrap();
    // The daemon's collector folds the new change into the claimed entry meanwhile.
    assert_eq!(outbox::collect(&client).await.unwrap(), 1);
    outbox::acknowledge(
        &client,
        "manual",
        token,
        Scope::Row,
        &[("1".into(), claimed[0].version)],
    )
    .await
    .unwrap();
    let row = client
        .query_one(
            "SELECT version, claim_token IS NULL FROM kbsync.outbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert!(
        row.get::<_, bool>(1),
        "the newer change was not released for processing"
    );
}

#[tokio::test]
async fn a_claim_beside_another_in_progress_takes_the_next_entries_not_none() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    let mut client = db.client().await;
    // Two tenants with 100 QAPairs each.
    client
        .batch_execute(
            "INSERT INTO accounts_user VALUES (1, 'a', 'A', 'a.example'), (2, 'b', 'B', 'b.example');
             INSERT INTO web_knowledge_websitepage (id, user_id, url, crawl_status)
                  SELECT md5('page' || u)::uuid, u, 'https://example/' || u, 'completed'
                    FROM generate_series(1, 2) u;
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
                  SELECT md5('qa' || u || '-' || g)::uuid, md5('page' || u)::uuid, 'Q ' || g, 'A ' || g, 'completed'
                    FROM generate_series(1, 2) u, generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    outbox::collect(&client).await.unwrap();
    let source = undebounced("faq");
    let lease = Duration::from_secs(60);
    // A worker's claim still running (its transaction open, its rows locked)...
    let first = client.transaction().await.unwrap();
    let mine = outbox::claim(&first, &source, uuid::Uuid::new_v4(), lease, 50, None)
        .await
        .unwrap();
    assert_eq!(mine.len(), 50);
    // ...and another worker's claim at the same moment, on its own connection.
    let other_client = db.client().await;
    let theirs = outbox::claim(
        &other_client,
        &source,
        uuid::Uuid::new_v4(),
        lease,
        50,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        theirs.len(),
        50,
        "a claim beside another one in progress came away short, though 150 entries were ready"
    );
    let mine: std::collections::HashSet<String> = mine.into_iter().map(|c| c.key).collect();
    assert!(
        theirs.iter().all(|c| !mine.contains(&c.key)),
        "two claims took the same entry"
    );
    // Both tenants got their share in each claim.
    let tenants: i64 = other_client
        .query_one(
            "SELECT count(DISTINCT tenant) FROM kbsync.outbox WHERE claim_token IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenants, 2);
    first.commit().await.unwrap();
}
