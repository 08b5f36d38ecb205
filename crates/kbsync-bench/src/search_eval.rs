//! Retrieval (`just bench search`). Quality: the committed evaluation set
//! (`data/search_eval.json`: three shops' FAQs, products and pages, questions labelled
//! paraphrase or keyword, each with the one document that answers it) synced by the
//! daemon with the offline model, then every question asked through `kbsync.search()`
//! in each mode: recall@1, recall@5 and MRR, beside the ranking of the independent
//! NumPy implementation of the same model (`tools/reference/minilm_reference.py`:
//! exact cosine over the tenant's chunks). Latency: 100,000 chunks for each of two
//! tenants, FAQ-like texts made from the set's sentences and embedded by the local
//! model (384 dimensions), with the HNSW index: the set's questions through
//! `kbsync.search()` per mode against an exact scan of the tenant in the same run,
//! and how much of the exact top 10 the index-backed search returns.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use kbsync_core::config::Config;
use kbsync_core::search::index::HNSW_INDEX;
use kbsync_core::search::{self, Mode};
use kbsync_core::sync::embed::Provider;
use kbsync_testkit::demo_state::outbox_len;
use kbsync_testkit::{DaemonProcess, local_model_config, repo_root};
use pgvector::Vector;
use tokio_postgres::Client;

use crate::bench_db::{demo_db, drained};
use crate::local_model::run_ok;
use crate::statistics::{ms, percentile};

/// The evaluation set, parsed once.
static SET: LazyLock<serde_json::Value> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../data/search_eval.json")).expect("the evaluation set")
});

/// Every document of the set (each tenant's FAQs, products and pages): its text fields.
fn documents() -> impl Iterator<Item = &'static serde_json::Value> {
    SET["tenants"]
        .as_object()
        .expect("tenants")
        .values()
        .flat_map(|docs| {
            ["faqs", "products", "pages"]
                .into_iter()
                .flat_map(move |kind| docs[kind].as_object().into_iter().flatten().map(|d| d.1))
        })
}
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
    let tenants = SET["tenants"].as_object().expect("tenants");
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
    for q in SET["queries"].as_array().expect("queries") {
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
    let daemon = DaemonProcess::start_as_shipped(config.path(), db.url());
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
    let docs = documents().count();
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

/// Distinct texts of the latency data (each tenant gets all of them).
pub(crate) const LATENCY_TEXTS: usize = 100_000;

/// The latency data's texts, the same in every run: a sentence of the evaluation
/// set's documents, a run of four words from another, and an item number, as
/// catalogue FAQs vary one theme (about 20 words each, short chunks).
pub(crate) fn latency_texts(n: usize) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    let mut sentences: Vec<String> = Vec::new();
    for fields in documents() {
        for field in fields.as_array().expect("a document's fields") {
            let field = field.as_str().expect("a text field");
            sentences.extend(
                field
                    .split_inclusive(['.', '?', ';'])
                    .map(str::trim)
                    .filter(|s| s.split_whitespace().count() >= 4)
                    .map(str::to_owned),
            );
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261206);
    (0..n)
        .map(|i| {
            let sentence = &sentences[rng.random_range(0..sentences.len())];
            let other: Vec<&str> = sentences[rng.random_range(0..sentences.len())]
                .split_whitespace()
                .collect();
            let from = rng.random_range(0..=other.len() - 4);
            format!("{sentence} {} Item {i}.", other[from..from + 4].join(" "))
        })
        .collect()
}

/// `texts` embedded by the local model of `config`, read from `.kbsync/cache` when a
/// run before embedded the same texts with the same model (about 10 minutes on 2
/// cores the first time).
pub(crate) async fn embedded_once(config: &Config, texts: &[String]) -> Vec<Vector> {
    use sha2::{Digest, Sha256};
    const DIMS: usize = 384;
    let mut key = Sha256::new();
    key.update(config.embedding.model.as_bytes());
    for text in texts {
        key.update(text.as_bytes());
        key.update([0]);
    }
    let key: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = repo_root().join(format!(".kbsync/cache/search-latency-{key}.f32"));
    let from_cache = std::fs::read(&path)
        .ok()
        .filter(|bytes| bytes.len() == texts.len() * DIMS * 4);
    let floats: Vec<f32> = match from_cache {
        Some(bytes) => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        None => {
            let provider = Provider::from_config(config).expect("the local model");
            let started = Instant::now();
            let mut floats = Vec::with_capacity(texts.len() * DIMS);
            for (done, batch) in texts.chunks(512).enumerate() {
                for outcome in provider.embed(batch).await.expect("embedding") {
                    let vector = outcome.expect("a text's vector");
                    assert_eq!(vector.len(), DIMS);
                    floats.extend(vector);
                }
                eprintln!(
                    "search latency data: {} of {} texts embedded ({:.0} s)",
                    ((done + 1) * 512).min(texts.len()),
                    texts.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            let bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
            std::fs::create_dir_all(path.parent().expect("the cache directory"))
                .expect("the cache directory");
            std::fs::write(&path, bytes).expect("caching the vectors");
            floats
        }
    };
    floats
        .chunks_exact(DIMS)
        .map(|v| Vector::from(v.to_vec()))
        .collect()
}

/// `texts` with their vectors as FAQ chunks of `tenant` (keys `TENANT-N`, N from 1),
/// 2,000 a statement.
pub(crate) async fn insert_chunks(
    client: &Client,
    tenant: i32,
    texts: &[String],
    vectors: &[Vector],
) {
    for (at, (texts, vectors)) in texts.chunks(2_000).zip(vectors.chunks(2_000)).enumerate() {
        client
            .execute(
                "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash,
                                               embedding, embedding_model)
                 SELECT $1::int::text, 'faq', $1::int || '-' || ($2::int + n), 0, body,
                        sha256(convert_to(body, 'UTF8')), v, 'all-MiniLM-L6-v2'
                   FROM unnest($3::text[], $4::vector[]) WITH ORDINALITY AS x(body, v, n)",
                &[&tenant, &((at * 2_000) as i32), &texts, &vectors],
            )
            .await
            .expect("loading chunks");
    }
}

/// Every text with its vector as a chunk of each of `tenants` tenants (the same
/// texts in each: near-identical chunks across tenants, the tenant filter's hard
/// case); the HNSW index built afterwards (its build time returned).
async fn many_chunks(
    client: &Client,
    tenants: i32,
    texts: &[String],
    vectors: &[Vector],
) -> Duration {
    client
        .batch_execute(&format!("DROP INDEX IF EXISTS {HNSW_INDEX}"))
        .await
        .expect("dropping the index");
    for tenant in 1..=tenants {
        insert_chunks(client, tenant, texts, vectors).await;
    }
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "SET maintenance_work_mem = '1GB';
             {};
             ANALYZE tenant_knowledge;
             ANALYZE kbsync.knowledge_terms;",
            kbsync_core::search::index::create_sql(false, kbsync_core::config::VectorType::Vector)
        ))
        .await
        .expect("building the index");
    started.elapsed()
}

/// The latency data: `LATENCY_TEXTS` texts and `queries` questions, with their
/// vectors by the local model (cached).
pub(crate) struct LatencyData {
    pub texts: Vec<String>,
    pub vectors: Vec<Vector>,
    pub query_texts: Vec<String>,
    pub query_vectors: Vec<Vector>,
}

pub(crate) async fn latency_data(config: &Config, queries: usize) -> LatencyData {
    let texts = latency_texts(LATENCY_TEXTS);
    // Queries: the evaluation set's questions, as a customer would type them, with
    // a greeting in front now and then so that no two are the same text.
    let questions: Vec<&str> = SET["queries"]
        .as_array()
        .expect("queries")
        .iter()
        .map(|q| q[2].as_str().expect("a question"))
        .collect();
    let leads = ["", "Hi, ", "Quick question: ", "Hello! ", "Please help: "];
    let query_texts: Vec<String> = (0..queries)
        .map(|q| {
            let lead = leads[(q / questions.len()) % leads.len()];
            format!("{lead}{}", questions[q % questions.len()])
        })
        .collect();
    let all: Vec<String> = texts.iter().chain(&query_texts).cloned().collect();
    let mut vectors = embedded_once(config, &all).await;
    let query_vectors = vectors.split_off(texts.len());
    LatencyData {
        texts,
        vectors,
        query_texts,
        query_vectors,
    }
}

pub async fn latency_rows() -> Vec<(String, String)> {
    const TENANTS: i32 = 2;
    const PER_TENANT: usize = LATENCY_TEXTS;
    const QUERIES: usize = 200;
    let config = local_model_config("0s");
    let (_db, client) = demo_db(&config).await;
    let parsed = Config::load(config.path()).expect("the config");
    let LatencyData {
        texts,
        vectors,
        query_texts,
        query_vectors,
    } = latency_data(&parsed, QUERIES).await;
    let build = many_chunks(&client, TENANTS, &texts, &vectors).await;
    let mut out = vec![(
        format!(
            "{PER_TENANT} chunks for each of {TENANTS} tenants (the same {LATENCY_TEXTS} FAQ-like texts, embedded by the local model: 384 dimensions): HNSW build"
        ),
        format!("{:.1} s", build.as_secs_f64()),
    )];
    // Full text needs every word of the query (websearch_to_tsquery), and few
    // questions share all their words with a chunk: the text and hybrid rankings are
    // timed with keywords that do match, two words in a row of a random chunk (the
    // costly case: every chunk that matches is ranked).
    let keywords: Vec<String> = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        (0..QUERIES)
            .map(|_| {
                let words: Vec<String> = texts[rng.random_range(0..texts.len())]
                    .split_whitespace()
                    .map(|w| {
                        w.trim_matches(|c: char| !c.is_alphanumeric())
                            .to_lowercase()
                    })
                    .filter(|w| w.len() > 2)
                    .collect();
                let from = rng.random_range(0..words.len() - 1);
                words[from..from + 2].join(" ")
            })
            .collect()
    };
    let mut matching: Vec<i64> = Vec::with_capacity(QUERIES);
    for words in &keywords {
        matching.push(
            client
                .query_one(
                    "SELECT count(*) FROM kbsync.knowledge_terms
                      WHERE tenant_id = '1' AND content_tsv @@ websearch_to_tsquery('simple', $1)",
                    &[words],
                )
                .await
                .expect("counting matches")
                .get(0),
        );
    }
    matching.sort_unstable();
    out.push((
        format!("  keyword queries (two words in a row of a chunk): chunks of the tenant each matches, median / p99 of {QUERIES}"),
        format!(
            "{} / {}",
            matching[QUERIES / 2],
            matching[(QUERIES * 99).div_ceil(100) - 1]
        ),
    ));
    let queries: Vec<(Vector, String)> = query_vectors.into_iter().zip(query_texts).collect();
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
        for ((vector, question), words) in queries.iter().zip(&keywords) {
            let text = if what == "vector" { question } else { words };
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
            "vector" => "kbsync.search, vector (the questions), k 10 (100 candidates)".to_owned(),
            "text" => "kbsync.search, text (the keywords), k 10 (100 candidates)".to_owned(),
            mode => format!(
                "kbsync.search, {mode} (the keywords and the question's vector), k 10 (100 candidates)"
            ),
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
