//! Retrieval: `kbsync.search()` in its three modes, `POST /v1/search` with its
//! authentication and request checks, `kbsync search --mode`, and row-level security;
//! through every one of them, a tenant never sees another tenant's chunk, even one with
//! the very same text.

use kbsync_testkit::demo_state::{converged, embedding_column_and_index};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, Installed, TEST_API_KEY, TempConfig, run_kbsync, sync_config,
};
use tokio_postgres::Client;

const DIMS: usize = 64;
const TOKEN: &str = "search-token-7f3a9c";

/// Two tenants' FAQs (their pages not crawled: no page chunks). Tenant 2 has a FAQ
/// with exactly the text of one of tenant 1's.
const FAQS: &[(&str, i32, &str, &str)] = &[
    (
        "a-reset",
        1,
        "How do I reset my router?",
        "Hold the reset button for ten seconds.",
    ),
    (
        "a-error",
        1,
        "What does error E-4410 mean?",
        "The fan is blocked; clean the vent.",
    ),
    (
        "a-ship",
        1,
        "Do you ship abroad?",
        "We ship to every country in the EU.",
    ),
    (
        "a-pay",
        1,
        "Which payment methods do you accept?",
        "Cards and bank transfers.",
    ),
    (
        "b-reset",
        2,
        "How do I reset my router?",
        "Hold the reset button for ten seconds.",
    ),
    (
        "b-bread",
        2,
        "Is the sourdough vegan?",
        "Yes, it is flour, water and salt.",
    ),
];

/// The QAPair ids of the FAQs, by label (PostgreSQL makes them: `md5(label)::uuid`).
struct Keys(std::collections::HashMap<String, (i32, String)>);

impl Keys {
    async fn read(client: &Client) -> Self {
        let labels: Vec<&str> = FAQS.iter().map(|f| f.0).collect();
        let ids: Vec<String> = client
            .query(
                "SELECT md5(label)::uuid::text FROM unnest($1::text[]) WITH ORDINALITY AS l(label, n) ORDER BY n",
                &[&labels],
            )
            .await
            .expect("the FAQ ids")
            .iter()
            .map(|r| r.get(0))
            .collect();
        Self(
            FAQS.iter()
                .zip(ids)
                .map(|(f, id)| (f.0.to_owned(), (f.1, id)))
                .collect(),
        )
    }

    fn of(&self, label: &str) -> String {
        self.0[label].1.clone()
    }

    fn of_tenant(&self, tenant: i32) -> Vec<String> {
        let mut keys: Vec<String> = self
            .0
            .values()
            .filter(|(t, _)| *t == tenant)
            .map(|(_, k)| k.clone())
            .collect();
        keys.sort();
        keys
    }
}

async fn faqs(client: &Client) {
    client
        .batch_execute(
            "INSERT INTO accounts_user (id, username, company, domain)
                  VALUES (1, 'a', 'A', 'a.example'), (2, 'b', 'B', 'b.example');
             INSERT INTO web_knowledge_websitepage (id, user_id, url)
                  VALUES (md5('page-1')::uuid, 1, 'https://a.example/faq'),
                         (md5('page-2')::uuid, 2, 'https://b.example/faq');",
        )
        .await
        .expect("users and pages");
    for (label, tenant, question, answer) in FAQS {
        client
            .execute(
                "INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
                 VALUES (md5($1)::uuid, md5('page-' || $2::int)::uuid, $3, $4, 'completed')",
                &[label, tenant, question, answer],
            )
            .await
            .expect("a FAQ");
    }
}

/// The FAQs synced by a daemon serving the search API; FAQ chunks indexed in English.
async fn synced(
    row_level_security: bool,
) -> (Installed, DaemonProcess, Keys, tempfile::NamedTempFile) {
    synced_at(row_level_security, DIMS).await
}

/// `synced`, with a model of `dims` dimensions.
async fn synced_at(
    row_level_security: bool,
    dims: usize,
) -> (Installed, DaemonProcess, Keys, tempfile::NamedTempFile) {
    let tokens = tempfile::NamedTempFile::new().expect("a tokens file");
    std::fs::write(tokens.path(), format!("other-token\n{TOKEN}\n")).expect("tokens");
    let server = FakeOpenAi::start(dims).await;
    server.vectors_from_words(true);
    let search = format!(
        "max_query_chars = 200\napi_tokens_file = \"{}\"",
        tokens.path().display()
    );
    let config: TempConfig = sync_config(&server.base_url(), dims, "0s", "0s").edited(&[
        (
            "single_chunk = true",
            "single_chunk = true\ntext_search = \"english\"",
        ),
        ("max_query_chars = 2000", &search),
        (
            "row_level_security = false",
            &format!("row_level_security = {row_level_security}"),
        ),
    ]);
    let t = Installed::with_config(server, config).await;
    faqs(&t.client).await;
    let keys = Keys::read(&t.client).await;
    let daemon = t.daemon();
    converged(&t.client, &daemon).await;
    (t, daemon, keys, tokens)
}

/// `kbsync.search()` through SQL: the source keys, in rank order.
async fn sql_search(t: &Installed, tenant: &str, query: &str, mode: &str) -> Vec<String> {
    let vector = format!("{:?}", t.server.vector_for(query));
    t.client
        .query(
            "SELECT source_key FROM kbsync.search($1, $2, $3::text::vector, 10, $4)",
            &[&tenant, &query, &vector, &mode],
        )
        .await
        .unwrap_or_else(|e| panic!("kbsync.search({tenant}, {query:?}, {mode}): {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_mode_ranks_the_tenants_own_chunks_and_never_another_tenants() {
    let (t, _daemon, keys, _tokens) = synced(false).await;
    each_mode_ranks(&t, &keys).await;
    full_text_hybrid_fusion_and_bad_arguments(&t, &keys).await;
}

/// `kbsync.search()` in each mode finds the asked FAQ first, and only the tenant's.
async fn each_mode_ranks(t: &Installed, keys: &Keys) {
    let (a, b) = (keys.of_tenant(1), keys.of_tenant(2));
    for mode in ["vector", "text", "hybrid"] {
        let found = sql_search(t, "1", "How do I reset my router?", mode).await;
        assert_eq!(
            found.first(),
            Some(&keys.of("a-reset")),
            "{mode}: {found:?}"
        );
        assert!(found.iter().all(|k| a.contains(k)), "{mode}: {found:?}");
        let found = sql_search(t, "2", "How do I reset my router?", mode).await;
        assert_eq!(
            found.first(),
            Some(&keys.of("b-reset")),
            "{mode}: {found:?}"
        );
        assert!(found.iter().all(|k| b.contains(k)), "{mode}: {found:?}");
    }
}

/// Full text on its own, hybrid's fusion, the function's settings and its refusals.
async fn full_text_hybrid_fusion_and_bad_arguments(t: &Installed, keys: &Keys) {
    // Full-text finds the exact term, and only where it is.
    assert_eq!(
        sql_search(t, "1", "E-4410", "text").await,
        vec![keys.of("a-error")]
    );
    // The FAQ source's chunks are indexed in English: other word forms match.
    assert_eq!(
        sql_search(t, "1", "resetting routers", "text").await,
        vec![keys.of("a-reset")]
    );
    // Hybrid fuses both rankings: a chunk found by both comes first, with both ranks.
    let rows = t
        .client
        .query(
            "SELECT source_key, vector_rank, text_rank, score FROM kbsync.search('1', 'ship abroad', $1::text::vector, 3)",
            &[&format!("{:?}", t.server.vector_for("ship abroad"))],
        )
        .await
        .expect("a hybrid search");
    assert_eq!(rows.len(), 3, "vector mode ranks every chunk of the tenant");
    let row = &rows[0];
    assert_eq!(row.get::<_, String>(0), keys.of("a-ship"));
    assert_eq!(
        (row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)),
        (Some(1), Some(1))
    );
    assert!((row.get::<_, f64>(3) - 2.0 / 61.0).abs() < 1e-9);
    // The function's own hnsw.ef_search does not leak into the caller's transaction.
    let ef = t
        .client
        .simple_query(&format!(
            "BEGIN; SET LOCAL hnsw.ef_search = 77;
             SELECT count(*) FROM kbsync.search('1', 'x', '{:?}'::vector, 10, 'vector');
             SHOW hnsw.ef_search; COMMIT;",
            t.server.vector_for("x")
        ))
        .await
        .expect("a search inside a transaction");
    let shown: Vec<&str> = ef
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(shown.last(), Some(&"77"), "{shown:?}");
    // Bad arguments are errors that say what is wrong.
    for (sql, says) in [
        (
            "SELECT * FROM kbsync.search('1', 'x', NULL, 10, 'fuzzy')",
            "mode must be vector, text or hybrid",
        ),
        (
            "SELECT * FROM kbsync.search('1', 'x', NULL, 0, 'text')",
            "k must be between 1 and 1000",
        ),
        (
            "SELECT * FROM kbsync.search('1', 'x', NULL, 10, 'hybrid')",
            "needs query_vector",
        ),
        (
            "SELECT * FROM kbsync.search(NULL, 'x', NULL, 10, 'text')",
            "tenant is required",
        ),
    ] {
        let e = t.client.query(sql, &[]).await.expect_err(sql);
        assert!(format!("{e:?}").contains(says), "{sql}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_search_api_authenticates_checks_requests_and_keeps_tenants_apart() {
    let (t, daemon, keys, _tokens) = synced(false).await;
    let post = |token: Option<&'static str>, body: serde_json::Value| {
        let daemon = &daemon;
        async move { daemon.http_post_json("/v1/search", token, &body).await }
    };
    let question = serde_json::json!({"tenant": "1", "query": "How do I reset my router?"});
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, answer) = post(token, question.clone()).await;
        assert_eq!(status, 401, "{token:?}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("bearer token")
        );
    }
    let long = "x".repeat(201);
    for (body, says) in [
        (serde_json::json!({"query": "router"}), "tenant is required"),
        (serde_json::json!({"tenant": "1"}), "query is required"),
        (
            serde_json::json!({"tenant": "1", "query": "router", "mode": "fuzzy"}),
            "is not one of vector, text, hybrid",
        ),
        (
            serde_json::json!({"tenant": "1", "query": "router", "k": 0}),
            "k must be between 1 and 1000",
        ),
        (
            serde_json::json!({"tenant": "1", "query": "router", "k": 1001}),
            "k must be between 1 and 1000",
        ),
        (
            serde_json::json!({"tenant": "1", "query": long}),
            "more than search.max_query_chars (200)",
        ),
        (
            serde_json::json!({"tenant": "1", "query": "router", "sources": ["nope"]}),
            "nope",
        ),
        (
            serde_json::json!({"tenant": "1", "query": "router", "metadata": [1]}),
            "metadata must be a JSON object",
        ),
        (
            serde_json::json!({"tenant": "1", "query": "router", "limit": 3}),
            "unknown field `limit`",
        ),
    ] {
        let (status, answer) = post(Some(TOKEN), body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body}: {error}");
    }
    let (a, b) = (keys.of_tenant(1), keys.of_tenant(2));
    for mode in ["vector", "text", "hybrid"] {
        for (tenant, own) in [("1", &a), ("2", &b)] {
            let (status, answer) = post(
                Some(TOKEN),
                serde_json::json!({"tenant": tenant, "query": "How do I reset my router?", "mode": mode, "k": 10}),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["mode"], mode);
            let results = answer["results"].as_array().expect("results");
            assert!(!results.is_empty(), "{answer}");
            for hit in results {
                let found = hit["key"].as_str().expect("a key").to_owned();
                assert!(
                    own.contains(&found),
                    "tenant {tenant} got {found}: {answer}"
                );
            }
        }
    }
    // Filters: a source that has nothing for the query, and a metadata match.
    let (_, answer) = post(
        Some(TOKEN),
        serde_json::json!({"tenant": "1", "query": "router", "mode": "text", "sources": ["product"]}),
    )
    .await;
    assert_eq!(answer["results"], serde_json::json!([]));
    let page = t
        .client
        .query_one("SELECT md5('page-1')::uuid::text", &[])
        .await
        .expect("the page id")
        .get::<_, String>(0);
    let (_, answer) = post(
        Some(TOKEN),
        serde_json::json!({"tenant": "1", "query": "router", "mode": "text", "metadata": {"page_id": page}}),
    )
    .await;
    assert_eq!(answer["results"][0]["key"], keys.of("a-reset"), "{answer}");
    assert!(
        !daemon.log().contains(TOKEN),
        "the search token appeared in the daemon's log"
    );

    // The CLI goes through the same function.
    let out = t.db.kbsync_with_config(
        t.config.path(),
        &[
            "search", "--tenant", "1", "--mode", "text", "--json", "E-4410",
        ],
    );
    out.assert_success();
    let hits: serde_json::Value = serde_json::from_str(&out.stdout).expect("search --json");
    assert_eq!(hits[0]["key"], keys.of("a-error"), "{hits}");
    assert_eq!(hits[0]["text_rank"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_shows_an_application_role_only_its_sessions_tenant() {
    let (t, _daemon, keys, _tokens) = synced(true).await;
    let role = format!("kbsync_reader_{}", uuid::Uuid::new_v4().simple());
    t.client
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN;
             GRANT USAGE ON SCHEMA kbsync TO {role};
             GRANT SELECT ON public.tenant_knowledge, kbsync.knowledge_terms TO {role};"
        ))
        .await
        .expect("an application role");
    // A session of the application role, naming its tenant (or none).
    let reader = |tenant: Option<&'static str>| {
        let (db, role) = (&t.db, role.clone());
        async move {
            let client = db.client().await;
            let setting = tenant
                .map(|t| format!("SET kbsync.tenant = '{t}';"))
                .unwrap_or_default();
            client
                .batch_execute(&format!("SET ROLE {role}; {setting}"))
                .await
                .expect("becoming the application role");
            client
        }
    };
    let visible = |client: Client| async move {
        client
            .query("SELECT source_key FROM tenant_knowledge ORDER BY 1", &[])
            .await
            .expect("reading as the application role")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<String>>()
    };
    assert_eq!(visible(reader(Some("1")).await).await, keys.of_tenant(1));
    assert_eq!(visible(reader(Some("2")).await).await, keys.of_tenant(2));
    assert!(visible(reader(None).await).await.is_empty());
    // The words full-text search reads are guarded the same way.
    let words = |client: Client| async move {
        client
            .query(
                "SELECT DISTINCT tenant_id FROM kbsync.knowledge_terms ORDER BY 1",
                &[],
            )
            .await
            .expect("reading the terms as the application role")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<String>>()
    };
    assert_eq!(words(reader(Some("1")).await).await, ["1"]);
    assert!(words(reader(None).await).await.is_empty());

    let one = reader(Some("1")).await;
    // Asking the function for another tenant finds nothing: its rows are hidden.
    let search = |tenant: &str| {
        format!(
            "SELECT source_key FROM kbsync.search('{tenant}', 'reset router', NULL, 10, 'text')"
        )
    };
    let other = one.query(&search("2"), &[]).await.expect("searching");
    assert!(
        other.is_empty(),
        "tenant 2's rows were visible to tenant 1's session"
    );
    let own = one.query(&search("1"), &[]).await.expect("searching");
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].get::<_, String>(0), keys.of("a-reset"));
    // Writing stays kbsync's.
    let write = one
        .execute("DELETE FROM tenant_knowledge", &[])
        .await
        .expect_err("the application role may not write");
    assert!(
        format!("{write:?}").contains("permission denied"),
        "{write:?}"
    );
    drop(one);
    t.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .expect("dropping the role");
    // Turning it off again is an install away.
    let off = t
        .config
        .edited(&[("row_level_security = true", "row_level_security = false")]);
    let out = t.db.kbsync_with_config(off.path(), &["install"]);
    out.assert_success();
    assert!(
        out.stdout.contains("disable row-level security"),
        "{}",
        out.stdout
    );
}

/// A model of 3,072 dimensions (text-embedding-3-large's): the column is
/// `halfvec(3072)` with a valid HNSW index on it, and every way of searching ranks as
/// at 64 dimensions: `kbsync.search()`, `POST /v1/search` and `kbsync search`, each in
/// every mode.
#[tokio::test(flavor = "multi_thread")]
async fn a_3072_dimension_model_is_stored_as_halfvec_indexed_and_searched_every_way() {
    const WIDE: usize = 3072;
    let (t, daemon, keys, _tokens) = synced_at(false, WIDE).await;
    assert_eq!(
        embedding_column_and_index(&t.client).await,
        ("halfvec(3072)".into(), "halfvec_cosine_ops".into(), true)
    );
    each_mode_ranks(&t, &keys).await;

    // A query vector passed as `vector` ranks through the halfvec index: the planner
    // casts the parameter, not the column. (No tenant filter: on six chunks the
    // planner would rather sort the tenant's rows from its btree index.)
    let plan = t
        .client
        .simple_query(&format!(
            "BEGIN; SET LOCAL enable_seqscan = off;
             EXPLAIN SELECT id FROM public.tenant_knowledge t
               ORDER BY t.embedding <=> '{:?}'::vector LIMIT 10;
             COMMIT;",
            t.server.vector_for("router")
        ))
        .await
        .expect("EXPLAIN of a vector ranking");
    let plan: String = plan
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plan.contains("Index Scan using tenant_knowledge_embedding_hnsw"),
        "{plan}"
    );

    for mode in ["vector", "text", "hybrid"] {
        let (status, answer) = daemon
            .http_post_json(
                "/v1/search",
                Some(TOKEN),
                &serde_json::json!({"tenant": "1", "query": "How do I reset my router?", "mode": mode}),
            )
            .await;
        assert_eq!(status, 200, "{mode}: {answer}");
        assert_eq!(
            answer["results"][0]["key"],
            keys.of("a-reset"),
            "{mode}: {answer}"
        );
        let out = run_kbsync(
            t.config.path(),
            &[
                "search",
                "--tenant",
                "2",
                "--mode",
                mode,
                "--json",
                "How do I reset my router?",
            ],
            &[
                ("DATABASE_URL", t.db.url()),
                ("OPENAI_API_KEY", TEST_API_KEY),
            ],
        );
        out.assert_success();
        let hits: serde_json::Value = serde_json::from_str(&out.stdout).expect("search --json");
        assert_eq!(hits[0]["key"], keys.of("b-reset"), "{mode}: {hits}");
        assert!(
            hits.as_array().expect("a list of hits").iter().all(|h| keys
                .of_tenant(2)
                .contains(&h["key"].as_str().unwrap_or_default().to_owned())),
            "{mode}: {hits}"
        );
    }
}
