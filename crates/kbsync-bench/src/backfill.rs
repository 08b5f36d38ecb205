//! Backfill: 100,000 QAPairs queued at once and drained by one daemon with a
//! zero-latency provider (rows/s, chunks/s, the daemon's peak RSS), against a binary
//! COPY of the very same chunk rows into a copy of tenant_knowledge (the physical
//! limit of writing them); then, provider-bound (50 ms per request), one daemon vs two.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
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

/// Binary COPY of every chunk row into a copy of tenant_knowledge (same indexes, the
/// HNSW one included); the time of the COPY in.
async fn copy_baseline(client: &Client) -> Duration {
    client
        .batch_execute("CREATE TABLE copy_target (LIKE public.tenant_knowledge INCLUDING ALL)")
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
    let daemon = DaemonProcess::start(config.path(), db.url());
    let (took, peak) = drain(&client, std::slice::from_ref(&daemon)).await;
    let chunks: i64 = client
        .query_one("SELECT count(*) FROM tenant_knowledge", &[])
        .await
        .expect("chunks")
        .get(0);
    assert_eq!(chunks, n, "backfill incomplete");
    drop(daemon);
    let copy = copy_baseline(&client).await;
    let per_sec = |count: i64, d: Duration| count as f64 / d.as_secs_f64();
    out.push((
        format!("backfill, {n} QAPairs queued at once, zero-latency provider: rows/s"),
        format!("{:.0} ({:.1} s)", per_sec(n, took), took.as_secs_f64()),
    ));
    out.push(("  chunks/s".into(), format!("{:.0}", per_sec(chunks, took))));
    out.push((
        "  baseline: binary COPY of the same chunk rows, chunks/s".into(),
        format!("{:.0} ({:.1} s)", per_sec(chunks, copy), copy.as_secs_f64()),
    ));
    out.push((
        "  ratio backfill / COPY (target ≥ 0.5)".into(),
        format!("{:.2}", copy.as_secs_f64() / took.as_secs_f64()),
    ));
    out.push((
        "  daemon peak RSS during the backfill".into(),
        format!("{:.0} MiB", peak as f64 / 1024.0),
    ));

    // Provider-bound: 50 ms a request of at most 16 inputs. Once with the HNSW index,
    // once without it: on 2 cores its maintenance competes with the daemons for CPU.
    let rows_bound: i64 = 10_000;
    for hnsw in [true, false] {
        let mut times = Vec::new();
        for daemons in [1usize, 2] {
            let server = FakeOpenAi::start(DIMS).await;
            server.set_latency(Duration::from_millis(50));
            let config = sync_config(&server.base_url(), DIMS, "0s", "0s")
                .edited(&[("max_inputs_per_request = 64", "max_inputs_per_request = 16")]);
            let (db, client) = queued(&config, rows_bound).await;
            if !hnsw {
                client
                    .batch_execute("DROP INDEX tenant_knowledge_embedding_hnsw")
                    .await
                    .expect("dropping the HNSW index");
            }
            let running: Vec<DaemonProcess> = (0..daemons)
                .map(|_| DaemonProcess::start(config.path(), db.url()))
                .collect();
            let (took, _) = drain(&client, &running).await;
            times.push(took);
            let index = if hnsw { "with" } else { "without" };
            out.push((
            format!("provider-bound backfill ({rows_bound} rows, 50 ms/request, 16 inputs/request, {index} the HNSW index), {daemons} daemon(s): rows/s"),
            format!("{:.0} ({:.1} s)", per_sec(rows_bound, took), took.as_secs_f64()),
        ));
        }
        out.push((
            format!(
                "  speed-up 2 daemons / 1, {} the HNSW index (target ≥ 1.8)",
                if hnsw { "with" } else { "without" }
            ),
            format!("{:.2}", times[0].as_secs_f64() / times[1].as_secs_f64()),
        ));
    }
    out
}
