//! A write PostgreSQL itself rejects — a constraint the users put on their knowledge
//! table, a trigger that runs past `statement_timeout` — is pinned on its key: the
//! rest of the batch is written, the key is retried, then parked in the dead letters
//! with PostgreSQL's message, the daemon keeps running, and `kbsync errors retry`
//! replays it once the cause is gone.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::demo_state::{ChunkSet, TEST_MODEL, actual, converged, expected, outbox_len};
use kbsync_testkit::{Installed, wait_for};
use tokio_postgres::Client;

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(90);
/// The product whose text is made unacceptable (a demo row).
const MARKED: &str = "md5('product-3-U-lock-2')::uuid";

/// Demo rows written while no daemon runs, one product carrying `marker`: the daemon's
/// first batches hold that product together with others.
async fn seeded_with_marker(marker: &str) -> (Installed, String) {
    let s = Installed::new(DIMS, "100ms", "100ms").await;
    s.seed();
    let key: String = s
        .client
        .query_one(
            &format!(
                "UPDATE web_knowledge_product SET description = description || ' ' || $1
                  WHERE id = {MARKED} RETURNING id::text"
            ),
            &[&marker],
        )
        .await
        .unwrap()
        .get(0);
    (s, key)
}

/// Wait for `key` to be parked with the outbox drained; return its error and attempts.
async fn parked(client: &Client, key: &str) -> (String, i32) {
    wait_for(WAIT, "the rejected key in the dead letters", || async {
        let row = client
            .query_opt(
                "SELECT error, attempts FROM kbsync.dead_letters WHERE source = 'product' AND source_key = $1",
                &[&key],
            )
            .await
            .unwrap();
        match row {
            Some(r) if outbox_len(client).await == 0 => Some((r.get(0), r.get(1))),
            _ => None,
        }
    })
    .await
}

/// Everything but `key` is in the knowledge table, exactly; `key` has no chunk.
async fn all_but(client: &Client, key: &str) {
    let want: ChunkSet = expected(client)
        .await
        .into_iter()
        .filter(|(source, k, _, _)| !(source == "product" && k == key))
        .collect();
    let got = actual(client, TEST_MODEL).await;
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}; extra {extra:?}"
    );
}

async fn dead_letter_count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM kbsync.dead_letters", &[])
        .await
        .unwrap()
        .get(0)
}

/// Seed with `marker` in one product's text, create the cause (`{db}` in it is the
/// test database's name), run the daemon: the product must be parked alone with an
/// error containing every one of `error_has`, the rest written, the daemon alive;
/// then `fix` and `kbsync errors retry --all` must bring the table to exact.
async fn rejected_alone_then_replayed(marker: &str, cause: &str, error_has: &[&str], fix: &str) {
    let (s, key) = seeded_with_marker(marker).await;
    s.client
        .batch_execute(&cause.replace("{db}", s.db.name()))
        .await
        .unwrap();
    let mut daemon = s.daemon();

    let (error, attempts) = parked(&s.client, &key).await;
    assert!(
        error_has.iter().all(|part| error.contains(part)),
        "the dead letter carries PostgreSQL's message ({error_has:?}): {error}"
    );
    assert_eq!(
        attempts, 2,
        "parked after max_attempts (2 in the test config)"
    );
    assert_eq!(dead_letter_count(&s.client).await, 1);
    all_but(&s.client, &key).await;
    assert!(daemon.exited().is_none(), "{}", daemon.log());
    assert!(
        daemon.log().contains("writing its keys one at a time"),
        "{}",
        daemon.log()
    );

    // The cause removed, the key is replayed and written.
    s.client.batch_execute(fix).await.unwrap();
    s.db.kbsync_with_config(s.config.path(), &["errors", "retry", "--all"])
        .assert_success();
    converged(&s.client, &daemon).await;
    assert_eq!(dead_letter_count(&s.client).await, 0);
}

#[tokio::test]
async fn a_constraint_violation_fails_only_its_key_is_dead_lettered_and_replayable() {
    rejected_alone_then_replayed(
        "REJECTED-BY-CHECK",
        "ALTER TABLE tenant_knowledge ADD CONSTRAINT no_rejected_words
             CHECK (content NOT LIKE '%REJECTED-BY-CHECK%') NOT VALID",
        &["23514", "no_rejected_words"],
        "ALTER TABLE tenant_knowledge DROP CONSTRAINT no_rejected_words",
    )
    .await;
}

#[tokio::test]
async fn a_statement_timeout_fails_only_its_key_is_dead_lettered_and_replayable() {
    // A user's trigger on the knowledge table that is slow for one text, and a
    // statement_timeout for every new session of the database (the daemon's too).
    rejected_alone_then_replayed(
        "SLOW-TO-WRITE",
        "CREATE FUNCTION slow_for_one_text() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.content LIKE '%SLOW-TO-WRITE%' THEN PERFORM pg_sleep(5); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER slow_for_one_text BEFORE INSERT OR UPDATE ON tenant_knowledge
             FOR EACH ROW EXECUTE FUNCTION slow_for_one_text();
         ALTER DATABASE \"{db}\" SET statement_timeout = '1s';",
        &["57014", "statement timeout"],
        "DROP TRIGGER slow_for_one_text ON tenant_knowledge",
    )
    .await;
}
