//! `kbsync run` end to end: real PostgreSQL, the real binary, an OpenAI-compatible
//! test server. Each test waits with deadlines for the state it expects.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::collections::BTreeSet;
use std::time::Duration;

use kbsync_testkit::demo_state::{converged, outbox_len};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, Fault, Installed, TEST_API_KEY, TestDb, wait_for, wait_for_daemon,
};

const DIMS: usize = 8;
const CONVERGE: Duration = Duration::from_secs(60);

async fn setup(window: &str) -> Installed {
    Installed::new(DIMS, window, "100ms").await
}

#[tokio::test]
async fn every_source_syncs_inserts_updates_and_all_kinds_of_deletes() {
    let s = setup("100ms").await;
    let daemon = s.daemon();
    s.seed();
    converged(&s.client, &daemon).await;
    let counts: Vec<(String, i64)> = s
        .client
        .query(
            "SELECT source, count(*) FROM tenant_knowledge GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("faq".into(), 63),
            ("manual".into(), 3),
            ("page".into(), 18),
            ("product".into(), 120)
        ]
    );
    // The stored vector is the provider's vector for exactly that content.
    let row = s
        .client
        .query_one("SELECT content, embedding::text FROM tenant_knowledge WHERE source = 'manual' AND source_key = '2'", &[])
        .await
        .unwrap();
    let content: String = row.get(0);
    let stored: String = row.get(1);
    let want = s.server.vector_for(&content);
    let stored: Vec<f32> = stored
        .trim_matches(['[', ']'])
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        stored.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{stored:?} vs {want:?}"
    );
    let metadata: serde_json::Value = s
        .client
        .query_one(
            "SELECT metadata FROM tenant_knowledge WHERE source = 'page' AND source_key = md5('page-1-shipping')::uuid::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        metadata["url"],
        "https://alpine-outfitters.example/shipping"
    );

    s.client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET answer = 'Delivery takes 2 days now.' WHERE id = md5('qa-1-shipping-1')::uuid;
             UPDATE web_knowledge_product SET name = 'Renamed tent' WHERE id = md5('product-1-two-person tent-1')::uuid;
             UPDATE ai_model_aiprompts SET manual_prompt = 'Be brief.' WHERE user_id = 1;
             UPDATE web_knowledge_websitepage SET content = 'New opening hours: 8 to 8.' WHERE id = md5('page-3-visit-us')::uuid;
             UPDATE web_knowledge_qapair SET generation_status = 'failed' WHERE id = md5('qa-2-payment-1')::uuid;
             UPDATE web_knowledge_websitepage SET crawl_status = 'completed', content = 'We are a small team.' WHERE id = md5('page-1-about')::uuid;
             DELETE FROM web_knowledge_product WHERE id = md5('product-2-baguette-1')::uuid;
             DELETE FROM web_knowledge_websitepage WHERE id = md5('page-2-returns')::uuid;",
        )
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    s.client
        .batch_execute("TRUNCATE ai_model_aiprompts")
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    let manual: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM tenant_knowledge WHERE source = 'manual'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(manual, 0, "TRUNCATE removes the source's chunks");
    assert!(
        !daemon.log().contains(TEST_API_KEY),
        "the API key leaked into the log"
    );
}

#[tokio::test]
async fn ten_edits_in_a_window_are_one_pass_and_unrelated_updates_cost_nothing() {
    let s = setup("1500ms").await;
    let daemon = s.daemon();
    s.seed();
    converged(&s.client, &daemon).await;
    let before = s.server.inputs_total();
    for i in 0..10 {
        s.client
            .execute(
                "UPDATE web_knowledge_product SET description = $1 WHERE id = md5('product-1-headlamp-1')::uuid",
                &[&format!("Edit number {i} of the headlamp.")],
            )
            .await
            .unwrap();
    }
    converged(&s.client, &daemon).await;
    assert_eq!(s.inputs_containing("Edit number 9 of the headlamp."), 1);
    assert_eq!(
        s.inputs_containing("Edit number"),
        1,
        "intermediate edits were embedded"
    );
    assert_eq!(s.server.inputs_total() - before, 1);

    // 1,000 touches of columns that are not part of any text: no embedding input.
    let before = s.server.inputs_total();
    for _ in 0..10 {
        s.client
            .batch_execute("UPDATE web_knowledge_product SET updated_at = now(); UPDATE web_knowledge_qapair SET updated_at = now()")
            .await
            .unwrap();
    }
    assert_eq!(outbox_len(&s.client).await, 0, "touches reached the outbox");
    converged(&s.client, &daemon).await;
    assert_eq!(s.server.inputs_total(), before);
}

#[tokio::test]
async fn editing_one_paragraph_of_a_long_page_re_embeds_only_that_paragraph() {
    let s = setup("100ms").await;
    let daemon = s.daemon();
    // Paragraphs of ~400 tokens each: with 512-token chunks, one chunk per paragraph.
    let paragraph = |n: usize, word: &str| {
        (0..80)
            .map(|i| format!("{word}{n}x{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let content: Vec<String> = (0..6).map(|n| paragraph(n, "alpha")).collect();
    s.client
        .execute(
            "INSERT INTO accounts_user VALUES (5, 'long', 'Long Co', 'long.example');
             ",
            &[],
        )
        .await
        .unwrap();
    s.client
        .execute(
            "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
             VALUES (md5('long')::uuid, 5, 'https://long.example/', 'Long', $1, 'completed')",
            &[&content.join("\n\n")],
        )
        .await
        .unwrap();
    let chunks = wait_for(CONVERGE, "the long page's chunks", || async {
        let n: i64 = s
            .client
            .query_one(
                "SELECT count(*) FROM tenant_knowledge WHERE source = 'page'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0 && outbox_len(&s.client).await == 0).then_some(n)
    })
    .await;
    assert!(
        chunks >= 6,
        "expected at least one chunk per paragraph, got {chunks}"
    );
    let before = s.server.inputs_total();
    let mut edited = content.clone();
    edited[3] = paragraph(3, "beta");
    s.client
        .execute(
            "UPDATE web_knowledge_websitepage SET content = $1 WHERE id = md5('long')::uuid",
            &[&edited.join("\n\n")],
        )
        .await
        .unwrap();
    wait_for(CONVERGE, "the edit to be written", || async {
        let n: i64 = s
            .client
            .query_one(
                "SELECT count(*) FROM tenant_knowledge WHERE content LIKE '%beta3x0%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0 && outbox_len(&s.client).await == 0).then_some(())
    })
    .await;
    let new_inputs: Vec<String> = s
        .server
        .requests()
        .into_iter()
        .flatten()
        .skip(before)
        .collect();
    assert_eq!(
        new_inputs.len(),
        1,
        "only the edited paragraph's chunk: {} inputs",
        new_inputs.len()
    );
    assert!(new_inputs[0].contains("beta3x0") && !new_inputs[0].contains("alpha2x"));
    drop(daemon);
}

#[tokio::test]
async fn a_10_mb_page_is_chunked_in_order_within_the_cap_and_an_edit_re_embeds_little() {
    let s = setup("100ms").await;
    let daemon = s.daemon();
    // Distinct paragraphs (no two chunks alike), some odd Unicode among them.
    let paragraph = |n: usize, word: &str| {
        format!(
            "Section {n}. The {word} batch {n} left the bakery at {}:{:02}; \
             parcels to Zürich, 東京 and القاهرة take {} days. Ingredients: flour, water, \
             salt, e\u{301}picé, 🍞 × {}. Notes for batch {n}: keep dry, store below 25 °C, \
             and read the label before use.",
            n % 24,
            n % 60,
            2 + n % 5,
            n % 7
        )
    };
    let mut paragraphs: Vec<String> = Vec::new();
    let mut size = 0;
    while size < 10 * 1024 * 1024 {
        let p = paragraph(paragraphs.len(), "sourdough");
        size += p.len() + 2;
        paragraphs.push(p);
    }
    s.client
        .batch_execute("INSERT INTO accounts_user VALUES (5, 'huge', 'Huge Co', 'huge.example')")
        .await
        .unwrap();
    s.client
        .execute(
            "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
             VALUES (md5('huge')::uuid, 5, 'https://huge.example/', 'Huge', $1, 'completed')",
            &[&paragraphs.join("\n\n")],
        )
        .await
        .unwrap();
    let text = format!("Huge\n\n{}", paragraphs.join("\n\n"));
    let page_chunks = || async {
        s.client
            .query(
                "SELECT content, embedding IS NULL, tenant_id FROM tenant_knowledge
                  WHERE source = 'page' AND source_key = md5('huge')::uuid::text ORDER BY chunk_index",
                &[],
            )
            .await
            .unwrap()
    };
    let chunks = wait_for_daemon(
        &daemon,
        Duration::from_secs(300),
        "the 10 MB page's chunks",
        || async {
            let rows = page_chunks().await;
            (!rows.is_empty() && outbox_len(&s.client).await == 0).then_some(rows)
        },
    )
    .await;
    // In order, nothing left out but whitespace between chunks, none over the cap
    // (512 tokens for pages in the shipped config), each embedded, the right tenant.
    let counter = kbsync_core::sync::chunk::TokenCounter::cl100k();
    let mut end = 0;
    let mut start = 0;
    for (i, row) in chunks.iter().enumerate() {
        let content: &str = row.get(0);
        let at = if i == 0 {
            0
        } else {
            start
                + 1
                + text[start + 1..]
                    .find(content)
                    .unwrap_or_else(|| panic!("chunk {i} not found after chunk {}", i - 1))
        };
        assert!(
            at <= end || text[end..at].trim().is_empty(),
            "text between chunk {} and {i} is in no chunk",
            i - 1
        );
        assert!(text[at..].starts_with(content));
        assert!(counter.count(content) <= 512, "chunk {i} is over the cap");
        assert!(!row.get::<_, bool>(1), "chunk {i} has no embedding");
        assert_eq!(row.get::<_, String>(2), "5");
        start = at;
        end = at + content.len();
    }
    assert_eq!(end, text.len(), "the end of the text is in no chunk");

    // One paragraph in the middle edited: a few chunks re-embedded, not thousands.
    let before = s.server.inputs_total();
    let middle = paragraphs.len() / 2;
    paragraphs[middle] = paragraph(middle, "rye");
    s.client
        .execute(
            "UPDATE web_knowledge_websitepage SET content = $1 WHERE id = md5('huge')::uuid",
            &[&paragraphs.join("\n\n")],
        )
        .await
        .unwrap();
    wait_for_daemon(
        &daemon,
        Duration::from_secs(300),
        "the edit to be written",
        || async {
            let rows = page_chunks().await;
            let written = rows.iter().any(|r| {
                r.get::<_, &str>(0)
                    .contains(&format!("The rye batch {middle} "))
            });
            (written && outbox_len(&s.client).await == 0).then_some(())
        },
    )
    .await;
    let re_embedded = s.server.inputs_total() - before;
    assert!(
        (1..=3).contains(&re_embedded),
        "{re_embedded} inputs re-embedded for one edited paragraph of {} chunks",
        chunks.len()
    );
    drop(daemon);
}

#[tokio::test]
async fn a_text_already_embedded_for_another_key_is_reused_not_sent_again() {
    let s = setup("100ms").await;
    let daemon = s.daemon();
    s.seed();
    converged(&s.client, &daemon).await;
    let before = s.server.inputs_total();
    // Another tenant lists the very same product: same text, another key.
    s.client
        .batch_execute(
            "CREATE TEMP TABLE copy AS SELECT * FROM web_knowledge_product WHERE id = md5('product-1-headlamp-1')::uuid;
             UPDATE copy SET id = md5('copied headlamp')::uuid, user_id = 2;
             INSERT INTO web_knowledge_product SELECT * FROM copy;",
        )
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    assert_eq!(
        s.server.inputs_total(),
        before,
        "the copied text was sent to the provider again"
    );
    let same: bool = s
        .client
        .query_one(
            "SELECT o.embedding = c.embedding AND o.content = c.content AND c.tenant_id = '2'
               FROM tenant_knowledge o, tenant_knowledge c
              WHERE o.source_key = md5('product-1-headlamp-1')::uuid::text
                AND c.source_key = md5('copied headlamp')::uuid::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same, "the copy's chunk has the original's text and vector");
    // A chunk whose stored text no longer matches its hash is never a source.
    s.client
        .batch_execute(
            "UPDATE tenant_knowledge SET content = 'tampered' WHERE source_key = md5('product-1-headlamp-1')::uuid::text;
             DELETE FROM tenant_knowledge WHERE source_key = md5('copied headlamp')::uuid::text;",
        )
        .await
        .unwrap();
    s.db.kbsync_with_config(s.config.path(), &["reconcile"])
        .assert_success();
    converged(&s.client, &daemon).await;
    // Both keys need the text again; the tampered chunk is no source, so it is sent
    // once (one batch, or the second batch reuses the first's).
    assert_eq!(
        s.server.inputs_total(),
        before + 1,
        "the text embedded exactly once for both keys"
    );
}

#[tokio::test]
async fn two_workers_that_need_the_same_new_text_at_once_send_it_once() {
    let s = setup("100ms").await;
    // One key per batch, so that the two keys go to the two workers; a slow provider,
    // so that the second asks while the first's request is still out.
    let config = s.config.edited(&[("batch_size = 256", "batch_size = 1")]);
    let daemon = s.daemon_with(&config);
    s.seed();
    converged(&s.client, &daemon).await;
    s.server.set_latency(Duration::from_millis(700));
    s.client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             VALUES (md5('twin 1')::uuid, 1, 'Twin lamp', 'Listed by two shops alike'),
                    (md5('twin 2')::uuid, 2, 'Twin lamp', 'Listed by two shops alike')",
        )
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    assert_eq!(
        s.inputs_containing("Listed by two shops alike"),
        1,
        "both workers paid for the same text"
    );
    let copies: i64 = s
        .client
        .query_one(
            "SELECT count(DISTINCT tenant_id) FROM tenant_knowledge WHERE content LIKE '%Listed by two shops alike%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 2, "each shop's product has its chunk");
}

#[tokio::test]
async fn writes_made_while_the_daemon_is_stopped_are_all_processed_once() {
    let s = setup("100ms").await;
    s.seed();
    s.client
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('offline-' || i)::uuid, 1 + i % 3, 'Offline item ' || i, 'Added while kbsync was down'
               FROM generate_series(1, 1000) i",
        )
        .await
        .unwrap();
    let daemon = s.daemon();
    converged(&s.client, &daemon).await;
    // Every distinct text embedded exactly once.
    let inputs: Vec<String> = s.server.requests().into_iter().flatten().collect();
    let distinct: BTreeSet<&String> = inputs.iter().collect();
    assert_eq!(inputs.len(), distinct.len(), "some text was embedded twice");
    // Batched across keys, never above the configured cap (64 in the test config).
    let sizes: Vec<usize> = s.server.requests().iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n <= 64), "{sizes:?}");
    assert!(
        sizes.iter().any(|&n| n > 1),
        "inputs were not batched: {sizes:?}"
    );
}

#[tokio::test]
async fn a_row_edited_without_pause_is_still_processed_within_max_wait() {
    let server = FakeOpenAi::start(DIMS).await;
    let config =
        kbsync_testkit::sync_config_with_max_wait(&server.base_url(), DIMS, "2s", "100ms", "3s");
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    let client = db.client().await;
    let daemon = DaemonProcess::start(config.path(), db.url());
    converged(&client, &daemon).await;
    // An edit every 300 ms for 9 s: the 2 s window never closes, max_wait (3 s) must.
    let mut seen_while_editing = false;
    for i in 0..30 {
        client
            .execute(
                "UPDATE web_knowledge_product SET description = $1 WHERE id = md5('product-1-headlamp-3')::uuid",
                &[&format!("Busy edit {i}")],
            )
            .await
            .unwrap();
        let visible: i64 = client
            .query_one(
                "SELECT count(*) FROM tenant_knowledge WHERE content LIKE '%Busy edit%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        seen_while_editing |= visible > 0;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        seen_while_editing,
        "no version was processed while edits went on:\n{}",
        daemon.log()
    );
    converged(&client, &daemon).await;
    let passes = server
        .requests()
        .iter()
        .flatten()
        .filter(|t| t.contains("Busy edit"))
        .count();
    assert!(
        passes < 30 / 3,
        "{passes} passes for 30 edits: windows did not coalesce"
    );
}

#[tokio::test]
async fn a_daemon_killed_mid_batch_converges_after_restart() {
    let s = setup("100ms").await;
    s.server.set_latency(Duration::from_millis(700));
    let mut daemon = s.daemon();
    s.seed();
    wait_for(CONVERGE, "the first embedding request", || async {
        (s.server.request_count() > 0).then_some(())
    })
    .await;
    daemon.kill();
    s.server.set_latency(Duration::ZERO);
    let daemon = s.daemon();
    converged(&s.client, &daemon).await;
}

#[tokio::test]
async fn a_rate_limit_with_retry_after_is_honoured_and_a_poisoned_input_is_dead_lettered() {
    let s = setup("100ms").await;
    s.server.push_faults([
        Fault::Status(429, vec![("retry-after", "1".to_owned())]),
        Fault::Status(500, vec![]),
    ]);
    s.server.poison("POISON");
    let daemon = s.daemon();
    s.seed();
    s.client
        .batch_execute(
            "UPDATE web_knowledge_product SET description = 'POISON pill' WHERE id = md5('product-3-U-lock-2')::uuid",
        )
        .await
        .unwrap();
    let dead = wait_for(
        CONVERGE,
        "the poisoned key in the dead-letter table",
        || async {
            let rows = s
                .client
                .query(
                    "SELECT source, source_key, error, attempts FROM kbsync.dead_letters",
                    &[],
                )
                .await
                .unwrap();
            (!rows.is_empty() && outbox_len(&s.client).await == 0).then(|| {
                rows.iter()
                    .map(|r| {
                        (
                            r.get::<_, String>(0),
                            r.get::<_, String>(1),
                            r.get::<_, String>(2),
                            r.get::<_, i32>(3),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        },
    )
    .await;
    let poisoned_key: String = s
        .client
        .query_one("SELECT md5('product-3-U-lock-2')::uuid::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].0.as_str(), dead[0].1.as_str()),
        ("product", poisoned_key.as_str())
    );
    assert!(dead[0].2.contains("400"), "{}", dead[0].2);
    assert_eq!(
        dead[0].3, 2,
        "parked after max_attempts (2 in the test config)"
    );
    // Every other product is written; the poisoned one keeps no chunk with the bad text.
    let products: i64 = s
        .client
        .query_one("SELECT count(*) FROM tenant_knowledge WHERE source = 'product' AND content NOT LIKE '%POISON%'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(products >= 119, "{products}");
    assert!(
        daemon.log().contains("retrying"),
        "the 429 was not retried:\n{}",
        daemon.log()
    );
}

#[tokio::test]
async fn garbage_on_the_notify_channel_neither_crashes_nor_stalls_the_daemon() {
    let s = setup("100ms").await;
    let mut daemon = s.daemon();
    s.seed();
    converged(&s.client, &daemon).await;
    let garbage = "\u{1F4A5}".repeat(1900);
    for payload in ["", "not-a-source", "'; DROP TABLE x; --", garbage.as_str()] {
        s.client
            .execute("SELECT pg_notify('kbsync', $1)", &[&payload])
            .await
            .unwrap();
    }
    s.client
        .batch_execute("UPDATE web_knowledge_product SET name = 'After the garbage' WHERE id = md5('product-1-headlamp-2')::uuid")
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    assert!(
        daemon.exited().is_none(),
        "the daemon exited:\n{}",
        daemon.log()
    );
}

#[tokio::test]
async fn sigterm_stops_the_daemon_cleanly_and_loses_nothing() {
    let s = setup("100ms").await;
    s.server.set_latency(Duration::from_millis(300));
    let mut daemon = s.daemon();
    s.seed();
    wait_for(CONVERGE, "a first request", || async {
        (s.server.request_count() > 0).then_some(())
    })
    .await;
    let status = daemon.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}:\n{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("batch done"),
        "the in-flight batch was not finished before exit:\n{log}"
    );
    assert!(!log.contains("drain timeout reached"), "{log}");
    s.server.set_latency(Duration::ZERO);
    let daemon = s.daemon();
    converged(&s.client, &daemon).await;
}

#[tokio::test]
async fn two_daemons_share_2000_mixed_writes_without_duplicate_work() {
    let s = setup("100ms").await;
    s.seed();
    let first = s.daemon();
    let second = s.daemon();
    converged(&s.client, &first).await;
    for i in 0..2000u32 {
        let n = i / 4;
        let sql = match i % 4 {
            0 => "INSERT INTO web_knowledge_product (id, user_id, name, description)
                  VALUES (md5('race-' || $1::int)::uuid, 1 + $1::int % 3, 'Race item ' || $1::int, 'v0')",
            1 => "UPDATE web_knowledge_product SET description = 'v1 of ' || $1::int WHERE id = md5('race-' || $1::int)::uuid",
            2 => "UPDATE web_knowledge_qapair SET answer = 'Answer revision ' || $1::int
                   WHERE id = (SELECT id FROM web_knowledge_qapair ORDER BY id OFFSET ($1::int % 60) LIMIT 1)",
            _ => "DELETE FROM web_knowledge_product WHERE id = md5('race-' || ($1::int - 7))::uuid",
        };
        s.client.execute(sql, &[&(n as i32)]).await.unwrap();
    }
    converged(&s.client, &first).await;
    // Every write has a unique text: a text embedded twice is work done twice.
    let inputs: Vec<String> = s.server.requests().into_iter().flatten().collect();
    let distinct: BTreeSet<&String> = inputs.iter().collect();
    assert!(
        inputs.len() as f64 <= 1.1 * distinct.len() as f64,
        "{} inputs for {} distinct texts",
        inputs.len(),
        distinct.len()
    );
    let both_worked = first.log().contains("batch done") && second.log().contains("batch done");
    assert!(
        both_worked,
        "one daemon did nothing:\n{}\n---\n{}",
        first.log(),
        second.log()
    );
}

#[tokio::test]
async fn vectors_of_the_wrong_dimension_are_never_written() {
    let s = setup("100ms").await;
    s.server
        .push_faults((0..1000).map(|_| Fault::WrongDimension));
    let daemon = s.daemon();
    s.seed();
    wait_for(CONVERGE, "the provider error in the log", || async {
        daemon.log().contains("dimensions").then_some(())
    })
    .await;
    let written: i64 = s
        .client
        .query_one("SELECT count(*) FROM tenant_knowledge", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        written, 0,
        "chunks were written from wrong-dimension vectors"
    );
    assert!(
        outbox_len(&s.client).await > 0,
        "changes were dropped instead of kept for a retry"
    );
    s.server.clear_faults();
    converged(&s.client, &daemon).await;
}
