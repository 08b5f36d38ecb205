//! Changing the embedding model blue/green: `kbsync model start` has the daemon fill
//! the new model's vectors beside the active ones while live edits get both,
//! `cutover` swaps them in one transaction, `rollback` swaps back for nothing,
//! `finish` leaves one vector column; a killed daemon resumes without paying twice.
//! Two test servers stand in for the two models' providers (another dimension each).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kbsync_testkit::demo_state::{
    TEST_MODEL, converged, converged_with_model, embedding_column_and_index,
};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, Installed, TEST_API_KEY, TempConfig, deterministic_vector,
    run_kbsync, shown_in_readme, wait_for,
};
use pgvector::Vector;
use tokio_postgres::Client;

const DIMS: usize = 16;
const NEXT_DIMS: usize = 24;
const NEXT_MODEL: &str = "test-embedding-next";

/// `faqs` completed QAPairs of tenant 1 (one chunk each), synced by a daemon whose
/// config has `[next_embedding]` on a second test server.
struct Setup {
    t: Installed,
    next: FakeOpenAi,
    config: TempConfig,
    /// The search API's tokens file (`SEARCH_TOKEN`).
    _tokens: tempfile::NamedTempFile,
}

const SEARCH_TOKEN: &str = "migration-search-token";

async fn setup(faqs: i32, next_inputs_per_request: usize) -> Setup {
    setup_at(faqs, next_inputs_per_request, DIMS, NEXT_DIMS).await
}

/// `setup`, from a model of `dims` dimensions to one of `next_dims`.
async fn setup_at(
    faqs: i32,
    next_inputs_per_request: usize,
    dims: usize,
    next_dims: usize,
) -> Setup {
    let t = Installed::new(dims, "0s", "0s").await;
    let next = FakeOpenAi::start(next_dims).await;
    let tokens = tempfile::NamedTempFile::new().expect("a tokens file");
    std::fs::write(tokens.path(), format!("{SEARCH_TOKEN}\n")).expect("tokens");
    let with_api = t.config.edited(&[(
        "max_query_chars = 2000",
        &format!(
            "max_query_chars = 2000\napi_tokens_file = \"{}\"",
            tokens.path().display()
        ),
    )]);
    let text = std::fs::read_to_string(with_api.path()).expect("the test config");
    let config = TempConfig::new(&format!(
        "{text}
[next_embedding]
provider = \"openai\"
model = \"{NEXT_MODEL}\"
dimensions = {next_dims}
base_url = \"{}\"
max_inputs_per_request = {next_inputs_per_request}
max_concurrency = 2
request_timeout = \"10s\"
",
        next.base_url()
    ));
    t.client
        .batch_execute(&format!(
            "INSERT INTO accounts_user (id, username, company, domain) VALUES (1, 'a', 'A', 'a.example');
             INSERT INTO web_knowledge_websitepage (id, user_id, url)
                  VALUES (md5('page')::uuid, 1, 'https://shop.example/');
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
                  SELECT md5('qa' || i)::uuid, md5('page')::uuid, 'What about item ' || i || '?',
                         'Item ' || i || ' ships soon.', 'completed'
                    FROM generate_series(1, {faqs}) i;"
        ))
        .await
        .expect("the FAQs");
    Setup {
        t,
        next,
        config,
        _tokens: tokens,
    }
}

impl Setup {
    fn daemon(&self) -> DaemonProcess {
        self.t.daemon_with(&self.config)
    }

    /// `kbsync model ARGS` with the config that names both models.
    fn model(&self, args: &[&str]) -> kbsync_testkit::CommandOutput {
        let mut all = vec!["model"];
        all.extend_from_slice(args);
        self.t.db.kbsync_with_config(self.config.path(), &all)
    }

    fn status(&self) -> serde_json::Value {
        let out = self.model(&["status", "--json"]);
        out.assert_success();
        serde_json::from_str(&out.stdout).expect("model status --json prints JSON")
    }

    /// Until no chunk lacks the other model's vector (a daemon fills them).
    async fn filled(&self, daemon: &DaemonProcess) {
        let within = Duration::from_secs(120);
        let done = tokio::time::timeout(within, async {
            loop {
                if self.status()["chunks_missing"] == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            done.is_ok(),
            "the other column was not filled within {within:?}: {}\ndaemon log:\n{}",
            self.status(),
            daemon.log()
        );
    }

    /// `kbsync model cutover`, again while edits keep a chunk or two without the new
    /// vector for a moment.
    async fn cutover(&self) -> String {
        wait_for(Duration::from_secs(60), "a cut-over", || async {
            let out = self.model(&["cutover"]);
            if out.status.success() {
                return Some(out.stdout);
            }
            assert!(
                out.stderr.contains("vector yet"),
                "cutover failed for another reason: {}",
                out.stderr
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            None
        })
        .await
    }
}

/// Each chunk's (content, vector of `column`, model of `column`).
async fn vectors(client: &Client, column: &str) -> Vec<(String, Option<Vec<f32>>, Option<String>)> {
    // A column name of this test's own, one of three.
    assert!(["embedding", "embedding_next", "embedding_previous"].contains(&column));
    client
        .query(
            // As `vector` whatever the column's type: a halfvec widens exactly.
            &format!(
                "SELECT content, {column}::vector, {column}_model FROM tenant_knowledge ORDER BY id"
            ),
            &[],
        )
        .await
        .expect("reading the vectors")
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get::<_, Option<Vector>>(1).map(|v| v.to_vec()),
                r.get(2),
            )
        })
        .collect()
}

/// Every chunk's `column` holds `model`'s vector of the chunk's own text.
async fn every_chunk_has(client: &Client, column: &str, model: &str, dims: usize) {
    let rows = vectors(client, column).await;
    assert!(!rows.is_empty());
    for (content, vector, stored_model) in rows {
        assert_eq!(
            stored_model.as_deref(),
            Some(model),
            "{column} of {content:?}"
        );
        let expected = deterministic_vector(&content, dims);
        let stored = vector.unwrap_or_else(|| panic!("{column} of {content:?} is NULL"));
        if dims <= 2000 {
            assert_eq!(
                stored, expected,
                "{column} of {content:?} is not {model}'s vector of its text"
            );
        } else {
            // Stored as halfvec: each value rounded to 11 significant bits.
            assert_eq!(stored.len(), dims);
            assert!(
                stored
                    .iter()
                    .zip(&expected)
                    .all(|(s, e)| (s - e).abs() <= e.abs() / 1024.0 + 1e-7),
                "{column} of {content:?} is not {model}'s vector of its text, as halfvec"
            );
        }
    }
}

/// The vector columns tenant_knowledge has.
async fn vector_columns(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = 'public.tenant_knowledge'::regclass AND attname LIKE 'embedding%'
                AND NOT attisdropped ORDER BY 1",
            &[],
        )
        .await
        .expect("reading the columns")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_under_live_edits_keeps_search_answering_and_ends_with_both_models_current() {
    const FAQS: i32 = 5_000;
    let s = setup(FAQS, 64).await;
    let daemon = s.daemon();
    converged(&s.t.client, &daemon).await;

    // An application keeps editing FAQs, and another keeps searching with the model
    // the knowledge base says is active (read in the search's own transaction: the
    // cut-over locks that row before it renames anything).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop) = (s.t.db.client().await, stop.clone());
        tokio::spawn(async move {
            let mut edits = 0i32;
            while !stop.load(Ordering::Relaxed) {
                edits += 1;
                let item = (edits * 7919) % FAQS + 1;
                client
                    .execute(
                        "UPDATE web_knowledge_qapair SET answer = 'Edited ' || $2::int || ': item ' || $1::int || ' ships today.'
                          WHERE id = md5('qa' || $1::int)::uuid",
                        &[&item, &edits],
                    )
                    .await
                    .expect("an application's edit");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            edits
        })
    };
    let searcher = {
        let (mut client, stop) = (s.t.db.client().await, stop.clone());
        tokio::spawn(async move {
            let mut searches: HashMap<String, usize> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let tx = client.transaction().await.expect("a transaction");
                let phase: Option<String> = tx
                    .query_opt(
                        "SELECT phase FROM kbsync.model_migration FOR KEY SHARE",
                        &[],
                    )
                    .await
                    .expect("reading the migration")
                    .map(|r| r.get(0));
                let query = "What about item 42?";
                let (model, vector) = match phase.as_deref() {
                    Some("cut_over") => (NEXT_MODEL, deterministic_vector(query, NEXT_DIMS)),
                    _ => (TEST_MODEL, deterministic_vector(query, DIMS)),
                };
                let nulls: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM tenant_knowledge WHERE embedding IS NULL",
                        &[],
                    )
                    .await
                    .expect("counting NULL vectors")
                    .get(0);
                assert_eq!(nulls, 0, "a search saw chunks without a vector ({phase:?})");
                let hits = tx
                    .query(
                        "SELECT source_key FROM kbsync.search('1', $1, $2, 5, 'vector')",
                        &[&query, &Vector::from(vector)],
                    )
                    .await
                    .unwrap_or_else(|e| {
                        panic!("a vector search with {model} failed ({phase:?}): {e:?}")
                    });
                assert_eq!(
                    hits.len(),
                    5,
                    "a search with {model} found {} chunks",
                    hits.len()
                );
                tx.commit().await.expect("committing");
                *searches.entry(model.to_owned()).or_default() += 1;
            }
            searches
        })
    };

    s.model(&["start"]).assert_success();
    let pending_index_valid: bool =
        s.t.client
            .query_one(
                "SELECT indisvalid FROM pg_index
              WHERE indexrelid = 'public.tenant_knowledge_embedding_next_pending'::regclass",
                &[],
            )
            .await
            .expect("the index of the chunks to fill")
            .get(0);
    assert!(pending_index_valid);
    assert_eq!(
        vector_columns(&s.t.client).await,
        [
            "embedding",
            "embedding_model",
            "embedding_next",
            "embedding_next_model"
        ]
    );
    s.filled(&daemon).await;
    let cut = s.cutover().await;
    assert!(
        cut.contains("now holds test-embedding-next's vectors"),
        "{cut}"
    );
    // Edits after the cut-over: the new model is active, the old one kept current.
    let edits_before_stop =
        s.t.client
            .query_one(
                "SELECT count(*) FROM web_knowledge_qapair WHERE answer LIKE 'Edited%'",
                &[],
            )
            .await
            .expect("counting edits")
            .get::<_, i64>(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let edits = writer.await.expect("the writer");
    let searches = searcher.await.expect("the searcher");

    converged_with_model(&s.t.client, &daemon, NEXT_MODEL).await;
    s.filled(&daemon).await;
    every_chunk_has(&s.t.client, "embedding", NEXT_MODEL, NEXT_DIMS).await;
    every_chunk_has(&s.t.client, "embedding_previous", TEST_MODEL, DIMS).await;
    assert!(
        edits_before_stop > 0 && edits > 100,
        "{edits_before_stop} / {edits} edits"
    );
    assert!(
        searches.get(TEST_MODEL).is_some_and(|n| *n > 10)
            && searches.get(NEXT_MODEL).is_some_and(|n| *n > 0),
        "searches by model: {searches:?}"
    );
    let status = s.status();
    assert_eq!(status["state"]["phase"], "cut_over", "{status}");
    assert!(
        status["state"]["to_texts"].as_i64().is_some_and(|n| n > 0),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_costs_nothing_and_finish_leaves_one_vector_column_with_a_valid_index() {
    let s = setup(300, 50).await;
    let daemon = s.daemon();
    converged(&s.t.client, &daemon).await;
    let out = s.model(&["start"]);
    out.assert_success();
    assert_eq!(out.stdout.trim_end(), shown_in_readme("kbsync model start"));
    s.filled(&daemon).await;
    // The migration where operators look: `kbsync status`, /metrics, chunking health.
    let status = s.t.db.kbsync_with_config(s.config.path(), &["status"]);
    status.assert_success();
    assert!(
        status
            .stdout
            .contains("model migration: test-embedding -> test-embedding-next: filling"),
        "{}",
        status.stdout
    );
    // The fill's counts reach the database after its round: wait for them.
    wait_for(
        Duration::from_secs(10),
        "the migration in /metrics",
        || async {
            let (code, metrics) = daemon.http_get("/metrics").await;
            assert_eq!(code, 200);
            [
                "kbsync_model_migration_phase 1",
                "kbsync_model_migration_chunks_missing 0",
                "kbsync_model_migration_texts_sent{model=\"test-embedding-next\"} 300",
            ]
            .iter()
            .all(|line| metrics.contains(line))
            .then_some(())
        },
    )
    .await;
    let (code, health) = daemon.http_get("/api/chunking-health").await;
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&health).expect("JSON");
    assert_eq!(
        health["model_migration"]["state"]["phase"], "filling",
        "{health}"
    );
    let out = s.cutover().await;
    assert_eq!(out.trim_end(), shown_in_readme("kbsync model cutover"));
    every_chunk_has(&s.t.client, "embedding", NEXT_MODEL, NEXT_DIMS).await;

    let (old_requests, new_requests) = (s.t.server.request_count(), s.next.request_count());
    let out = s.model(&["rollback"]);
    out.assert_success();
    assert_eq!(
        out.stdout.trim_end(),
        shown_in_readme("kbsync model rollback")
    );
    every_chunk_has(&s.t.client, "embedding", TEST_MODEL, DIMS).await;
    every_chunk_has(&s.t.client, "embedding_next", NEXT_MODEL, NEXT_DIMS).await;
    let found =
        s.t.client
            .query(
                "SELECT source_key FROM kbsync.search('1', 'item 7', $1, 3, 'vector')",
                &[&Vector::from(deterministic_vector(
                    "What about item 7?",
                    DIMS,
                ))],
            )
            .await
            .expect("searching with the old model after the rollback");
    assert_eq!(found.len(), 3);
    // And forth again: the new vectors were kept, nothing is embedded.
    s.cutover().await;
    assert_eq!(
        (s.t.server.request_count(), s.next.request_count()),
        (old_requests, new_requests),
        "a rollback and a second cut-over sent embedding requests"
    );

    let out = s.model(&["finish"]);
    out.assert_success();
    assert_eq!(
        out.stdout.trim_end(),
        shown_in_readme("kbsync model finish")
    );
    assert_eq!(
        vector_columns(&s.t.client).await,
        ["embedding", "embedding_model"]
    );
    let (valid, dims, options): (bool, i32, Vec<String>) = {
        let row =
            s.t.client
                .query_one(
                    "SELECT i.indisvalid, a.atttypmod, c.reloptions FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                   JOIN pg_class c ON c.oid = i.indexrelid
                  WHERE i.indexrelid = 'public.tenant_knowledge_embedding_hnsw'::regclass",
                    &[],
                )
                .await
                .expect("the HNSW index");
        (row.get(0), row.get(1), row.get(2))
    };
    assert!(valid, "the HNSW index is not valid after finish");
    // The next model's index is built as kbsync builds every one (HNSW_OPTIONS).
    assert_eq!(options, ["m=16", "ef_construction=128"]);
    assert_eq!(
        dims, NEXT_DIMS as i32,
        "the index is not on the new model's column"
    );
    // `kbsync search` and POST /v1/search embed the question with the new model.
    let (old_requests, new_requests) = (s.t.server.request_count(), s.next.request_count());
    let out = run_kbsync(
        s.config.path(),
        &[
            "search",
            "--tenant",
            "1",
            "--mode",
            "vector",
            "--json",
            "What about item 7?",
        ],
        &[
            ("DATABASE_URL", s.t.db.url()),
            ("OPENAI_API_KEY", TEST_API_KEY),
        ],
    );
    out.assert_success();
    let hits: serde_json::Value = serde_json::from_str(&out.stdout).expect("search --json");
    assert_eq!(hits.as_array().map(Vec::len), Some(5), "{hits}");
    let (code, answer) = daemon
        .http_post_json(
            "/v1/search",
            Some(SEARCH_TOKEN),
            &serde_json::json!({"tenant": "1", "query": "What about item 7?", "mode": "vector", "k": 3}),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model"], NEXT_MODEL, "{answer}");
    assert_eq!(
        answer["results"].as_array().map(Vec::len),
        Some(3),
        "{answer}"
    );
    assert_eq!(
        (s.t.server.request_count(), s.next.request_count()),
        (old_requests, new_requests + 2),
        "the queries were not embedded with the new model"
    );
    // The daemon goes on with the new model alone.
    s.t.client
        .execute(
            "UPDATE web_knowledge_qapair SET answer = 'Finished: ships now.' WHERE id = md5('qa1')::uuid",
            &[],
        )
        .await
        .expect("an edit");
    converged_with_model(&s.t.client, &daemon, NEXT_MODEL).await;
    let out = s.model(&["rollback"]);
    assert!(
        !out.status.success() && out.stderr.contains("finished"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_abandoned_and_started_again_sends_only_the_texts_changed_since() {
    let s = setup(200, 50).await;
    let daemon = s.daemon();
    converged(&s.t.client, &daemon).await;
    s.model(&["start"]).assert_success();
    s.filled(&daemon).await;
    let sent: usize = s.next.inputs_total();
    assert_eq!(sent, 200, "each text once");
    // Out of order, the commands refuse and say why.
    let finish = s.model(&["finish"]);
    assert!(
        !finish.status.success() && finish.stderr.contains("applies when it is cut_over"),
        "{}",
        finish.stderr
    );
    let again = s.model(&["start"]);
    again.assert_success();
    assert!(again.stdout.contains("already filling"), "{}", again.stdout);
    let reset =
        s.t.db
            .kbsync_with_config(s.config.path(), &["install", "--reset-embeddings"]);
    assert!(
        !reset.status.success() && reset.stderr.contains("a model migration is running"),
        "{}",
        reset.stderr
    );
    // Live sync writes both models' vectors of an edited chunk in one transaction; the
    // fill (slowed down here) would take longer than this check.
    s.next.set_latency(Duration::from_millis(500));
    s.t.client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET answer = 'Edited during the migration.' WHERE id = md5('qa9')::uuid",
        )
        .await
        .expect("an edit");
    let both = wait_for(Duration::from_secs(20), "the edit written", || async {
        s.t.client
            .query_opt(
                "SELECT embedding_next FROM tenant_knowledge
                  WHERE content LIKE '%Edited during the migration.' AND embedding IS NOT NULL",
                &[],
            )
            .await
            .expect("reading the edited chunk")
            .map(|r| r.get::<_, Option<Vector>>(0))
    })
    .await;
    let edited = "Question: What about item 9?\nAnswer: Edited during the migration.";
    assert_eq!(
        both.map(|v| v.to_vec()),
        Some(deterministic_vector(edited, NEXT_DIMS)),
        "the edit was written without the new model's vector"
    );
    s.next.set_latency(Duration::ZERO);
    // What went to the new model's provider, counted in the migration's state.
    wait_for(Duration::from_secs(10), "the counters", || async {
        (s.status()["state"]["to_texts"] == 201).then_some(())
    })
    .await;
    let sent = s.next.inputs_total();

    let out = s.model(&["rollback"]);
    out.assert_success();
    assert!(out.stdout.contains("abandoned"), "{}", out.stdout);
    assert_eq!(
        vector_columns(&s.t.client).await,
        ["embedding", "embedding_model"]
    );
    s.t.client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET answer = 'Changed while no migration ran.'
              WHERE id IN (md5('qa1')::uuid, md5('qa2')::uuid, md5('qa3')::uuid)",
        )
        .await
        .expect("edits");
    converged(&s.t.client, &daemon).await;

    s.model(&["start"]).assert_success();
    s.filled(&daemon).await;
    let again: Vec<String> = s.next.requests().into_iter().flatten().skip(sent).collect();
    assert_eq!(again.len(), 3, "sent again: {again:?}");
    assert!(
        !again
            .iter()
            .any(|t| t.contains("Edited during the migration."))
    );
    assert!(
        again
            .iter()
            .all(|t| t.contains("Changed while no migration ran.")),
        "{again:?}"
    );
    every_chunk_has(&s.t.client, "embedding_next", NEXT_MODEL, NEXT_DIMS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_mid_fill_resumes_and_repeats_at_most_the_requests_in_flight() {
    const FAQS: usize = 1_000;
    const PER_REQUEST: usize = 20;
    let s = setup(FAQS as i32, PER_REQUEST).await;
    let mut daemon = s.daemon();
    converged(&s.t.client, &daemon).await;
    s.next.set_latency(Duration::from_millis(150));
    s.model(&["start"]).assert_success();
    wait_for(Duration::from_secs(60), "the fill under way", || async {
        (s.next.request_count() >= 10).then_some(())
    })
    .await;
    daemon.kill();
    let before_kill = s.next.requests();
    assert!(
        before_kill.len() < FAQS / PER_REQUEST,
        "the fill was over before the kill"
    );

    let daemon = s.daemon();
    s.filled(&daemon).await;
    every_chunk_has(&s.t.client, "embedding_next", NEXT_MODEL, NEXT_DIMS).await;
    let mut times: HashMap<String, usize> = HashMap::new();
    for text in s.next.requests().into_iter().flatten() {
        *times.entry(text).or_default() += 1;
    }
    assert_eq!(times.len(), FAQS, "every text was embedded");
    // The requests a daemon has in flight at once (next_embedding.max_concurrency):
    // their answers died with it. Nothing else is sent twice.
    let in_flight: Vec<&String> = before_kill.iter().rev().take(2).flatten().collect();
    let twice: Vec<&String> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, _)| t)
        .collect();
    assert!(
        twice.iter().all(|t| in_flight.contains(t)) && twice.len() <= 2 * PER_REQUEST,
        "{} texts sent twice, not all in the requests in flight at the kill: {twice:?}",
        twice.len()
    );
    assert!(times.values().all(|n| *n <= 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_whose_config_lacks_the_new_model_stops_and_says_why() {
    let s = setup(20, 50).await;
    // Started before [next_embedding] was added to its config.
    let mut daemon = s.t.daemon();
    converged(&s.t.client, &daemon).await;
    s.model(&["start"]).assert_success();
    let status = wait_for(Duration::from_secs(30), "the daemon to stop", || {
        let exited = daemon.exited();
        async move { exited }
    })
    .await;
    assert!(!status.success(), "{status:?}");
    let log = daemon.log();
    assert!(
        log.contains("the model migration does not match this daemon's config")
            && log.contains("[next_embedding] = test-embedding-next"),
        "{log}"
    );
    // Restarted with the config that names both, it fills.
    let daemon = s.daemon();
    s.filled(&daemon).await;
}

/// 1,536 → 3,072 dimensions (text-embedding-3-small → -large): the new column is
/// `halfvec(3072)`, the cut-over brings its HNSW index (halfvec_cosine_ops), search
/// answers with the new model, a rollback goes back to `vector(1536)` for nothing, and
/// `finish` leaves the halfvec column alone with a valid index.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_from_1536_to_3072_dimensions_moves_to_halfvec() {
    const FROM: usize = 1536;
    const TO: usize = 3072;
    let s = setup_at(40, 16, FROM, TO).await;
    let daemon = s.daemon();
    converged(&s.t.client, &daemon).await;
    s.model(&["start"]).assert_success();
    let column_type = |column: &'static str| {
        let client = &s.t.client;
        async move {
            client
                .query_one(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                      WHERE attrelid = 'public.tenant_knowledge'::regclass AND attname = $1",
                    &[&column],
                )
                .await
                .expect("a column's type")
                .get::<_, String>(0)
        }
    };
    assert_eq!(column_type("embedding_next").await, "halfvec(3072)");
    s.filled(&daemon).await;
    every_chunk_has(&s.t.client, "embedding_next", NEXT_MODEL, TO).await;
    s.cutover().await;
    assert_eq!(
        embedding_column_and_index(&s.t.client).await,
        ("halfvec(3072)".into(), "halfvec_cosine_ops".into(), true)
    );
    every_chunk_has(&s.t.client, "embedding", NEXT_MODEL, TO).await;
    let (code, answer) = daemon
        .http_post_json(
            "/v1/search",
            Some(SEARCH_TOKEN),
            // The chunk's own text: the test server gives it the stored vector exactly.
            &serde_json::json!({"tenant": "1", "query": "Question: What about item 7?\nAnswer: Item 7 ships soon.", "mode": "vector", "k": 1}),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model"], NEXT_MODEL, "{answer}");
    let item_7: String =
        s.t.client
            .query_one("SELECT md5('qa7')::uuid::text", &[])
            .await
            .expect("item 7's key")
            .get(0);
    assert_eq!(answer["results"][0]["key"], item_7, "{answer}");

    let requests = (s.t.server.request_count(), s.next.request_count());
    s.model(&["rollback"]).assert_success();
    assert_eq!(
        embedding_column_and_index(&s.t.client).await,
        ("vector(1536)".into(), "vector_cosine_ops".into(), true)
    );
    every_chunk_has(&s.t.client, "embedding", TEST_MODEL, FROM).await;
    s.cutover().await;
    s.model(&["finish"]).assert_success();
    assert_eq!(
        vector_columns(&s.t.client).await,
        ["embedding", "embedding_model"]
    );
    assert_eq!(
        embedding_column_and_index(&s.t.client).await,
        ("halfvec(3072)".into(), "halfvec_cosine_ops".into(), true)
    );
    assert_eq!(
        (s.t.server.request_count(), s.next.request_count()),
        requests,
        "a rollback and a second cut-over sent embedding requests"
    );
    // Live sync goes on into the halfvec column.
    s.t.client
        .execute(
            "UPDATE web_knowledge_qapair SET answer = 'Finished: ships now.' WHERE id = md5('qa1')::uuid",
            &[],
        )
        .await
        .expect("an edit");
    converged_with_model(&s.t.client, &daemon, NEXT_MODEL).await;
    every_chunk_has(&s.t.client, "embedding", NEXT_MODEL, TO).await;
}
