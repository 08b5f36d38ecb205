//! Changing the embedding model: `kbsync model plan` prices the move to the model in
//! `[next_embedding]` (texts cut for it, those it has a vector for already, tokens in
//! its tokenizer, requests, time at its rate limits) and sends nothing.

use kbsync_testkit::demo_state::TEST_MODEL;
use kbsync_testkit::{
    Installed, TempConfig, TestDb, local_model_config, readme_block_starting, shown_in_readme,
};
use tokio_postgres::Client;

const DIMS: usize = 16;
const FAQS: i32 = 100;
/// FAQs whose text already has a vector of the next model (adopted).
const ADOPTED: i32 = 10;
const NEXT_MODEL: &str = "test-embedding-next";

/// One tenant's page (not crawled: no page chunk) and `FAQS` completed QAPairs; their
/// chunk texts (one chunk each), in key order.
async fn faqs(client: &Client) -> Vec<String> {
    client
        .batch_execute(&format!(
            "INSERT INTO accounts_user (id, username, company, domain) VALUES (1, 'a', 'A', 'a.example');
             INSERT INTO web_knowledge_websitepage (id, user_id, url)
                  VALUES (md5('page')::uuid, 1, 'https://shop.example/');
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
                  SELECT md5('qa' || i)::uuid, md5('page')::uuid, 'What about item ' || i || '?',
                         'Item ' || i || ' ships ' || repeat('very ', i % 7) || 'soon.', 'completed'
                    FROM generate_series(1, {FAQS}) i;"
        ))
        .await
        .expect("the FAQs");
    client
        .query(
            "SELECT 'Question: ' || question || E'\\nAnswer: ' || answer FROM web_knowledge_qapair ORDER BY id",
            &[],
        )
        .await
        .expect("the FAQ texts")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The test config with a `[next_embedding]` of `NEXT_MODEL` on the same test server.
fn with_next_model(t: &Installed, extra: &str) -> TempConfig {
    let text = std::fs::read_to_string(t.config.path()).expect("the test config");
    TempConfig::new(&format!(
        "{text}
[next_embedding]
provider = \"openai\"
model = \"{NEXT_MODEL}\"
dimensions = 32
base_url = \"{}\"
max_inputs_per_request = 7
requests_per_minute = 10
tokens_per_minute = 100000
{extra}
",
        t.server.base_url()
    ))
}

fn plan(t: &Installed, config: &TempConfig) -> serde_json::Value {
    let out =
        t.db.kbsync_with_config(config.path(), &["model", "plan", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).expect("model plan --json prints JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn model_plan_prices_the_texts_the_next_model_has_no_vector_for_and_sends_nothing() {
    let t = Installed::new(DIMS, "0s", "0s").await;
    let texts = faqs(&t.client).await;
    // The first FAQs' texts were embedded with the next model already.
    for text in &texts[..ADOPTED as usize] {
        t.client
            .execute(
                "INSERT INTO kbsync.adopted_embeddings (embedding_model, content_hash, embedding, adopted_from)
                 VALUES ($1, sha256(convert_to($2, 'UTF8')), array_fill(0.5, ARRAY[32])::vector, 'test')",
                &[&NEXT_MODEL, text],
            )
            .await
            .expect("an adopted vector");
    }
    let config = with_next_model(&t, "");
    let bpe = tiktoken_rs::cl100k_base().expect("cl100k");
    let tokens: usize = texts[ADOPTED as usize..]
        .iter()
        .map(|text| bpe.encode_ordinary(text).len())
        .sum();
    let to_embed = FAQS - ADOPTED;
    let requests = (to_embed + 6) / 7;
    assert_eq!(
        plan(&t, &config),
        serde_json::json!({
            "from_model": TEST_MODEL, "to_model": NEXT_MODEL, "to_dimensions": 32,
            "texts": FAQS, "texts_recut": 0, "already_embedded": ADOPTED, "to_embed": to_embed,
            "tokens_to_embed": tokens, "requests": requests,
            "requests_per_minute": 10, "tokens_per_minute": 100000,
            // 13 requests at 10 a minute: the request limit binds, not the tokens.
            "least_seconds_at_rate_limits": f64::from(requests) * 6.0,
            "sources": [
                {"source": "faq", "texts": FAQS, "to_embed": to_embed, "tokens_to_embed": tokens},
                {"source": "manual", "texts": 0, "to_embed": 0, "tokens_to_embed": 0},
                {"source": "page", "texts": 0, "to_embed": 0, "tokens_to_embed": 0},
                {"source": "product", "texts": 0, "to_embed": 0, "tokens_to_embed": 0},
            ],
        })
    );

    let shown = t.db.kbsync_with_config(config.path(), &["model", "plan"]);
    shown.assert_success();
    assert!(
        shown
            .stdout
            .contains(&format!("  {:<46}{:>12}\n", "to embed", to_embed)),
        "{}",
        shown.stdout
    );
    assert!(
        shown.stdout.contains(
            "least time at the rate limits (10 requests/min, 100000 tokens/min): 1 min 18 s"
        ),
        "{}",
        shown.stdout
    );
    // A crawled page, and chunks of at most 8 tokens for the next model: the page is
    // cut anew into pieces none of which has a vector; a FAQ is one chunk whatever
    // the size (single_chunk), so its text and its adopted vector still count.
    t.client
        .batch_execute(
            "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
             VALUES (md5('guide')::uuid, 1, 'https://shop.example/guide', 'Guide',
                     repeat('Every item ships from our warehouse within two days. ', 12), 'completed')",
        )
        .await
        .expect("a crawled page");
    let smaller = with_next_model(&t, "max_chunk_tokens = 8");
    let recut = plan(&t, &smaller);
    let pieces = recut["texts_recut"].as_i64().expect("texts_recut");
    assert!(pieces > 1, "{recut}");
    assert_eq!(recut["texts"], i64::from(FAQS) + pieces, "{recut}");
    assert_eq!(recut["already_embedded"], ADOPTED, "{recut}");
    assert_eq!(t.server.request_count(), 0, "planning sent requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_next_model_of_the_same_name_or_none_is_refused_with_what_to_do() {
    let t = Installed::new(DIMS, "0s", "0s").await;
    let same = with_next_model(&t, "").edited(&[(
        &format!("model = \"{NEXT_MODEL}\""),
        &format!("model = \"{TEST_MODEL}\""),
    )]);
    let out = t.db.kbsync_with_config(same.path(), &["config", "check"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("next_embedding.model") && out.stderr.contains("another name"),
        "{}",
        out.stderr
    );
    let bad_limit = with_next_model(&t, "")
        .edited(&[("max_inputs_per_request = 7", "max_inputs_per_request = 0")]);
    let out =
        t.db.kbsync_with_config(bad_limit.path(), &["config", "check"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("next_embedding.max_inputs_per_request"),
        "{}",
        out.stderr
    );
    let out = t.db.kbsync_with_config(t.config.path(), &["model", "plan"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no [next_embedding] in the config"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_shows_what_model_plan_prints_for_the_demo() {
    let db = TestDb::create().await.with_demo_schema().await;
    let base = std::fs::read_to_string(local_model_config("0s").path()).expect("the config");
    let config = TempConfig::new(&format!(
        "{base}\n{}",
        readme_block_starting("[next_embedding]")
    ));
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    let out = db.kbsync_with_config(config.path(), &["model", "plan"]);
    out.assert_success();
    assert_eq!(out.stdout.trim_end(), shown_in_readme("kbsync model plan"));
}
