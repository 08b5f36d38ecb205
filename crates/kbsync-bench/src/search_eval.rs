//! Retrieval (`just bench search`). Quality: the committed evaluation set
//! (`data/search_eval.json`: three shops' FAQs, products and pages, questions labelled
//! paraphrase or keyword, each with the one document that answers it) synced by the
//! daemon with the offline model, then every question asked through `kbsync.search()`
//! in each mode: recall@1, recall@5 and MRR, beside the ranking of the independent
//! NumPy implementation of the same model (`tools/reference/minilm_reference.py`:
//! exact cosine over the tenant's chunks). Latency: 100,000 chunks for each of two
//! tenants at the local model's 384 dimensions, clustered around topic centres as
//! embeddings are, with the HNSW index: `kbsync.search()` per mode against an exact
//! scan of the tenant in the same run, and how much of the exact top 10 the
//! index-backed search returns.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kbsync_core::config::Config;
use kbsync_core::embed::Provider;
use kbsync_core::knowledge_index::HNSW_INDEX;
use kbsync_core::search::{self, Mode};
use kbsync_testkit::demo_state::outbox_len;
use kbsync_testkit::{DaemonProcess, local_model_config, repo_root};
use pgvector::Vector;
use tokio_postgres::Client;

use crate::bench_db::{demo_db, drained};
use crate::local_model::run_ok;
use crate::{ms, percentile};

const SET: &str = include_str!("../data/search_eval.json");
/// Hits asked for; a document ranked below this counts as not found (reciprocal rank 0).
const K: i32 = 10;

/// A chunk as the reference ranks it.
struct Chunk {
    tenant: String,
    source: String,
    key: String,
    content: String,
}

struct Question {
    tenant: String,
    kind: String,
    text: String,
    /// (source, source key) of the answer.
    answer: (String, String),
}

/// The set's rows in the demo tables (the FAQs' own page not crawled: no chunk), and
/// its questions with their answers' keys (`md5(tenant/source/label)` as a uuid).
async fn load(client: &Client) -> Vec<Question> {
    let set: serde_json::Value = serde_json::from_str(SET).expect("the evaluation set");
    let tenants = set["tenants"].as_object().expect("tenants");
    let id = |tenant: &str, source: &str, label: &str| format!("{tenant}/{source}/{label}");
    for (tenant, docs) in tenants {
        let user: i32 = tenant.parse().expect("a numeric tenant");
        client
            .execute(
                "INSERT INTO accounts_user (id, username, company, domain) VALUES ($1, $2, $2, $2)",
                &[&user, &format!("shop{user}")],
            )
            .await
            .expect("a tenant");
        client
            .execute(
                "INSERT INTO web_knowledge_websitepage (id, user_id, url)
                 VALUES (md5('eval-page-' || $1::int)::uuid, $1, 'https://shop.example/')",
                &[&user],
            )
            .await
            .expect("a page");
        for (label, faq) in docs["faqs"].as_object().expect("faqs") {
            client
                .execute(
                    "INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
                     VALUES (md5($1)::uuid, md5('eval-page-' || $2::int)::uuid, $3, $4, 'completed')",
                    &[&id(tenant, "faq", label), &user, &faq[0].as_str(), &faq[1].as_str()],
                )
                .await
                .expect("a FAQ");
        }
        for (label, page) in docs["pages"].as_object().into_iter().flatten() {
            client
                .execute(
                    "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
                     VALUES (md5($1)::uuid, $2, 'https://shop.example/' || $1, $3, $4, 'completed')",
                    &[&id(tenant, "page", label), &user, &page[0].as_str(), &page[1].as_str()],
                )
                .await
                .expect("a page");
        }
        for (label, p) in docs["products"].as_object().expect("products") {
            client
                .execute(
                    "INSERT INTO web_knowledge_product (id, user_id, name, description, category, price)
                     VALUES (md5($1)::uuid, $2, $3, $4, $5, $6::text::numeric)",
                    &[
                        &id(tenant, "product", label),
                        &user,
                        &p[0].as_str(),
                        &p[1].as_str(),
                        &p[2].as_str(),
                        &p[3].as_str(),
                    ],
                )
                .await
                .expect("a product");
        }
    }
    let mut questions = Vec::new();
    for q in set["queries"].as_array().expect("queries") {
        let field = |i: usize| q[i].as_str().expect("a query field").to_owned();
        let key: String = client
            .query_one(
                "SELECT md5($1)::uuid::text",
                &[&id(&field(0), &field(3), &field(4))],
            )
            .await
            .expect("an answer's key")
            .get(0);
        questions.push(Question {
            tenant: field(0),
            kind: field(1),
            text: field(2),
            answer: (field(3), key),
        });
    }
    questions
}

/// Recall@1, recall@5 and MRR of 1-based ranks (None: not in the top K).
fn metrics(ranks: &[Option<usize>]) -> String {
    let n = ranks.len().max(1) as f64;
    let within = |k: usize| ranks.iter().filter(|r| r.is_some_and(|r| r <= k)).count() as f64 / n;
    let mrr = ranks
        .iter()
        .map(|r| r.map_or(0.0, |r| 1.0 / r as f64))
        .sum::<f64>()
        / n;
    format!("{:.2} / {:.2} / {:.2}", within(1), within(5), mrr)
}

/// The rows of one ranking: all questions, then each kind.
fn ranking_rows(
    name: &str,
    questions: &[Question],
    ranks: &[Option<usize>],
) -> Vec<(String, String)> {
    let of_kind = |kind: &str| -> Vec<Option<usize>> {
        questions
            .iter()
            .zip(ranks)
            .filter(|(q, _)| q.kind == kind)
            .map(|(_, r)| *r)
            .collect()
    };
    vec![(
        format!("{name}: recall@1 / recall@5 / MRR — all; paraphrase; keyword"),
        format!(
            "{}; {}; {}",
            metrics(ranks),
            metrics(&of_kind("paraphrase")),
            metrics(&of_kind("keyword"))
        ),
    )]
}

/// Embeddings of `texts` by the NumPy reference implementation of the model.
fn reference_vectors(model_dir: &std::path::Path, texts: &[String]) -> Vec<Vec<f64>> {
    let python = run_ok(
        Command::new(repo_root().join("scripts/venv.sh"))
            .arg("reference")
            .arg("tools/reference/requirements.txt"),
        "scripts/venv.sh reference (the NumPy reference needs PyPI access, once)",
    );
    let mut child = Command::new(python.trim())
        .arg(repo_root().join("tools/reference/minilm_reference.py"))
        .arg(model_dir)
        .arg("--embed")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the NumPy reference");
    child
        .stdin
        .take()
        .expect("its stdin")
        .write_all(serde_json::to_string(texts).expect("texts").as_bytes())
        .expect("writing the texts");
    let out = child.wait_with_output().expect("the NumPy reference");
    assert!(out.status.success(), "the NumPy reference failed");
    serde_json::from_slice(&out.stdout).expect("the reference's vectors")
}

pub async fn quality_rows() -> Vec<(String, String)> {
    let config = local_model_config("0s");
    let (db, client) = demo_db(&config).await;
    let questions = load(&client).await;
    let daemon = DaemonProcess::start(config.path(), db.url());
    drained(&client, &[&daemon], Duration::from_secs(300)).await;
    let chunks: Vec<Chunk> = client
        .query(
            "SELECT tenant_id, source, source_key, content FROM tenant_knowledge ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .expect("the chunks")
        .iter()
        .map(|r| Chunk {
            tenant: r.get(0),
            source: r.get(1),
            key: r.get(2),
            content: r.get(3),
        })
        .collect();
    let docs: usize = {
        let set: serde_json::Value = serde_json::from_str(SET).expect("the set");
        set["tenants"]
            .as_object()
            .expect("tenants")
            .values()
            .map(|t| {
                ["faqs", "products", "pages"]
                    .iter()
                    .map(|kind| t[kind].as_object().map_or(0, |m| m.len()))
                    .sum::<usize>()
            })
            .sum()
    };
    let synced: std::collections::HashSet<(&str, &str)> = chunks
        .iter()
        .map(|c| (c.source.as_str(), c.key.as_str()))
        .collect();
    assert_eq!(synced.len(), docs, "every document synced");
    assert_eq!(outbox_len(&client).await, 0);
    drop(daemon);

    let parsed = Config::load(config.path()).expect("the bench config");
    let provider = Provider::from_config(&parsed).expect("the local model");
    let texts: Vec<String> = questions.iter().map(|q| q.text.clone()).collect();
    let vectors: Vec<Vec<f32>> = provider
        .embed(&texts)
        .await
        .expect("embedding the questions")
        .into_iter()
        .map(|v| v.expect("a question's vector"))
        .collect();

    let mut out = vec![(
        "evaluation set (`crates/kbsync-bench/data/search_eval.json`)".to_owned(),
        format!(
            "{docs} documents of 3 tenants; {} questions ({} paraphrase, {} keyword)",
            questions.len(),
            questions.iter().filter(|q| q.kind == "paraphrase").count(),
            questions.iter().filter(|q| q.kind == "keyword").count()
        ),
    )];
    let mut recall_at_1 = HashMap::new();
    for mode in [Mode::Vector, Mode::Text, Mode::Hybrid] {
        let mut ranks = Vec::new();
        for (q, v) in questions.iter().zip(&vectors) {
            let hits = search::search(
                &client,
                &search::Query {
                    tenant: q.tenant.clone(),
                    text: q.text.clone(),
                    vector: Some(Vector::from(v.clone())),
                    k: K,
                    mode,
                    sources: None,
                    metadata: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("searching {:?}: {e}", q.text));
            assert!(
                hits.iter().all(|h| h.tenant == q.tenant),
                "another tenant's chunk"
            );
            ranks.push(
                hits.iter()
                    .position(|h| {
                        (h.source.as_str(), h.key.as_str())
                            == (q.answer.0.as_str(), q.answer.1.as_str())
                    })
                    .map(|i| i + 1),
            );
        }
        recall_at_1.insert(mode, ranks.iter().filter(|r| **r == Some(1)).count());
        out.extend(ranking_rows(
            &format!("kbsync.search, {mode}"),
            &questions,
            &ranks,
        ));
    }

    // The independent reference: the same model in NumPy, exact cosine within the tenant.
    let mut reference_texts: Vec<String> = chunks.iter().map(|c| c.content.clone()).collect();
    reference_texts.extend(texts.iter().cloned());
    let reference = reference_vectors(
        parsed.embedding.model_dir.as_deref().expect("model_dir"),
        &reference_texts,
    );
    let (chunk_vectors, question_vectors) = reference.split_at(chunks.len());
    let cosine = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let ranks: Vec<Option<usize>> = questions
        .iter()
        .zip(question_vectors)
        .map(|(q, qv)| {
            let mut scored: Vec<(f64, &Chunk)> = chunks
                .iter()
                .zip(chunk_vectors)
                .filter(|(c, _)| c.tenant == q.tenant)
                .map(|(c, cv)| (cosine(qv, cv), c))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            scored
                .iter()
                .take(K as usize)
                .position(|(_, c)| (&c.source, &c.key) == (&q.answer.0, &q.answer.1))
                .map(|i| i + 1)
        })
        .collect();
    out.extend(ranking_rows(
        "NumPy reference (the same model, exact cosine)",
        &questions,
        &ranks,
    ));
    out.push((
        "  hybrid / vector, questions ranked first".into(),
        format!(
            "**{} / {}** of {}",
            recall_at_1[&Mode::Hybrid],
            recall_at_1[&Mode::Vector],
            questions.len()
        ),
    ));
    out
}

/// Topic centres the latency data is drawn around.
const TOPICS: i32 = 2_000;

/// `n` chunks for each of `tenants` tenants, 384-dimension vectors near one of
/// `TOPICS` random centres each (embeddings of related texts lie close together;
/// uniformly random vectors, which nothing real resembles, are the HNSW graph's worst
/// case), and short texts; the HNSW index built afterwards (its build time returned).
async fn many_chunks(client: &Client, tenants: i32, n: i32) -> Duration {
    client
        .batch_execute(&format!(
            "DROP INDEX IF EXISTS {HNSW_INDEX};
             CREATE TEMPORARY TABLE topics AS
                 SELECT c, array_agg(random() - 0.5 ORDER BY d) AS centre
                   FROM generate_series(0, {last}) c, generate_series(1, 384) d GROUP BY c;",
            last = TOPICS - 1
        ))
        .await
        .expect("topic centres");
    for tenant in 1..=tenants {
        client
            .execute(
                "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash,
                                               embedding, embedding_model)
                 SELECT $1::int::text, 'faq', $1::int || '-' || g, 0, t.body, sha256(convert_to(t.body, 'UTF8')),
                        r.v, 'all-MiniLM-L6-v2'
                   FROM generate_series(1, $2::int) g
                   JOIN topics ON topics.c = g % $3::int,
                        LATERAL (SELECT format('Question %s about item %s in topic %s', g, g % 997, g % 101) AS body) t,
                        LATERAL (SELECT array_agg(topics.centre[d] + 0.25 * (random() - 0.5) ORDER BY d)::vector AS v
                                   FROM generate_series(1, 384) d) r",
                &[&tenant, &n, &TOPICS],
            )
            .await
            .expect("loading chunks");
    }
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "SET maintenance_work_mem = '1GB';
             CREATE INDEX {HNSW_INDEX} ON tenant_knowledge USING hnsw (embedding vector_cosine_ops);
             ANALYZE tenant_knowledge;"
        ))
        .await
        .expect("building the index");
    started.elapsed()
}

pub async fn latency_rows() -> Vec<(String, String)> {
    const TENANTS: i32 = 2;
    const PER_TENANT: i32 = 100_000;
    const QUERIES: usize = 200;
    let config = local_model_config("0s");
    let (_db, client) = demo_db(&config).await;
    let build = many_chunks(&client, TENANTS, PER_TENANT).await;
    let mut out = vec![(
        format!(
            "{PER_TENANT} chunks for each of {TENANTS} tenants, 384 dimensions, around {TOPICS} topic centres: HNSW build"
        ),
        format!("{:.1} s", build.as_secs_f64()),
    )];
    // Query vectors: near a random topic centre, like the chunks; text queries name a topic.
    let queries: Vec<(Vector, String)> = client
        .query(
            "SELECT (SELECT array_agg(t.centre[d] + 0.25 * (random() - 0.5) ORDER BY d)::vector
                       FROM generate_series(1, 384) d),
                    'topic ' || (q % 101)
               FROM generate_series(1, $1::int) q
               JOIN topics t ON t.c = (q * 7919) % $2::int",
            &[&(QUERIES as i32), &TOPICS],
        )
        .await
        .expect("query vectors")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let exact = "SELECT x.source_key FROM (SELECT t.source_key, t.embedding <=> $1 AS d FROM tenant_knowledge t
                                            WHERE t.tenant_id = '1' OFFSET 0) x ORDER BY x.d LIMIT 10";
    // How much of the exact top 10 the index-backed vector search returns.
    let mut found = 0;
    for (vector, text) in &queries {
        let keys = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
            rows.iter().map(|r| r.get(0)).collect()
        };
        let truth = keys(client.query(exact, &[vector]).await.expect("exact"));
        let approximate = keys(
            client
                .query(
                    "SELECT source_key FROM kbsync.search('1', $1, $2, 10, 'vector')",
                    &[text, vector],
                )
                .await
                .expect("vector search"),
        );
        found += truth.iter().filter(|k| approximate.contains(k)).count();
    }
    out.push((
        "  kbsync.search, vector: share of the exact 10 nearest it returns (recall@10 of the index)".into(),
        format!("{:.3}", found as f64 / (10 * queries.len()) as f64),
    ));
    let mut timings: Vec<(String, Vec<Duration>)> = Vec::new();
    for what in ["vector", "hybrid", "text", "exact"] {
        let mut times = Vec::with_capacity(QUERIES);
        for (vector, text) in &queries {
            let started = Instant::now();
            let rows = if what == "exact" {
                client.query(exact, &[vector]).await
            } else {
                client
                    .query(
                        "SELECT source_key FROM kbsync.search('1', $1, $2, 10, $3)",
                        &[text, vector, &what],
                    )
                    .await
            }
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            times.push(started.elapsed());
            assert!(!rows.is_empty(), "{what} found nothing");
        }
        times.sort();
        timings.push((what.to_owned(), times));
    }
    for (what, times) in &timings {
        let label = match what.as_str() {
            "exact" => "exact scan of the tenant (no index), 10 nearest: the baseline".to_owned(),
            mode => format!("kbsync.search, {mode}, k 10 (100 candidates)"),
        };
        out.push((
            format!("  {label}: p50 / p99 of {QUERIES} queries"),
            format!(
                "{} / {}",
                ms(percentile(times, 0.5)),
                ms(percentile(times, 0.99))
            ),
        ));
    }
    out
}
