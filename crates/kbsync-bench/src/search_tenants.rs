//! Search across many tenants (`just bench search-tenants`): 230,089 chunks over 101
//! tenants, one holding 100,000, one 30,000 and 99 holding 1,011 each, the latency data's texts and
//! vectors (the local model, 384 dimensions); each tenant class queried through
//! `kbsync.search()`, recall@10 against an exact scan of the tenant in the same run, as
//! the function is and with pgvector 0.8's iterative index scans on; first with the
//! column as `vector` (kbsync's index, then pgvector's default build as the baseline),
//! then converted to `halfvec` with its index built again: the same data, the same
//! queries.

use std::time::{Duration, Instant};

use kbsync_core::config::{Config, VectorType};
use kbsync_core::search::index::{self, HNSW_INDEX};
use kbsync_testkit::local_model_config;
use pgvector::Vector;
use tokio_postgres::Client;

use crate::bench_db::demo_db;
use crate::search_eval::{LatencyData, insert_chunks, latency_data};
use crate::statistics::{ms, percentile};

const TENANTS: i32 = 100;
const SMALL_TENANT_CHUNKS: usize = 1_011;
/// Tenant 101: too large for the exact-scan fallback (20,000), too small a share of
/// the index for an unfiltered walk to find the candidates among its neighbours.
const MID_TENANT: i32 = TENANTS + 1;
const MID_TENANT_CHUNKS: usize = 30_000;
const QUERIES: usize = 200;

/// The tenant asked by query number `at`.
type TenantOf = fn(usize) -> String;

/// The tenant classes queried: a name, and the tenant each query asks.
const CLASSES: [(&str, TenantOf); 3] = [
    ("the large tenant (100,000 chunks)", |_| "1".to_owned()),
    ("a mid-size tenant (30,000 chunks)", |_| {
        MID_TENANT.to_string()
    }),
    (
        "small tenants (1,011 chunks each, a query each in turn)",
        |at| (2 + at as i32 % (TENANTS - 1)).to_string(),
    ),
];

/// Tenant 1: every text; tenants 2..=100: `SMALL_TENANT_CHUNKS` texts each, a slice of
/// their own (near-duplicates across tenants would only make the filter's case easier).
async fn load(client: &Client, texts: &[String], vectors: &[Vector]) {
    insert_chunks(client, 1, texts, vectors).await;
    for tenant in 2..=TENANTS {
        // Consecutive slices, wrapping round at the end of the texts.
        let from = (tenant as usize - 2) * SMALL_TENANT_CHUNKS;
        let picked: Vec<usize> = (from..from + SMALL_TENANT_CHUNKS)
            .map(|i| i % texts.len())
            .collect();
        let own_texts: Vec<String> = picked.iter().map(|&i| texts[i].clone()).collect();
        let own_vectors: Vec<Vector> = picked.iter().map(|&i| vectors[i].clone()).collect();
        insert_chunks(client, tenant, &own_texts, &own_vectors).await;
    }
    // The mid-size tenant: the texts' second half, so not the small tenants' slices.
    let from = texts.len() / 2;
    insert_chunks(
        client,
        MID_TENANT,
        &texts[from..from + MID_TENANT_CHUNKS],
        &vectors[from..from + MID_TENANT_CHUNKS],
    )
    .await;
}

/// Build the HNSW index for a column of `vector_type`; its build time and size.
async fn build_index(client: &Client, vector_type: VectorType) -> (Duration, i64) {
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "SET maintenance_work_mem = '1GB'; {}; ANALYZE tenant_knowledge;",
            index::create_sql(false, vector_type)
        ))
        .await
        .expect("building the index");
    let took = started.elapsed();
    let size: i64 = client
        .query_one(
            &format!("SELECT pg_relation_size('public.{HNSW_INDEX}')"),
            &[],
        )
        .await
        .expect("the index size")
        .get(0);
    (took, size)
}

/// Recall@10 against the exact top 10, and p50 / p99 of `kbsync.search()` in vector
/// mode, for each query asked of the tenant `tenant_of(query number)`.
async fn measure(
    client: &Client,
    queries: &[(Vector, String)],
    tenant_of: impl Fn(usize) -> String,
) -> (f64, Vec<Duration>) {
    let exact = "SELECT x.source_key FROM (SELECT t.source_key, t.embedding <=> $2::vector AS d
                                            FROM tenant_knowledge t WHERE t.tenant_id = $1 OFFSET 0) x
                  ORDER BY x.d LIMIT 10";
    let keys =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let (mut found, mut times) = (0usize, Vec::with_capacity(queries.len()));
    for (at, (vector, text)) in queries.iter().enumerate() {
        let tenant = tenant_of(at);
        let truth = keys(
            client
                .query(exact, &[&tenant, vector])
                .await
                .expect("exact"),
        );
        let started = Instant::now();
        let rows = client
            .query(
                "SELECT source_key FROM kbsync.search($1, $2, $3, 10, 'vector')",
                &[&tenant, text, vector],
            )
            .await
            .expect("vector search");
        times.push(started.elapsed());
        let approximate = keys(rows);
        found += truth.iter().filter(|k| approximate.contains(k)).count();
    }
    times.sort();
    (found as f64 / (10 * queries.len()) as f64, times)
}

pub async fn rows() -> Vec<(String, String)> {
    let config = local_model_config("0s");
    let (_db, client) = demo_db(&config).await;
    let parsed = Config::load(config.path()).expect("the config");
    let LatencyData {
        texts,
        vectors,
        query_texts,
        query_vectors,
    } = latency_data(&parsed, QUERIES).await;
    client
        .batch_execute(&format!("DROP INDEX IF EXISTS {HNSW_INDEX}"))
        .await
        .expect("dropping the index");
    load(&client, &texts, &vectors).await;
    let queries: Vec<(Vector, String)> = query_vectors.into_iter().zip(query_texts).collect();
    let chunks = texts.len() + (TENANTS as usize - 1) * SMALL_TENANT_CHUNKS + MID_TENANT_CHUNKS;
    let mut out = Vec::new();
    for vector_type in [VectorType::Vector, VectorType::Halfvec] {
        let name = vector_type.sql_name();
        if vector_type == VectorType::Halfvec {
            client
                .batch_execute(&format!(
                    "DROP INDEX {HNSW_INDEX};
                     ALTER TABLE tenant_knowledge ALTER COLUMN embedding TYPE halfvec(384)
                         USING embedding::halfvec(384)"
                ))
                .await
                .expect("converting the column to halfvec");
        }
        let (build, size) = build_index(&client, vector_type).await;
        out.push((
            format!(
                "{chunks} chunks over {MID_TENANT} tenants, {name}(384): HNSW build, index size"
            ),
            format!("{:.1} s, {} MiB", build.as_secs_f64(), size / (1 << 20)),
        ));
        // As kbsync.search() is today; then with pgvector 0.8's iterative index scans
        // turned on for the session (the function leaves the setting as it finds it).
        for iterative in ["off", "relaxed_order"] {
            client
                .execute(
                    "SELECT set_config('hnsw.iterative_scan', $1, false)",
                    &[&iterative],
                )
                .await
                .expect("hnsw.iterative_scan");
            let scan = if iterative == "off" {
                String::new()
            } else {
                format!(", hnsw.iterative_scan = {iterative}")
            };
            for (class, tenant_of) in CLASSES {
                let (recall, times) = measure(&client, &queries, tenant_of).await;
                out.push((
                    format!("  {name}{scan}: {class}: recall@10, p50 / p99 of {QUERIES} queries"),
                    format!(
                        "{recall:.3}, {} / {}",
                        ms(percentile(&times, 0.5)),
                        ms(percentile(&times, 0.99))
                    ),
                ));
            }
        }
        client
            .batch_execute("RESET hnsw.iterative_scan")
            .await
            .expect("resetting hnsw.iterative_scan");
        if vector_type == VectorType::Vector {
            // The baseline for kbsync's denser graph: pgvector's default ef_construction.
            let started = Instant::now();
            client
                .batch_execute(&format!(
                    "DROP INDEX {HNSW_INDEX};
                     SET maintenance_work_mem = '1GB';
                     CREATE INDEX {HNSW_INDEX} ON tenant_knowledge USING hnsw (embedding vector_cosine_ops)
                         WITH (m = 16, ef_construction = 64);
                     ANALYZE tenant_knowledge;"
                ))
                .await
                .expect("building the pgvector-default index");
            let build = started.elapsed();
            for (class, tenant_of) in CLASSES {
                let (recall, times) = measure(&client, &queries, tenant_of).await;
                out.push((
                    format!(
                        "  vector, index built with pgvector's default ef_construction 64 ({:.1} s): {class}: recall@10, p50 / p99 of {QUERIES} queries",
                        build.as_secs_f64()
                    ),
                    format!(
                        "{recall:.3}, {} / {}",
                        ms(percentile(&times, 0.5)),
                        ms(percentile(&times, 0.99))
                    ),
                ));
            }
        }
    }
    out
}
