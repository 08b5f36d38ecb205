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
mod local_model;
mod migrate;
mod reconcile_sweep;
mod search_eval;
mod search_tenants;
mod statistics;
mod trigger_overhead;

use std::time::{Duration, Instant};

use kbsync_testkit::{DaemonProcess, FakeOpenAi, PrivateCluster, run_kbsync, sync_config};
use tokio_postgres::NoTls;

use crate::statistics::{ms, percentile};

const WRITES: usize = 200;

/// Sync latency rows (see the module doc), with trigger or logical capture.
async fn latency_rows(logical: bool) -> Vec<(String, String)> {
    let server = FakeOpenAi::start(8).await;
    let mut config = sync_config(&server.base_url(), 8, "0s", "0s");
    let mode = if logical { "logical" } else { "triggers" };
    if logical {
        config = config.edited(&[kbsync_testkit::LOGICAL_CAPTURE]);
    }
    // fsync on, as in production: on a server whose commits cost nothing, 64 writers
    // are pure CPU and leave a 2-core machine's daemon next to none of it.
    let cluster = PrivateCluster::start_durable();
    let url = cluster.database_url("postgres");
    for args in [&["demo", "schema"][..], &["install"], &["demo", "data"]] {
        run_kbsync(config.path(), args, &[("DATABASE_URL", url.as_str())]).assert_success();
    }
    let daemon = DaemonProcess::start_as_shipped(config.path(), &url);
    let (writer, conn) = tokio_postgres::connect(&url, NoTls).await.expect("writer");
    tokio::spawn(conn);
    let (reader, conn) = tokio_postgres::connect(&url, NoTls).await.expect("reader");
    tokio::spawn(conn);

    // Let the demo backfill drain first (in logical mode, once it is decoded).
    if logical {
        kbsync_testkit::demo_state::decoded(&reader, Duration::from_secs(300)).await;
    }
    bench_db::drained(&reader, &[&daemon], Duration::from_secs(300)).await;
    let (mut latencies, mut commits, lost) = probe(&writer, &reader, WRITES, None).await;
    assert_eq!(
        lost, 0,
        "probes not visible within {PROBE_TIMEOUT:?} with one writer"
    );
    latencies.sort();
    commits.sort();
    let p50 = percentile(&latencies, 0.50);
    let mut rows = vec![
        (format!("{mode}, 1 writer: commit → visible p50"), ms(p50)),
        (
            format!("{mode}, 1 writer: commit → visible p95"),
            ms(percentile(&latencies, 0.95)),
        ),
        (
            format!("{mode}, 1 writer: commit → visible p99 (target ≤ 50 ms)"),
            ms(percentile(&latencies, 0.99)),
        ),
        (
            format!("{mode}, baseline: commit round trip p50"),
            ms(percentile(&commits, 0.50)),
        ),
        (
            format!("{mode}, ratio p50 latency / commit round trip"),
            format!(
                "{:.1}x",
                p50.as_secs_f64() / percentile(&commits, 0.50).as_secs_f64()
            ),
        ),
    ];

    // The same probes while 64 pgbench clients edit 10,000 other products (another
    // tenant's) as fast as they can, all of it synced at debounce 0 as well.
    writer
        .batch_execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('load-' || g)::uuid, 2, 'Load product ' || g, 'First'
               FROM generate_series(1, 10000) g",
        )
        .await
        .expect("load products");
    bench_db::drained(&reader, &[&daemon], Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("load.sql");
    std::fs::write(
        &script,
        "\\set n random(1, 10000)\nUPDATE web_knowledge_product SET description = 'Load ' || random() WHERE id = md5('load-' || :n)::uuid;\n",
    )
    .expect("pgbench script");
    let mut load = trigger_overhead::pgbench_background(&url, &script, 64, LOAD_SECONDS);
    // Let the load reach its pace first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = server.inputs_total();
    let writes_before = table_writes(&reader).await;
    let started = Instant::now();
    // Probes start only while the load runs (a backlog behind can outlast it by far).
    let until = Instant::now() + Duration::from_secs(u64::from(LOAD_SECONDS) - 3);
    let (mut loaded, _, late) = probe(&writer, &reader, WRITES / 2, Some(until)).await;
    let seconds = started.elapsed().as_secs_f64();
    let synced_per_second = (server.inputs_total() - before) as f64 / seconds;
    let writes_after = table_writes(&reader).await;
    let updates_per_second = (writes_after.0 - writes_before.0) as f64 / seconds;
    let chunk_writes_per_second = (writes_after.1 - writes_before.1) as f64 / seconds;
    load.kill().expect("stopping the pgbench load");
    load.wait().expect("waiting for the pgbench load to end");
    loaded.sort();
    // A probe not visible within the timeout counts as the timeout: the percentiles
    // are then lower bounds, and say so.
    let bound = if late > 0 { "≥ " } else { "" };
    rows.extend([
        (
            format!("{mode}, 64 writers: commit → visible p50"),
            format!("{bound}{}", ms(percentile(&loaded, 0.50))),
        ),
        (
            format!("{mode}, 64 writers: commit → visible p99 (target ≤ 500 ms)"),
            format!("{bound}{}", ms(percentile(&loaded, 0.99))),
        ),
        (
            format!("{mode}, 64 writers: probes not visible within {PROBE_TIMEOUT:?}"),
            format!("{late} of {}", loaded.len()),
        ),
        (
            format!("{mode}, 64 writers: texts embedded per second meanwhile"),
            format!("{synced_per_second:.0}"),
        ),
        // Beside the texts: fewer texts for as many updates means more of them folded
        // (less paid), fewer updates means slower writers.
        (
            format!("{mode}, 64 writers: product updates per second (the writers' rate)"),
            format!("{updates_per_second:.0}"),
        ),
        (
            format!("{mode}, 64 writers: chunks written per second meanwhile"),
            format!("{chunk_writes_per_second:.0}"),
        ),
    ]);
    rows
}

/// Rows updated in the products table and rows inserted or updated in
/// `tenant_knowledge` so far, from the server's statistics (flushed within a second).
async fn table_writes(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'web_knowledge_product'),
                    (SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tenant_knowledge')",
            &[],
        )
        .await
        .expect("table statistics");
    (row.get(0), row.get(1))
}

/// How long a probe is waited for.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the 64 writers write.
const LOAD_SECONDS: u32 = 60;

/// Up to `n` sequential edits of one product (at most ~100/s; none started after
/// `until`), each timed from its commit's return until another connection sees the new
/// chunk; each commit's round trip; and how many were not visible within
/// `PROBE_TIMEOUT` (counted as that long).
async fn probe(
    writer: &tokio_postgres::Client,
    reader: &tokio_postgres::Client,
    n: usize,
    until: Option<Instant>,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let update = writer
        .prepare("UPDATE web_knowledge_product SET description = $1 WHERE id = md5('product-1-headlamp-1')::uuid")
        .await
        .expect("prepare");
    let probe = reader
        .prepare("SELECT 1 FROM tenant_knowledge WHERE source = 'product' AND content LIKE '%' || $1 || '%'")
        .await
        .expect("prepare");
    let mut latencies = Vec::with_capacity(n);
    let mut commits = Vec::with_capacity(n);
    let mut late = 0;
    for _ in 0..n {
        if until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let marker = format!("latency-probe-{}", uuid::Uuid::new_v4().simple());
        let started = Instant::now();
        writer
            .execute(&update, &[&format!("Description {marker}.")])
            .await
            .expect("update");
        let committed = Instant::now();
        commits.push(committed - started);
        let deadline = committed + PROBE_TIMEOUT;
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
            if Instant::now() >= deadline {
                latencies.push(PROBE_TIMEOUT);
                late += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (latencies, commits, late)
}

/// The profile the measured binaries were built with (they sit beside this one).
fn build_profile() -> &'static str {
    let exe = std::env::current_exe().unwrap_or_default();
    if exe.components().any(|c| c.as_os_str() == "release") {
        "Release"
    } else {
        "Debug"
    }
}

/// Add a section to the report and print it at once: a later section that fails does
/// not take the earlier ones' figures with it.
fn section(report: &mut String, text: String) {
    println!("{text}");
    report.push_str(&text);
}

fn table(rows: &[(String, String)]) -> String {
    let mut table = String::from("| measure | value |\n| --- | --- |\n");
    for (name, value) in rows {
        table.push_str(&format!("| {name} | {value} |\n"));
    }
    table
}

const SECTIONS: [&str; 10] = [
    "triggers",
    "latency",
    "backfill",
    "concurrency",
    "coalescing",
    "model",
    "reconcile",
    "search",
    "search-tenants",
    "migrate",
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
        "# kbsync benchmarks\n\nWhat each figure means and how to get it again: every section says what is \
         measured and how, and gives one table of figures with the baseline each is held against (and the \
         peer where one was measured). The history of earlier runs is in git, not here. `just bench \
         SECTION` runs one section and prints its table.\n\nRun {date} with `just bench` on {cores} cores, \
         {mem} kB memory; {version}.\n\n",
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    );
    if run("triggers") {
        let seconds: u32 = std::env::var("KBSYNC_BENCH_PGBENCH_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15);
        section(
            &mut report,
            format!(
                "## Capture cost (the application's writes)\n\nA private cluster with fsync on. pgbench `-M prepared`, \
             random single-row UPDATEs of one text column, {seconds} s per run, four variants alternated, 2 runs \
             each, medians: plain (kbsync's triggers disabled, REPLICA IDENTITY DEFAULT: the baseline), trigger \
             capture, logical capture (`kbsync install` in logical mode: no trigger, REPLICA IDENTITY FULL; a \
             daemon decodes the slot during the run, on the same 2 cores, and what it captured is checked after), \
             and a pgai-shaped reference (the trigger pgai 0.12's vectorizer creates: row-level plpgsql, one \
             INSERT of the key into a queue table indexed on the key, no NOTIFY). \
             With triggers no daemon runs: the writer's own cost (the change-log append, the tenant lookup, the \
             NOTIFY of the one writer that wins the wake-up lock). Then one UPDATE of 100,000 rows in each \
             variant, alternated, medians. Then the application's transactions beside a daemon at debounce \
             0 working on the same keys (largest batch, provider answering in 20 ms), against the same rounds \
             with no daemon. `just bench triggers` reproduces this section.\n\n{}\n",
                table(&trigger_overhead::rows(seconds).await)
            ),
        );
    }
    if run("latency") {
        section(
            &mut report,
            format!(
                "## Sync latency\n\nA private cluster with fsync on. {WRITES} sequential single-row commits (~100/s at \
             most), debounce windows 0, an OpenAI-compatible test server answering at once; latency is from the \
             commit's return to the new chunk being visible on another connection (polled every 1 ms). Then half \
             as many (or as many as fit in the {LOAD_SECONDS} s of load) while 64 pgbench clients edit 10,000 \
             products of another tenant as fast as they can, all of it synced at debounce 0 too. Once with trigger capture, once with logical capture (a fresh cluster \
             each). {} build of kbsync, logging at its shipped level (`info`). The 64-writer rows also give the writers' own update \
             rate and the chunks written meanwhile (from `pg_stat_user_tables`): fewer texts for as many updates means more folded, \
             fewer updates means slower writers.\n\n{}\n",
                build_profile(),
                {
                    let mut rows = latency_rows(false).await;
                    rows.extend(latency_rows(true).await);
                    table(&rows)
                }
            ),
        );
    }
    if run("backfill") {
        section(
            &mut report,
            format!(
                "## Backfill and scale-out\n\n{} build of kbsync, an OpenAI-compatible test server, one tenant's \
             QAPairs queued at once by the triggers (daemons stopped), drained by the daemon(s).\n\n{}\n",
                build_profile(),
                {
                    let mut rows = backfill::index_rows().await;
                    rows.extend(backfill::rows().await);
                    table(&rows)
                }
            ),
        );
    }
    if run("concurrency") {
        section(
            &mut report,
            format!(
                "## Overlapping requests and scale-out\n\n{} build of kbsync, an OpenAI-compatible test server with a \
             set latency per request, the daemon(s) started and listening before one tenant's QAPairs are committed \
             at once; the time until none is pending. Each variant twice, alternating; the mean.\n\n{}\n",
                build_profile(),
                table(&backfill::concurrency_rows().await)
            ),
        );
    }
    if run("coalescing") {
        section(
            &mut report,
            format!(
                "## Coalescing, no-op updates, fairness\n\nCounted by the test server (embedding inputs received).\n\n{}\n",
                table(&coalescing::rows().await)
            ),
        );
    }
    if run("model") {
        let model_rows = tokio::task::spawn_blocking(local_model::rows)
            .await
            .expect("local model bench");
        section(
            &mut report,
            format!(
                "## Local model (all-MiniLM-L6-v2, CPU) against PyTorch\n\nThe same texts in the same batches of 32 \
             the daemon sends; PyTorch is transformers 4.46.3 + torch 2.5.1 on the CPU (`tools/bench-model/pytorch_baseline.py`, \
             masked mean pooling as sentence-transformers), as many threads as cores; 5 rounds each, kbsync's and PyTorch's \
             alternating, after one warm-up batch; the median. The vectors' correctness check is the NumPy reference test \
             (`tests/local_model.rs`); the last row says how far kbsync's vectors are from PyTorch's.\n\n{}\n",
                table(&model_rows)
            ),
        );
    }
    if run("reconcile") {
        section(
            &mut report,
            format!(
                "## Reconcile sweep\n\nOne source (`bench_docs`, bigint key, one chunk per row; 1,000,000 rows unless KBSYNC_BENCH_RECONCILE_ROWS says otherwise) with its \
             chunks loaded in SQL exactly as the daemon writes them (checked by a dry run finding nothing); \
             `kbsync reconcile` run as its own process ({} build, range_size 5000), peak RSS from its VmHWM. \
             A source in sync is settled by the sweep's fingerprint pass (one statement, a parallel scan of each table); \
             a source with drift is then compared key by key. Then 1% drift made with the triggers off and swept for real \
             (keys queued, orphans deleted).\n\n{}\n",
                build_profile(),
                table(&reconcile_sweep::rows().await)
            ),
        );
    }
    if run("search") {
        let mut rows = search_eval::quality_rows().await;
        rows.extend(search_eval::latency_rows().await);
        section(
            &mut report,
            format!(
                "## Retrieval\n\nQuality: the committed evaluation set synced by the daemon with the offline model \
             (all-MiniLM-L6-v2, the shipped config: `text_search` simple), every question asked through \
             `kbsync.search()` with k 10 in each mode; a rank below 10 counts as not found. Beside it, the ranking \
             of the independent NumPy implementation of the same model (`tools/reference/minilm_reference.py`, \
             exact cosine over the tenant's chunks). Latency: 100,000 FAQ-like texts made from the set's sentences \
             for each of two tenants, embedded by the offline model (384 dimensions), with the HNSW index; \
             tenant 1 queried through `kbsync.search()` (one statement a query, on one connection), against an \
             exact scan of the same tenant in the same run. {} build.\n\n{}\n",
                build_profile(),
                table(&rows)
            ),
        );
    }
    if run("search-tenants") {
        section(
            &mut report,
            format!(
                "## Search across many tenants: vector and halfvec\n\n230,089 chunks over 101 tenants (one with \
             100,000, one with 30,000, 99 with 1,011 each; the latency data's texts and the offline model's vectors, \
             384 dimensions), kbsync's HNSW index (m 16, ef_construction 128) built once per type; 200 of the \
             evaluation set's questions through `kbsync.search()` in vector mode (k 10, 100 candidates) for the \
             large tenant, the mid-size one and the small ones in turn, recall@10 against an exact scan of the \
             tenant in the same run; each as `kbsync.search()` is (an exact scan of a tenant of at most 20,000 \
             chunks when the index walk found fewer than the candidates) and with pgvector 0.8's iterative index \
             scans turned on for the session; for `vector`, the same with an index of pgvector's default build \
             (ef_construction 64) as the baseline; then the column converted to \
             `halfvec(384)` and the same measured again. {} build.\n\n{}\n",
                build_profile(),
                table(&search_tenants::rows().await)
            ),
        );
    }
    if run("migrate") {
        section(
            &mut report,
            format!(
                "## Changing the embedding model\n\nOne daemon, the shipped config on two OpenAI-compatible test servers answering at once \
             (`[embedding]` and `[next_embedding]`, 384 dimensions each); QAPairs queued at once and drained (the plain backfill), the \
             HNSW index then built; then `kbsync model start` and the time until every chunk has the new model's vector, \
             the same chunks: a ratio of the two throughputs. An edit every 100 ms, its commit → visible time without a \
             migration and during it. {} build.\n\n{}\n",
                build_profile(),
                table(&migrate::rows().await)
            ),
        );
    }
    if !asked.is_empty() {
        eprintln!("partial run: BENCHMARKS.md not written");
        return;
    }
    let out = kbsync_testkit::repo_root().join("BENCHMARKS.md");
    std::fs::write(&out, &report).expect("writing BENCHMARKS.md");
    eprintln!("written to {}", out.display());
}
