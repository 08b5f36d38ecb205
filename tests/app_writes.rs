//! The application's writes never wait on kbsync's work: an edit of a key whose batch
//! is in the middle of its write transaction goes through at once (it used to wait
//! for the batch's commit, behind the fence's row lock on the key's outbox entry).

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::{Duration, Instant};

use kbsync_testkit::demo_state::converged;
use kbsync_testkit::{Installed, wait_for};

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

/// The application's edit of a key, per source: (UPDATE of its text, what the key is).
fn edit_sql(source: &str) -> &'static str {
    match source {
        "faq" => {
            "UPDATE web_knowledge_qapair SET answer = answer || ' (edited)' WHERE id = $1::text::uuid"
        }
        "product" => {
            "UPDATE web_knowledge_product SET description = description || ' (edited)' WHERE id = $1::text::uuid"
        }
        "page" => {
            "UPDATE web_knowledge_websitepage SET content = content || ' (edited)' WHERE id = $1::text::uuid"
        }
        "manual" => {
            "UPDATE ai_model_aiprompts SET manual_prompt = manual_prompt || ' (edited)' WHERE user_id = $1::text::int"
        }
        other => panic!("no edit for source {other}"),
    }
}

#[tokio::test]
async fn an_application_write_is_never_held_behind_a_batch_write() {
    let setup = Installed::new(DIMS, "0s", "0s").await;
    // One worker and the largest batch: every claimed key is in the one batch that is
    // held in its write transaction below.
    let config = setup.config.edited(&[
        ("max_concurrency = 2", "max_concurrency = 1"),
        ("batch_size = 256", "batch_size = 10000"),
    ]);
    let blocker = setup.db.client().await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE tenant_knowledge IN SHARE MODE")
        .await
        .unwrap();
    let daemon = setup.daemon_with(&config);
    setup.seed();
    let client = &setup.client;
    // The batch has fenced its keys and waits, inside its write transaction, for the
    // lock the test holds.
    let in_write = "SELECT EXISTS (
        SELECT FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'kbsync'
           AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO public.tenant_knowledge%')";
    wait_for(WAIT, "the batch waiting inside its write", || async {
        let at: bool = client.query_one(in_write, &[]).await.unwrap().get(0);
        at.then_some(())
    })
    .await;
    let claimed: Vec<(String, String)> = client
        .query(
            "SELECT source, source_key FROM kbsync.outbox
              WHERE claim_token IS NOT NULL AND scope = 'row' ORDER BY 1, 2 LIMIT 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!claimed.is_empty(), "nothing is claimed by the held batch");

    // The application edits keys of that batch, each in its own transaction, with a
    // lock timeout far above what an edit takes on its own and far below "until the
    // batch commits" (never, while the test holds its lock).
    let app = setup.db.client().await;
    app.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    for (source, key) in &claimed {
        let started = Instant::now();
        let edited = app
            .execute(edit_sql(source), &[key])
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the application's edit of {source} {key} waited on kbsync's batch: {}",
                    kbsync_core::db::describe(&e)
                )
            });
        let took = started.elapsed();
        assert_eq!(edited, 1, "{source} {key}");
        assert!(
            took < Duration::from_secs(1),
            "the application's edit of {source} {key} took {took:?} while kbsync's batch was held"
        );
    }
    let still_held: bool = client.query_one(in_write, &[]).await.unwrap().get(0);
    assert!(
        still_held,
        "the batch was no longer in its write when the edits ran"
    );

    // Let go: the batch commits, and the edits made meanwhile are processed after it.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    converged(client, &daemon).await;
    for (source, key) in &claimed {
        let content: String = client
            .query_one(
                "SELECT content FROM tenant_knowledge WHERE source = $1 AND source_key = $2",
                &[source, key],
            )
            .await
            .unwrap()
            .get(0);
        // The edited column is not always the text's last part (a product's
        // description is followed by its category and price).
        assert!(
            content.contains(" (edited)"),
            "{source} {key}: the edit made during the batch is not in the knowledge base: {content:?}"
        );
    }
}
