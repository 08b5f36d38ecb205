//! The capture triggers: changes recorded in the writer's transaction (and folded
//! into one outbox entry per key by `outbox::collect`), nothing for irrelevant
//! updates, deletes of every kind recorded, one NOTIFY per capturing statement.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_core::outbox;
use kbsync_testkit::{Listener, TestDb};
use tokio_postgres::Client;

/// Demo schema + kbsync installed + demo rows, with the outbox emptied.
async fn installed_with_demo_rows() -> (TestDb, Client) {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    db.kbsync(&["demo", "data"]).assert_success();
    let client = db.client().await;
    client
        .batch_execute("DELETE FROM kbsync.outbox; DELETE FROM kbsync.changes")
        .await
        .unwrap();
    (db, client)
}

/// (source, scope, key, deleted, version) of every outbox row, once the captured
/// changes are collected (as the daemon's collector does).
async fn outbox(
    client: &impl tokio_postgres::GenericClient,
) -> Vec<(String, String, String, bool, i64)> {
    outbox::collect(client).await.unwrap();
    client
        .query(
            "SELECT source, scope, source_key, deleted, version FROM kbsync.outbox ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[tokio::test]
async fn seeding_through_the_triggers_records_every_eligible_row() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    db.kbsync(&["demo", "data"]).assert_success();
    let client = db.client().await;
    outbox::collect(&client).await.unwrap();
    let counts = client
        .query_one(
            "SELECT (SELECT count(*) FROM kbsync.outbox WHERE source = 'faq')
                  = (SELECT count(*) FROM web_knowledge_qapair WHERE generation_status = 'completed'),
                    (SELECT count(*) FROM kbsync.outbox WHERE source = 'page')
                  = (SELECT count(*) FROM web_knowledge_websitepage WHERE crawl_status = 'completed'),
                    (SELECT count(*) FROM kbsync.outbox WHERE source = 'product')
                  = (SELECT count(*) FROM web_knowledge_product),
                    (SELECT count(*) FROM kbsync.outbox WHERE source = 'manual')
                  = (SELECT count(*) FROM ai_model_aiprompts),
                    (SELECT count(*) FROM kbsync.outbox WHERE deleted)",
            &[],
        )
        .await
        .unwrap();
    for i in 0..4 {
        assert!(
            counts.get::<_, bool>(i),
            "source {i}: outbox does not match eligible rows"
        );
    }
    assert_eq!(counts.get::<_, i64>(4), 0);
}

#[tokio::test]
async fn a_write_for_each_source_is_recorded_in_the_writers_transaction() {
    let (_db, mut client) = installed_with_demo_rows().await;
    let page = "00000000-0000-0000-0000-0000000000a1";
    let qa = "00000000-0000-0000-0000-0000000000b1";
    let product = "00000000-0000-0000-0000-0000000000c1";
    let writes = format!(
        "INSERT INTO accounts_user VALUES (9, 'new', 'New Co', 'new.example');
         INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
              VALUES ('{page}', 9, 'https://new.example/', 'Home', 'Welcome', 'completed');
         INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
              VALUES ('{qa}', '{page}', 'Q?', 'A.', 'completed');
         INSERT INTO web_knowledge_product (id, user_id, name) VALUES ('{product}', 9, 'Thing');
         INSERT INTO ai_model_aiprompts (user_id, manual_prompt) VALUES (9, 'Be nice.');"
    );

    // Rolled back: no trace in the change log nor the outbox.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&writes).await.unwrap();
    assert_eq!(
        outbox(&tx).await.len(),
        4,
        "the writer's transaction sees its changes"
    );
    tx.rollback().await.unwrap();
    assert!(
        outbox(&client).await.is_empty(),
        "a rolled-back write left outbox rows"
    );

    // Committed: one row per source and key, not deleted.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&writes).await.unwrap();
    tx.commit().await.unwrap();
    let rows = outbox(&client).await;
    let expected = vec![
        ("faq".to_owned(), "row".to_owned(), qa.to_owned(), false, 1),
        ("manual".into(), "row".into(), "9".into(), false, 1),
        ("page".into(), "row".into(), page.into(), false, 1),
        ("product".into(), "row".into(), product.into(), false, 1),
    ];
    assert_eq!(rows, expected);
}

#[tokio::test]
async fn updates_of_unrelated_columns_record_nothing_and_repeated_edits_fold() {
    let (_db, client) = installed_with_demo_rows().await;
    client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET updated_at = now() + interval '1 hour';
             UPDATE web_knowledge_product SET created_at = now() - interval '1 day';
             UPDATE web_knowledge_websitepage SET updated_at = now();
             UPDATE ai_model_aiprompts SET updated_at = now();
             UPDATE web_knowledge_qapair SET answer = answer || ' (edited)' WHERE generation_status <> 'completed';",
        )
        .await
        .unwrap();
    assert!(
        outbox(&client).await.is_empty(),
        "irrelevant updates were captured"
    );

    for i in 0..10 {
        client
            .execute(
                "UPDATE web_knowledge_product SET description = $1 WHERE id = md5('product-1-headlamp-1')::uuid",
                &[&format!("edit {i}")],
            )
            .await
            .unwrap();
    }
    let rows = outbox(&client).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].4, 10, "ten edits fold into one row with version 10");
}

#[tokio::test]
async fn deletes_cascades_truncate_and_leaving_the_filter_are_recorded_as_deletes() {
    let (_db, client) = installed_with_demo_rows().await;
    // Leaving the filter.
    client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET generation_status = 'failed'
              WHERE id = md5('qa-1-payment-1')::uuid",
        )
        .await
        .unwrap();
    // Cascade: deleting a page deletes its QAPairs.
    client
        .batch_execute(
            "DELETE FROM web_knowledge_websitepage WHERE id = md5('page-2-shipping')::uuid",
        )
        .await
        .unwrap();
    client
        .batch_execute("TRUNCATE ai_model_aiprompts")
        .await
        .unwrap();
    let rows = outbox(&client).await;
    let deleted = |source: &str| rows.iter().filter(|r| r.0 == source && r.3).count();
    assert_eq!(
        deleted("faq"),
        1 + 5,
        "one left the filter, five cascaded: {rows:?}"
    );
    assert_eq!(deleted("page"), 1);
    assert!(
        rows.contains(&("manual".into(), "source".into(), String::new(), true, 1)),
        "TRUNCATE is recorded for the whole source: {rows:?}"
    );
    // A QAPair coming back into the filter is an upsert, not a delete.
    client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET generation_status = 'completed'
              WHERE id = md5('qa-1-payment-1')::uuid",
        )
        .await
        .unwrap();
    let rows = outbox(&client).await;
    let back = rows
        .iter()
        .find(|r| r.0 == "faq" && !r.3)
        .expect("the re-completed QAPair");
    assert_eq!(back.4, 2);
}

#[tokio::test]
async fn a_changed_key_records_the_old_key_as_deleted() {
    let (_db, client) = installed_with_demo_rows().await;
    client
        .batch_execute(
            "INSERT INTO accounts_user VALUES (7, 'x', 'X', 'x.example');
             DELETE FROM kbsync.outbox; DELETE FROM kbsync.changes;
             UPDATE ai_model_aiprompts SET user_id = 7 WHERE user_id = 2;",
        )
        .await
        .unwrap();
    let rows = outbox(&client).await;
    assert_eq!(
        rows,
        vec![
            ("manual".into(), "row".into(), "2".into(), true, 1),
            ("manual".into(), "row".into(), "7".into(), false, 1),
        ]
    );
}

#[tokio::test]
async fn a_bulk_update_sends_one_notification_and_records_every_key() {
    let (db, client) = installed_with_demo_rows().await;
    client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('bulk-' || i)::uuid, 1 + i % 3, 'Bulk item ' || i, 'first'
               FROM generate_series(1, 20000) i;
             DELETE FROM kbsync.outbox; DELETE FROM kbsync.changes;",
        )
        .await
        .unwrap();
    let mut listener = Listener::start(db.url(), "kbsync").await;
    let updated = client
        .execute(
            "UPDATE web_knowledge_product SET description = 'second' WHERE name LIKE 'Bulk item %'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 20_000);
    let notes = listener.drain(Duration::from_secs(2)).await;
    assert_eq!(notes, vec![("kbsync".to_owned(), "product".to_owned())]);
    assert_eq!(outbox::collect(&client).await.unwrap(), 20_000);
    // The fold announces what it moved, once, for every daemon's workers (the other
    // daemons' collectors lost the race for the log and found it empty); a fold that
    // moves nothing says nothing.
    assert_eq!(
        listener.drain(Duration::from_secs(1)).await,
        vec![("kbsync".to_owned(), "outbox".to_owned())]
    );
    assert_eq!(outbox::collect(&client).await.unwrap(), 0);
    assert!(listener.drain(Duration::from_secs(1)).await.is_empty());
    let recorded: i64 = client
        .query_one(
            "SELECT count(*) FROM kbsync.outbox WHERE source = 'product'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 20_000);

    // An irrelevant bulk touch sends nothing at all.
    client
        .execute("UPDATE web_knowledge_product SET updated_at = now()", &[])
        .await
        .unwrap();
    assert!(listener.drain(Duration::from_secs(1)).await.is_empty());
    drop(listener.client);
}
