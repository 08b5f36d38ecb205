//! `kbsync adopt`: the vectors an earlier system paid for are used by the first sync,
//! and nothing it should not trust is taken.

use kbsync_testkit::demo_state::{self, TEST_MODEL};
use kbsync_testkit::{FakeOpenAi, Installed, shown_in_readme, sync_config};
use tokio_postgres::Client;

const DIMS: usize = 16;
/// The adoption the README's guide shows: OpenAI's model, its dimension.
const GUIDE_MODEL: &str = "text-embedding-3-small";
const GUIDE_DIMS: usize = 1536;
const FAQS: i32 = 1_000;
const EDITED: i32 = 10;

/// Two tenants' pages (not crawled: no page chunks) and `FAQS` completed QAPairs.
async fn faqs(client: &Client) {
    client
        .batch_execute(&format!(
            "INSERT INTO accounts_user (id, username, company, domain)
                  VALUES (1, 'a', 'A', 'a.example'), (2, 'b', 'B', 'b.example');
             INSERT INTO web_knowledge_websitepage (id, user_id, url)
                  SELECT md5('page' || u)::uuid, u, 'https://shop.example/' || u
                    FROM generate_series(1, 2) u;
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
                  SELECT md5('qa' || i)::uuid, md5('page' || (1 + i % 2))::uuid,
                         'What about item ' || i || '?', 'Item ' || i || ' is in stock.', 'completed'
                    FROM generate_series(1, {FAQS}) i;"
        ))
        .await
        .expect("the FAQs");
}

fn literal(v: &[f32]) -> String {
    let parts: Vec<String> = v.iter().map(f32::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// The old system's table, as Django's TenantKnowledge kept it: one row per FAQ with the
/// vector `server` gives its text; then decoys for the first FAQs' texts (another model,
/// another dimension, no vector), which must never be taken.
async fn old_table(client: &Client, server: &FakeOpenAi) {
    old_table_of(client, server, "vector").await
}

/// `old_table`, its vectors stored as `vector_type` (`vector` or `halfvec`).
async fn old_table_of(client: &Client, server: &FakeOpenAi, vector_type: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE ai_model_tenantknowledge (
                 id serial PRIMARY KEY, content text NOT NULL, embedding {vector_type}, embedding_model text)"
        ))
        .await
        .expect("the old table");
    let texts: Vec<String> = client
        .query(
            "SELECT 'Question: ' || question || E'\\nAnswer: ' || answer
               FROM web_knowledge_qapair ORDER BY id",
            &[],
        )
        .await
        .expect("the FAQ texts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let insert = format!(
        "INSERT INTO ai_model_tenantknowledge (content, embedding, embedding_model)
         VALUES ($1, $2::text::{vector_type}, $3)"
    );
    let decoys = [
        (
            &texts[0],
            literal(&server.vector_for("another model's idea")),
            "text-embedding-ada-002",
        ),
        (&texts[1], literal(&[0.5; 8]), GUIDE_MODEL),
    ];
    for (text, vector, model) in decoys {
        client
            .execute(&insert, &[text, &vector, &model])
            .await
            .expect("a decoy row");
    }
    client
        .execute(
            "INSERT INTO ai_model_tenantknowledge (content, embedding_model) VALUES ($1, $2)",
            &[&texts[2], &GUIDE_MODEL],
        )
        .await
        .expect("a row without a vector");
    for text in &texts {
        client
            .execute(
                &insert,
                &[text, &literal(&server.vector_for(text)), &GUIDE_MODEL],
            )
            .await
            .expect("an old row");
    }
}

async fn adopted_rows(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM kbsync.adopted_embeddings", &[])
        .await
        .expect("counting adopted embeddings")
        .get(0)
}

/// The demo tables and kbsync installed for `GUIDE_MODEL`, served by a test server.
async fn installed_for_the_guide() -> Installed {
    installed_for(GUIDE_DIMS).await
}

/// The demo tables and kbsync installed for `GUIDE_MODEL` at `dims` dimensions.
async fn installed_for(dims: usize) -> Installed {
    let server = FakeOpenAi::start(dims).await;
    let config = sync_config(&server.base_url(), dims, "0s", "0s").edited(&[(
        &format!("model = \"{TEST_MODEL}\""),
        &format!("model = \"{GUIDE_MODEL}\""),
    )]);
    Installed::with_config(server, config).await
}

/// A daemon's first sync: it sends exactly the `edited` texts (the rest was adopted).
async fn first_sync_sends_only(t: &Installed, edited: &[String]) -> kbsync_testkit::DaemonProcess {
    let daemon = t.daemon();
    demo_state::converged_with_model(&t.client, &daemon, GUIDE_MODEL).await;
    let mut sent: Vec<String> = t.server.requests().concat();
    sent.sort();
    assert_eq!(
        sent, edited,
        "the first sync sent more than the edited texts"
    );
    daemon
}

/// Every chunk as text, in a fixed order, for comparing two databases.
async fn knowledge(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT concat_ws(' | ', source, source_key, chunk_index, tenant_id, content,
                              embedding::text, embedding_model, metadata::text, chunk_count)
               FROM tenant_knowledge ORDER BY source, source_key, chunk_index",
            &[],
        )
        .await
        .expect("reading tenant_knowledge")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The edited FAQs' texts as they read now.
async fn edit(client: &Client) -> Vec<String> {
    let mut edited: Vec<String> = client
        .query(
            &format!(
                "UPDATE web_knowledge_qapair SET answer = answer || ' Edited since.'
                  WHERE id IN (SELECT md5('qa' || i)::uuid FROM generate_series(1, {EDITED}) i)
                 RETURNING 'Question: ' || question || E'\\nAnswer: ' || answer"
            ),
            &[],
        )
        .await
        .expect("editing FAQs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    edited.sort();
    edited
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_sync_after_adopt_sends_only_the_texts_that_changed() {
    let t = installed_for_the_guide().await;
    faqs(&t.client).await;
    old_table(&t.client, &t.server).await;
    let edited = edit(&t.client).await;
    let adopt = |extra: &[&str]| {
        let mut args = vec![
            "adopt",
            "--table",
            "ai_model_tenantknowledge",
            "--model-column",
            "embedding_model",
        ];
        args.extend_from_slice(extra);
        t.db.kbsync_with_config(t.config.path(), &args)
    };

    let counted = adopt(&["--dry-run", "--json"]);
    counted.assert_success();
    let report: serde_json::Value =
        serde_json::from_str(&counted.stdout).expect("adopt --json prints JSON");
    let expected = serde_json::json!({
        "table": "\"ai_model_tenantknowledge\"", "model": GUIDE_MODEL, "dimensions": GUIDE_DIMS,
        "dry_run": true, "texts": FAQS, "already_embedded": 0, "adopted": FAQS - EDITED,
        "to_embed": EDITED, "old_rows": FAQS + 3, "skipped_no_embedding": 1,
        "skipped_other_model": 1, "skipped_other_dimension": 1,
        "skipped_text_not_needed": EDITED,
    });
    assert_eq!(report, expected);
    assert_eq!(
        adopted_rows(&t.client).await,
        0,
        "a dry run adopted something"
    );

    let done = adopt(&[]);
    done.assert_success();
    assert_eq!(
        done.stdout.trim_end(),
        shown_in_readme(
            "kbsync adopt --table ai_model_tenantknowledge --model-column embedding_model"
        ),
        "README.md's guide shows other output than kbsync adopt gives"
    );
    assert_eq!(adopted_rows(&t.client).await, i64::from(FAQS - EDITED));
    // A second adoption finds everything taken already.
    let again = adopt(&["--json"]);
    again.assert_success();
    let again: serde_json::Value = serde_json::from_str(&again.stdout).expect("JSON");
    assert_eq!(
        (&again["already_embedded"], &again["adopted"]),
        (&serde_json::json!(FAQS - EDITED), &serde_json::json!(0))
    );

    let _daemon = first_sync_sends_only(&t, &edited).await;

    // The same rows synced from scratch, without adopting anything.
    let plain = installed_for_the_guide().await;
    faqs(&plain.client).await;
    edit(&plain.client).await;
    let plain_daemon = plain.daemon();
    demo_state::converged_with_model(&plain.client, &plain_daemon, GUIDE_MODEL).await;
    assert_eq!(plain.server.inputs_total(), FAQS as usize);
    assert_eq!(knowledge(&t.client).await, knowledge(&plain.client).await);

    let cleared =
        t.db.kbsync_with_config(t.config.path(), &["adopt", "--clear"]);
    cleared.assert_success();
    assert_eq!(adopted_rows(&t.client).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn vectors_of_another_model_or_dimension_are_refused_with_the_reason() {
    let t = Installed::new(DIMS, "0s", "0s").await;
    t.client
        .batch_execute(
            "CREATE TABLE old_chunks (body text, vec vector(8));
             CREATE TABLE old_floats (body text, vec real[]);",
        )
        .await
        .expect("old tables");
    let run = |args: &[&str]| t.db.kbsync_with_config(t.config.path(), args);
    let adopt_from = |table: &'static str, made_with: Option<&'static str>| {
        let mut args = vec![
            "adopt",
            "--table",
            table,
            "--content-column",
            "body",
            "--embedding-column",
            "vec",
        ];
        args.extend(
            made_with
                .map(|model| ["--all-made-with", model])
                .iter()
                .flatten(),
        );
        args
    };
    for (args, says) in [
        (
            adopt_from("old_chunks", Some("text-embedding-ada-002")),
            "a vector of another model is never adopted",
        ),
        (
            adopt_from("old_chunks", Some(TEST_MODEL)),
            "holds vectors of 8 dimensions, the configured model \"test-embedding\" has 16",
        ),
        (
            adopt_from("old_floats", Some(TEST_MODEL)),
            "is of type _float4, not pgvector's vector",
        ),
        (
            adopt_from("no_such_table", Some(TEST_MODEL)),
            "table \"no_such_table\" not found",
        ),
        (
            adopt_from("old_chunks", None),
            "say which model made the old vectors",
        ),
        (
            adopt_from("old_chunks; DROP TABLE x", Some(TEST_MODEL)),
            "is not a plain SQL identifier",
        ),
    ] {
        let out = run(&args);
        out.assert_failure();
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
}

/// A 3,072-dimension model whose old table kept its vectors as `halfvec` (as systems
/// that index text-embedding-3-large do): adopted, the first sync sends only the edited
/// texts, and the knowledge base equals one synced from scratch.
#[tokio::test(flavor = "multi_thread")]
async fn halfvec_vectors_of_a_3072_dimension_model_are_adopted() {
    const WIDE: usize = 3072;
    let t = installed_for(WIDE).await;
    faqs(&t.client).await;
    old_table_of(&t.client, &t.server, "halfvec").await;
    let edited = edit(&t.client).await;
    let out = t.db.kbsync_with_config(
        t.config.path(),
        &[
            "adopt",
            "--table",
            "ai_model_tenantknowledge",
            "--model-column",
            "embedding_model",
            "--json",
        ],
    );
    out.assert_success();
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("adopt --json");
    assert_eq!(
        (
            &report["dimensions"],
            &report["adopted"],
            &report["skipped_other_dimension"]
        ),
        (
            &serde_json::json!(WIDE),
            &serde_json::json!(FAQS - EDITED),
            &serde_json::json!(1)
        ),
        "{report}"
    );
    let _daemon = first_sync_sends_only(&t, &edited).await;

    let plain = installed_for(WIDE).await;
    faqs(&plain.client).await;
    edit(&plain.client).await;
    let plain_daemon = plain.daemon();
    demo_state::converged_with_model(&plain.client, &plain_daemon, GUIDE_MODEL).await;
    assert_eq!(knowledge(&t.client).await, knowledge(&plain.client).await);
}
