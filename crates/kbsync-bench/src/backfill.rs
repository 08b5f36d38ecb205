//! Backfill: 100,000 QAPairs queued at once and drained by one daemon with a
//! zero-latency provider (rows/s, chunks/s, the daemon's peak RSS), against a binary
//! COPY of the very same chunk rows into a copy of tenant_knowledge (the physical
//! limit of writing them); then (`concurrency_rows`) with 50 ms per request against
//! 0 ms, and provider-bound (200 ms per request), one daemon vs two.
//! And the HNSW index at 1536 dimensions: a backfill with the index maintained row by
//! row, with it deferred and built in bulk (the shipped config), and without any index
//! plus one plain `CREATE INDEX` afterwards (the baseline).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kbsync_core::search::index::{self, IndexState};
use kbsync_testkit::demo_state::outbox_len;
use kbsync_testkit::{DaemonProcess, FakeOpenAi, TempConfig, TestDb, sync_config};
use tokio_postgres::Client;

use crate::bench_db::{demo_db, load_qapairs};

const DIMS: usize = 8;

/// Demo tables, kbsync installed, and `n` QAPairs queued by the triggers.
async fn queued(config: &TempConfig, n: i64) -> (TestDb, Client) {
    let (db, client) = demo_db(config).await;
    load_qapairs(&client, n, "pending").await;
    (db, client)
}

/// Wait until nothing is pending (`outbox_len`); the elapsed time and the daemons' peak RSS (KiB).
async fn drain(client: &Client, daemons: &[DaemonProcess]) -> (Duration, u64) {
    let started = Instant::now();
    let mut peak = 0;
    loop {
        for d in daemons {
            peak = peak.max(vm_hwm(d.pid()));
        }
        let left = outbox_len(client).await;
        if left == 0 {
            return (started.elapsed(), peak);
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "backfill did not drain in 10 minutes:\n{}",
            daemons.iter().map(DaemonProcess::log).collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

const COLUMNS: &str = "tenant_id, source, source_key, chunk_index, content, content_hash, embedding, \
                       embedding_model, metadata, source_text_hash, chunking, chunk_count";

/// Binary COPY of every chunk row into a copy of tenant_knowledge (its indexes, the
/// HNSW one only `with_hnsw`); the time of the COPY in.
async fn copy_baseline(client: &Client, with_hnsw: bool) -> Duration {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS copy_target;
             CREATE TABLE copy_target (LIKE public.tenant_knowledge INCLUDING ALL EXCLUDING INDEXES);
             CREATE UNIQUE INDEX ON copy_target (source, source_key, chunk_index);
             CREATE INDEX ON copy_target (tenant_id, source);
             CREATE INDEX ON copy_target (content_hash);
             {}",
            if with_hnsw {
                format!(
                    "CREATE INDEX ON copy_target USING hnsw (embedding vector_cosine_ops) WITH ({});",
                    index::HNSW_OPTIONS
                )
            } else {
                String::new()
            }
        ))
        .await
        .expect("copy target");
    let out = client
        .copy_out(&format!(
            "COPY (SELECT {COLUMNS} FROM public.tenant_knowledge) TO STDOUT (FORMAT binary)"
        ))
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = out
        .map(|c| c.expect("copy out data"))
        .collect::<Vec<_>>()
        .await;
    let started = Instant::now();
    let sink = client
        .copy_in(&format!(
            "COPY copy_target ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    for chunk in chunks {
        sink.send(chunk).await.expect("copy in data");
    }
    sink.finish().await.expect("copy in finish");
    started.elapsed()
}

pub async fn rows() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let n: i64 = 100_000;
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "0s", "0s");
    let (db, client) = queued(&config, n).await;
    let daemon = DaemonProcess::start_as_shipped(config.path(), db.url());
    let (took, peak) = drain(&client, std::slice::from_ref(&daemon)).await;
    let chunks: i64 = client
        .query_one("SELECT count(*) FROM tenant_knowledge", &[])
        .await
        .expect("chunks")
        .get(0);
    assert_eq!(chunks, n, "backfill incomplete");
    drop(daemon);
    let per_sec = |count: i64, d: Duration| count as f64 / d.as_secs_f64();
    out.push((
        format!("backfill, {n} QAPairs queued at once, zero-latency provider (the index deferred for the backlog): rows/s"),
        format!("{:.0} ({:.1} s)", per_sec(n, took), took.as_secs_f64()),
    ));
    out.push(("  chunks/s".into(), format!("{:.0}", per_sec(chunks, took))));
    for with_hnsw in [true, false] {
        let copy = copy_baseline(&client, with_hnsw).await;
        let which = if with_hnsw {
            "with the HNSW index maintained (what the daemon did before it deferred the index; target ≥ 0.5)"
        } else {
            "without the HNSW index (what the daemon writes into during the backlog)"
        };
        out.push((
            format!("  baseline: binary COPY of the same chunk rows {which}: chunks/s; ratio backfill / COPY"),
            format!(
                "{:.0} ({:.1} s); {:.2}",
                per_sec(chunks, copy),
                copy.as_secs_f64(),
                copy.as_secs_f64() / took.as_secs_f64()
            ),
        ));
    }
    out.push((
        "  daemon peak RSS during the backfill".into(),
        format!("{:.0} MiB", peak as f64 / 1024.0),
    ));

    out
}

/// Requests that overlap and daemons that share a provider: one daemon, 8 requests
/// in flight at most, 0 ms vs 50 ms a request of at most 16 inputs; then
/// provider-bound (200 ms a request, 2 in flight per daemon), one daemon vs two. The
/// daemons are started and listening before the rows are committed: start-up is not
/// throughput, and one daemon's start-up would count against two.
pub async fn concurrency_rows() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rows_bound: i64 = 10_000;
    let run = |latency_ms: u64, concurrency: usize, daemons: usize, rows: i64| async move {
        let server = FakeOpenAi::start(DIMS).await;
        server.set_latency(Duration::from_millis(latency_ms));
        let config = sync_config(&server.base_url(), DIMS, "0s", "0s").edited(&[
            ("max_inputs_per_request = 64", "max_inputs_per_request = 16"),
            (
                "max_concurrency = 2",
                &format!("max_concurrency = {concurrency}"),
            ),
        ]);
        let (db, client) = demo_db(&config).await;
        let running: Vec<DaemonProcess> = (0..daemons)
            .map(|_| DaemonProcess::start_as_shipped(config.path(), db.url()))
            .collect();
        for daemon in &running {
            daemon
                .wait_until_listening(1, Duration::from_secs(30))
                .await;
        }
        load_qapairs(&client, rows, "pending").await;
        drain(&client, &running).await.0
    };
    let (at_0, at_50) = alternated(|| run(0, 8, 1, rows_bound), || run(50, 8, 1, rows_bound)).await;
    out.push((
        format!("backfill of {rows_bound} rows, one daemon, max_concurrency 8, 16 inputs/request: rows/s with the provider answering in 0 ms / in 50 ms"),
        format!("{:.0} / {:.0}", rows_bound as f64 / at_0, rows_bound as f64 / at_50),
    ));
    out.push((
        "  ratio 50 ms / 0 ms (target ≥ 0.7)".into(),
        format!("**{:.2}**", at_0 / at_50),
    ));
    let rows_bound: i64 = 4_000;
    let (one, two) = alternated(|| run(200, 2, 1, rows_bound), || run(200, 2, 2, rows_bound)).await;
    out.push((
        format!("provider-bound backfill ({rows_bound} rows, 200 ms/request, 16 inputs/request, max_concurrency 2 per daemon): rows/s with 1 daemon / 2 daemons"),
        format!("{:.0} / {:.0}", rows_bound as f64 / one, rows_bound as f64 / two),
    ));
    out.push((
        "  speed-up 2 daemons / 1 (target ≥ 1.9)".into(),
        format!("**{:.2}**", one / two),
    ));
    out
}

/// How the HNSW index is treated during a backfill.
#[derive(Clone, Copy, PartialEq)]
enum IndexHandling {
    /// `index.defer_above = 0`: maintained row by row (the install before deferral).
    RowByRow,
    /// The shipped config: dropped for the backlog, built concurrently afterwards.
    Deferred,
    /// No index during the backfill, one plain `CREATE INDEX` after it: the baseline.
    BuiltAfter,
}

/// (seconds until every chunk is written, seconds until the index is valid, daemon
/// peak RSS in KiB) for `n` FAQs at `dims` dimensions.
async fn backfill_with_index(handling: IndexHandling, n: i64, dims: usize) -> (f64, f64, u64) {
    let server = FakeOpenAi::start(dims).await;
    let mut config = sync_config(&server.base_url(), dims, "0s", "0s");
    if handling != IndexHandling::Deferred {
        config = config.edited(&[("defer_above = 10000", "defer_above = 0")]);
    }
    let (db, client) = queued(&config, n).await;
    if handling == IndexHandling::BuiltAfter {
        client
            .batch_execute(&format!("DROP INDEX {}", index::HNSW_INDEX))
            .await
            .expect("dropping the HNSW index");
    }
    let started = Instant::now();
    let daemon = DaemonProcess::start_as_shipped(config.path(), db.url());
    let (_, mut peak) = drain(&client, std::slice::from_ref(&daemon)).await;
    let written = started.elapsed().as_secs_f64();
    if handling == IndexHandling::BuiltAfter {
        // The same memory and workers as the daemon's build.
        let index = kbsync_core::config::IndexConfig::default();
        client
            .batch_execute(&format!(
                "SET maintenance_work_mem = '{}MB'; SET max_parallel_maintenance_workers = {}; {}",
                index.build_memory_mb,
                index.build_workers,
                index::create_sql(false, kbsync_core::config::VectorType::Vector)
            ))
            .await
            .expect("CREATE INDEX");
    }
    loop {
        peak = peak.max(vm_hwm(daemon.pid()));
        if index::state(&client).await.expect("index state") == IndexState::Valid {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "the index was not valid within 20 minutes:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let valid = started.elapsed().as_secs_f64();
    let chunks: i64 = client
        .query_one(
            "SELECT count(*) FROM tenant_knowledge WHERE embedding IS NOT NULL",
            &[],
        )
        .await
        .expect("chunks")
        .get(0);
    assert_eq!(chunks, n, "backfill incomplete");
    (written, valid, peak)
}

/// The backfill at 1536 dimensions, three ways, alternated, 2 runs each, medians.
pub async fn index_rows() -> Vec<(String, String)> {
    let n: i64 = 20_000;
    let dims = 1536;
    let ways = [
        IndexHandling::RowByRow,
        IndexHandling::Deferred,
        IndexHandling::BuiltAfter,
    ];
    let mut results: [Vec<(f64, f64, u64)>; 3] = Default::default();
    for _ in 0..2 {
        for (i, way) in ways.iter().enumerate() {
            results[i].push(backfill_with_index(*way, n, dims).await);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    let [row_by_row, deferred, built_after] = results.map(|runs| {
        let mut written: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let mut valid: Vec<f64> = runs.iter().map(|r| r.1).collect();
        let peak = runs.iter().map(|r| r.2).max().unwrap_or(0);
        (median(&mut written), median(&mut valid), peak)
    });
    let rate = |s: f64| n as f64 / s;
    let mib = |kib: u64| kib as f64 / 1024.0;
    vec![
        (
            format!("backfill of {n} FAQs at {dims} dimensions, index maintained row by row (index.defer_above = 0): rows/s until every chunk is written and the index valid"),
            format!("{:.0} ({:.1} s; peak RSS {:.0} MiB)", rate(row_by_row.1), row_by_row.1, mib(row_by_row.2)),
        ),
        (
            "  index deferred and built concurrently afterwards (shipped config): rows/s until every chunk is written (target ≥ 2,500)".into(),
            format!("**{:.0}** ({:.1} s)", rate(deferred.0), deferred.0),
        ),
        (
            "  … until the index is valid".into(),
            format!("{:.1} s (peak RSS {:.0} MiB)", deferred.1, mib(deferred.2)),
        ),
        (
            "  baseline: no index during the backfill, then one plain CREATE INDEX (same memory and workers)".into(),
            format!("{:.1} s written, {:.1} s with the index ({:.0} rows/s written)", built_after.0, built_after.1, rate(built_after.0)),
        ),
        (
            "  ratio deferred / baseline, until the index is valid (target ≤ 1.3)".into(),
            format!("**{:.2}**", deferred.1 / built_after.1),
        ),
        (
            "  speed-up deferred / row by row, until the index is valid (target ≥ 3)".into(),
            format!("**{:.2}**", row_by_row.1 / deferred.1),
        ),
    ]
}

/// `a` and `b` run alternately, twice each: the mean of each pair, in seconds.
async fn alternated<A, B, FA, FB>(a: A, b: B) -> (f64, f64)
where
    A: Fn() -> FA,
    B: Fn() -> FB,
    FA: std::future::Future<Output = Duration>,
    FB: std::future::Future<Output = Duration>,
{
    let (mut sum_a, mut sum_b) = (0.0, 0.0);
    for _ in 0..2 {
        sum_a += a().await.as_secs_f64();
        sum_b += b().await.as_secs_f64();
    }
    (sum_a / 2.0, sum_b / 2.0)
}
