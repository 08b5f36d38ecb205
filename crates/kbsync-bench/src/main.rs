//! `just bench`: kbsync's benchmarks against a real PostgreSQL and the
//! OpenAI-compatible test server (zero latency), printed as a table and written to
//! BENCHMARKS.md with the machine and the command that reproduces them.
//!
//! sync latency: one commit at a time to a product's description, every debounce
//! window set to 0, time from the commit's return until the new chunk is visible to
//! another connection. Baseline, same run: the commit round trip of the same UPDATE.

mod backfill;
mod bench_db;
mod coalescing;
mod reconcile_sweep;
mod trigger_overhead;

use std::time::{Duration, Instant};

use kbsync_testkit::{DaemonProcess, FakeOpenAi, TestDb, sync_config};
use tokio_postgres::NoTls;

const WRITES: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Local model throughput: chunks/s for short (~20 words) and long (~200 words) chunks,
/// in batches as the daemon sends them. Baseline, same run: tokenizing the same chunks.
fn local_model_rows() -> Vec<(String, String)> {
    use kbsync_core::chunk::TokenCounter;
    use kbsync_core::embed::local::LocalModel;
    let dir = kbsync_testkit::repo_root().join(".kbsync/models/all-MiniLM-L6-v2");
    let model = LocalModel::load(&dir, "all-MiniLM-L6-v2")
        .expect("the local model (`just model` fetches it)");
    let counter = TokenCounter::WordPiece(model.counter());
    let words = |n: usize, seed: usize| -> String {
        const VOCAB: [&str; 12] = [
            "delivery", "order", "returns", "warranty", "bike", "bread", "tent", "payment", "shop",
            "open", "price", "days",
        ];
        (0..n)
            .map(|i| VOCAB[(i * 7 + seed) % VOCAB.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut rows = Vec::new();
    for (label, n_words, count) in [
        ("short (~20 words)", 20, 256),
        ("long (~200 words)", 200, 64),
    ] {
        let chunks: Vec<String> = (0..count).map(|i| words(n_words, i)).collect();
        let started = Instant::now();
        let tokens: usize = chunks.iter().map(|c| counter.count(c)).sum();
        let tokenize = started.elapsed();
        let started = Instant::now();
        model.embed_blocking(&chunks).expect("embedding");
        let embed = started.elapsed();
        rows.push((
            format!("local model, {label}: chunks/s"),
            format!(
                "{:.0} ({} chunks, {} tokens, {:.2} s)",
                count as f64 / embed.as_secs_f64(),
                count,
                tokens,
                embed.as_secs_f64()
            ),
        ));
        rows.push((
            format!("local model, {label}: embedding time / tokenizing time"),
            format!(
                "{:.0}x",
                embed.as_secs_f64() / tokenize.as_secs_f64().max(1e-9)
            ),
        ));
    }
    rows
}

/// Sync latency rows (see the module doc).
async fn latency_rows() -> Vec<(String, String)> {
    let server = FakeOpenAi::start(8).await;
    let config = sync_config(&server.base_url(), 8, "0s", "0s");
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    let daemon = DaemonProcess::start(config.path(), db.url());
    let (writer, conn) = tokio_postgres::connect(db.url(), NoTls)
        .await
        .expect("writer");
    tokio::spawn(conn);
    let (reader, conn) = tokio_postgres::connect(db.url(), NoTls)
        .await
        .expect("reader");
    tokio::spawn(conn);

    // Let the demo backfill drain first.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 = reader
            .query_one("SELECT count(*) FROM kbsync.outbox", &[])
            .await
            .expect("outbox")
            .get(0);
        if n == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backfill did not drain:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let update = writer
        .prepare("UPDATE web_knowledge_product SET description = $1 WHERE id = md5('product-1-headlamp-1')::uuid")
        .await
        .expect("prepare");
    let probe = reader
        .prepare("SELECT 1 FROM tenant_knowledge WHERE source = 'product' AND content LIKE '%' || $1 || '%'")
        .await
        .expect("prepare");
    let mut latencies = Vec::with_capacity(WRITES);
    let mut commits = Vec::with_capacity(WRITES);
    for i in 0..WRITES {
        let marker = format!("latency-probe-{i}");
        let started = Instant::now();
        writer
            .execute(&update, &[&format!("Description {marker}.")])
            .await
            .expect("update");
        let committed = Instant::now();
        commits.push(committed - started);
        let deadline = committed + Duration::from_secs(30);
        loop {
            if !reader
                .query(&probe, &[&marker])
                .await
                .expect("probe")
                .is_empty()
            {
                latencies.push(committed.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "write {i} not visible after 30 s:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // About 100 commits/s at most.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies.sort();
    commits.sort();
    let p50 = percentile(&latencies, 0.50);
    let rows = [
        ("commit → visible p50", ms(p50)),
        ("commit → visible p95", ms(percentile(&latencies, 0.95))),
        ("commit → visible p99", ms(percentile(&latencies, 0.99))),
        (
            "baseline: commit round trip p50",
            ms(percentile(&commits, 0.50)),
        ),
        (
            "ratio p50 latency / commit round trip",
            format!(
                "{:.1}x",
                p50.as_secs_f64() / percentile(&commits, 0.50).as_secs_f64()
            ),
        ),
    ];
    rows.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn table(rows: &[(String, String)]) -> String {
    let mut table = String::from("| measure | value |\n| --- | --- |\n");
    for (name, value) in rows {
        table.push_str(&format!("| {name} | {value} |\n"));
    }
    table
}

const SECTIONS: [&str; 6] = [
    "triggers",
    "latency",
    "backfill",
    "coalescing",
    "model",
    "reconcile",
];

/// `kbsync-bench [SECTION...]`: all sections (and BENCHMARKS.md written) by default.
#[tokio::main]
async fn main() {
    let asked: Vec<String> = std::env::args().skip(1).collect();
    if let Some(bad) = asked.iter().find(|a| !SECTIONS.contains(&a.as_str())) {
        eprintln!("unknown section {bad:?}; sections: {}", SECTIONS.join(", "));
        std::process::exit(2);
    }
    let run = |name: &str| asked.is_empty() || asked.iter().any(|a| a == name);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        })
        .unwrap_or_default();
    let (client, conn) = tokio_postgres::connect(&kbsync_testkit::admin_url(), NoTls)
        .await
        .expect("connecting to DATABASE_URL");
    tokio::spawn(conn);
    let version: String = client
        .query_one("SELECT version()", &[])
        .await
        .expect("version")
        .get(0);
    let mut report = format!(
        "# kbsync benchmarks\n\nRun {date} with `just bench` on {cores} cores, {mem} kB memory; {version}.\n\n",
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    );
    if run("triggers") {
        let seconds: u32 = std::env::var("KBSYNC_BENCH_PGBENCH_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        report.push_str(&format!(
            "## Trigger overhead (the application's writes)\n\npgbench against 100,000 QAPairs (the `faq` source: \
             tenant through the page, filter on generation_status), no daemon running, so this is the writer's \
             own cost: the outbox upsert, the tenant lookup, the NOTIFY.\n\n{}\n",
            table(&trigger_overhead::rows(seconds).await)
        ));
    }
    if run("latency") {
        report.push_str(&format!(
            "## Sync latency\n\n{WRITES} sequential single-row commits (~100/s at most), debounce windows 0, an \
             OpenAI-compatible test server answering at once; latency is from the commit's return to the new \
             chunk being visible on another connection (polled every 1 ms). Debug build of kbsync (what `just test` builds).\n\n{}\n",
            table(&latency_rows().await)
        ));
    }
    if run("backfill") {
        report.push_str(&format!(
            "## Backfill and scale-out\n\nDebug build of kbsync, an OpenAI-compatible test server, one tenant's \
             QAPairs queued at once by the triggers (daemons stopped), drained by the daemon(s).\n\n{}\n",
            table(&backfill::rows().await)
        ));
    }
    if run("coalescing") {
        report.push_str(&format!(
            "## Coalescing, no-op updates, fairness\n\nCounted by the test server (embedding inputs received).\n\n{}\n",
            table(&coalescing::rows().await)
        ));
    }
    if run("model") {
        let model_rows = tokio::task::spawn_blocking(local_model_rows)
            .await
            .expect("local model bench");
        report.push_str(&format!(
            "## Local model (all-MiniLM-L6-v2, candle, CPU)\n\nBatches of 32 as the daemon sends them; dependencies \
             built with opt-level 3.\n\n{}\n",
            table(&model_rows)
        ));
    }
    if run("reconcile") {
        report.push_str(&format!(
            "## Reconcile sweep\n\nOne source (`bench_docs`, bigint key, one chunk per row; 1,000,000 rows unless KBSYNC_BENCH_RECONCILE_ROWS says otherwise) with its \
             chunks loaded in SQL exactly as the daemon writes them (checked by a dry run finding nothing); \
             `kbsync reconcile` run as its own process (debug build, range_size 5000), peak RSS from its VmHWM. \
             Then 1% drift made with the triggers off and swept for real (keys queued, orphans deleted).\n\n{}\n",
            table(&reconcile_sweep::rows().await)
        ));
    }
    println!("{report}");
    if !asked.is_empty() {
        eprintln!("partial run: BENCHMARKS.md not written");
        return;
    }
    let out = kbsync_testkit::repo_root().join("BENCHMARKS.md");
    std::fs::write(&out, &report).expect("writing BENCHMARKS.md");
    eprintln!("written to {}", out.display());
}
