//! The embedding index and a large backlog: written without the HNSW index, built
//! back concurrently, search exact throughout, and a build interrupted by a killed
//! daemon or a crash never leaves an invalid index in place.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_core::search::index::{self, IndexState};
use kbsync_testkit::demo_state::{converged, outbox_len};
use kbsync_testkit::{Installed, TempConfig, wait_for_daemon};
use tokio_postgres::Client;

const DIMS: usize = 8;
const WITHIN: Duration = Duration::from_secs(90);

/// Defer for a backlog of 500 entries or more; build again under 50.
fn deferring(s: &Installed) -> TempConfig {
    s.config
        .edited(&[("defer_above = 10000", "defer_above = 500")])
}

async fn installed_with_demo_rows() -> Installed {
    installed_with_demo_rows_at(DIMS).await
}

async fn installed_with_demo_rows_at(dims: usize) -> Installed {
    let s = Installed::new(dims, "0s", "0s").await;
    s.seed();
    s
}

/// 3,000 products for three tenants, queued by the capture triggers.
async fn queue_products(client: &Client) {
    client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('backlog ' || i)::uuid, 1 + i % 3, 'Backlog item ' || i,
                    'Backlog description number ' || i
               FROM generate_series(1, 3000) i",
        )
        .await
        .unwrap();
}

async fn index_state(client: &Client) -> IndexState {
    index::state(client).await.unwrap()
}

/// The application's query: tenant 1's five nearest chunks to a stored vector, by id,
/// as the planner runs it and as an exact scan, in one snapshot.
async fn nearest_planned_and_exact(client: &mut Client) -> (Vec<i64>, Vec<i64>) {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let query = "SELECT id FROM tenant_knowledge
                  WHERE tenant_id = '1' AND embedding IS NOT NULL
                  ORDER BY embedding <=> (SELECT embedding FROM tenant_knowledge
                                           WHERE embedding IS NOT NULL ORDER BY id LIMIT 1), id
                  LIMIT 5";
    let ids = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect();
    let planned = ids(tx.query(query, &[]).await.unwrap());
    tx.batch_execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
        .await
        .unwrap();
    let exact = ids(tx.query(query, &[]).await.unwrap());
    tx.commit().await.unwrap();
    (planned, exact)
}

#[tokio::test]
async fn a_large_backlog_is_written_without_the_index_which_is_then_built_concurrently() {
    backlog_without_the_index(installed_with_demo_rows().await, true).await;
}

/// The same with a 3,072-dimension model: the index the daemon builds back is on
/// halfvec (halfvec_cosine_ops).
#[tokio::test]
async fn a_3072_dimension_index_is_dropped_and_built_again_on_halfvec() {
    // Random vectors of 3,072 dimensions are all nearly equidistant: the approximate
    // index may rank them otherwise than an exact scan, so exactness is checked only
    // while there is no index.
    let s = backlog_without_the_index(installed_with_demo_rows_at(3072).await, false).await;
    let ops: String = s
        .client
        .query_one(
            "SELECT o.opcname::text FROM pg_index i JOIN pg_opclass o ON o.oid = i.indclass[0]
              WHERE i.indexrelid = 'public.tenant_knowledge_embedding_hnsw'::regclass AND i.indisvalid",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ops, "halfvec_cosine_ops");
}

/// A backlog large enough to defer the index: search is exact while the index is gone
/// (and, if `exact_when_valid`, whatever its state), and the daemon builds it back.
async fn backlog_without_the_index(mut s: Installed, exact_when_valid: bool) -> Installed {
    let config = deferring(&s);
    queue_products(&s.client).await;
    let daemon = s.daemon_with(&config);
    // Watch the index and the application's query until the index is back.
    let mut seen_missing = false;
    let mut checks_without_index = 0;
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let state = index_state(&s.client).await;
        let (planned, exact) = nearest_planned_and_exact(&mut s.client).await;
        if exact_when_valid || state == IndexState::Missing {
            assert_eq!(
                planned, exact,
                "search was not exact with the index {state:?}"
            );
        }
        match state {
            IndexState::Missing | IndexState::Building { .. } => {
                seen_missing = true;
                checks_without_index += 1;
            }
            IndexState::Valid if seen_missing => break,
            IndexState::Valid => {}
            IndexState::Invalid => panic!("an invalid index appeared:\n{}", daemon.log()),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the index was not dropped and built again within {WITHIN:?}:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checks_without_index > 0);
    converged(&s.client, &daemon).await;
    assert_eq!(outbox_len(&s.client).await, 0);
    let products: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM tenant_knowledge WHERE content LIKE '%Backlog description number%' AND embedding IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(products, 3000);
    // The planner uses the rebuilt index again.
    let plan: Vec<String> = s
        .client
        .query(
            "EXPLAIN SELECT id FROM tenant_knowledge ORDER BY embedding <=> (SELECT embedding FROM tenant_knowledge LIMIT 1) LIMIT 5",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains(index::HNSW_INDEX)),
        "{plan:?}"
    );
    let (_, metrics) = daemon.http_get("/metrics").await;
    assert!(
        metrics.contains("kbsync_index_deferrals_total 1"),
        "{metrics}"
    );

    // A small backlog afterwards is written into the index row by row.
    s.client
        .batch_execute(
            "UPDATE web_knowledge_product SET description = description || ' (edited)'
              WHERE id IN (SELECT md5('backlog ' || i)::uuid FROM generate_series(1, 100) i)",
        )
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(index_state(&s.client).await, IndexState::Valid);
    s
}

/// An open transaction that has written to `tenant_knowledge`: a concurrent index build
/// waits for it before it starts ("waiting for writers before build").
async fn hold_a_writer(client: &mut Client) -> tokio_postgres::Transaction<'_> {
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE tenant_knowledge IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    tx
}

#[tokio::test]
async fn a_daemon_killed_during_the_index_build_leaves_the_build_to_finish_valid() {
    let s = installed_with_demo_rows().await;
    let config = deferring(&s);
    queue_products(&s.client).await;
    let mut daemon = s.daemon_with(&config);
    wait_for_daemon(&daemon, WITHIN, "the index deferred", || async {
        (index_state(&s.client).await == IndexState::Missing).then_some(())
    })
    .await;
    let mut writer = s.db.client().await;
    let held = hold_a_writer(&mut writer).await;
    wait_for_daemon(&daemon, WITHIN, "the index build to start", || async {
        matches!(index_state(&s.client).await, IndexState::Building { .. }).then_some(())
    })
    .await;
    daemon.kill();
    // Another daemon starts meanwhile: it must leave the running build alone.
    let second = s.daemon_with(&config);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let state = index_state(&s.client).await;
    assert!(
        matches!(state, IndexState::Building { .. }),
        "the killed daemon's build is gone: {state:?}\n{}",
        second.log()
    );
    held.commit().await.unwrap();
    wait_for_daemon(
        &second,
        WITHIN,
        "the killed daemon's build to finish",
        || async { (index_state(&s.client).await == IndexState::Valid).then_some(()) },
    )
    .await;
    converged(&s.client, &second).await;
    assert!(
        !second.log().contains("building the embedding index"),
        "the second daemon built the index again:\n{}",
        second.log()
    );
}

#[tokio::test]
async fn an_invalid_index_left_by_an_interrupted_build_is_dropped_and_built_again() {
    let s = installed_with_demo_rows().await;
    let daemon = s.daemon();
    converged(&s.client, &daemon).await;
    drop(daemon);
    // What a server crash during a concurrent build leaves: the index in the catalog,
    // invalid. Here a statement timeout interrupts the build while it waits.
    s.client
        .batch_execute(&format!("DROP INDEX {}", index::HNSW_INDEX))
        .await
        .unwrap();
    let mut writer = s.db.client().await;
    let held = hold_a_writer(&mut writer).await;
    s.client
        .batch_execute("SET statement_timeout = '1s'")
        .await
        .unwrap();
    let interrupted = s
        .client
        .batch_execute(&index::create_sql(
            true,
            kbsync_core::config::VectorType::Vector,
        ))
        .await
        .unwrap_err();
    assert!(
        interrupted.to_string().contains("statement timeout")
            || format!("{interrupted:?}").contains("57014"),
        "{interrupted:?}"
    );
    held.commit().await.unwrap();
    s.client
        .batch_execute("SET statement_timeout = 0")
        .await
        .unwrap();
    assert_eq!(index_state(&s.client).await, IndexState::Invalid);
    let status =
        s.db.kbsync_with_config(s.config.path(), &["status"])
            .assert_success()
            .stdout
            .clone();
    assert!(status.contains("embedding index: INVALID"), "{status}");

    let daemon = s.daemon();
    wait_for_daemon(&daemon, WITHIN, "the index rebuilt valid", || async {
        (index_state(&s.client).await == IndexState::Valid).then_some(())
    })
    .await;
    let status =
        s.db.kbsync_with_config(s.config.path(), &["status"])
            .assert_success()
            .stdout
            .clone();
    assert!(
        status.contains("embedding index: valid (kept by a running daemon)"),
        "{status}"
    );
    assert!(daemon.log().contains("the embedding index is invalid"));
}

#[tokio::test]
async fn with_defer_above_zero_the_daemon_leaves_the_index_alone() {
    let s = installed_with_demo_rows().await;
    let config = s
        .config
        .edited(&[("defer_above = 10000", "defer_above = 0")]);
    s.client
        .batch_execute(&format!("DROP INDEX {}", index::HNSW_INDEX))
        .await
        .unwrap();
    let daemon = s.daemon_with(&config);
    converged(&s.client, &daemon).await;
    // Nothing to wait for: the keeper must not act, so give it a few looks.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(index_state(&s.client).await, IndexState::Missing);
    let status =
        s.db.kbsync_with_config(config.path(), &["status"])
            .assert_success()
            .stdout
            .clone();
    assert!(status.contains("kbsync leaves it to you"), "{status}");
}
