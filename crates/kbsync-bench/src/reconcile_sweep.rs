//! The reconcile sweep at scale: 1,000,000 source rows with 1,000,000 chunks already
//! in sync (nothing to do), then with 1% drift; wall time and the peak resident
//! memory of the `kbsync reconcile` process. Baseline, same run: one plain read of
//! both tables (a sequential scan of each), i.e. the cost of just looking at the data.
//!
//! The chunks are loaded in SQL, not embedded (no provider is involved in a sweep);
//! a dry run first checks that they count as in sync, so the load is what the daemon
//! would have written. The HNSW index is dropped in this throwaway database: the sweep
//! never uses it, and building it over 1M vectors would dominate the setup.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kbsync_core::config::Config;
use kbsync_core::sync::chunk::fingerprint_for;
use kbsync_reconcile::Report;
use kbsync_testkit::{TempConfig, TestDb, kbsync_bin};
use tokio_postgres::{Client, NoTls};

const DIMS: usize = 8;
const MODEL: &str = "bench-embedding";

fn config_text(dims: usize) -> String {
    format!(
        r#"[embedding]
provider = "openai"
model = "{MODEL}"
dimensions = {dims}
base_url = "http://127.0.0.1:9/v1"

[reconcile]
enabled = false

[sources.doc]
table = "bench_docs"
key = "id"
tenant = {{ column = "tenant_id" }}
text = "{{title}}\n{{body}}"
single_chunk = true
"#
    )
}

/// A finished `kbsync reconcile --json`: its report, wall time and peak RSS.
struct Sweep {
    report: Report,
    wall: Duration,
    peak_rss_kib: u64,
}

/// Run the sweep as its own process, sampling its peak RSS (VmHWM, a high-water mark
/// the kernel keeps, so sampling only has to catch it before exit).
fn sweep(config: &Path, url: &str, args: &[&str]) -> Sweep {
    let started = Instant::now();
    let mut child = Command::new(kbsync_bin())
        .arg("--config")
        .arg(config)
        .arg("reconcile")
        .arg("--json")
        .args(args)
        .env("DATABASE_URL", url)
        .env("OPENAI_API_KEY", "unused")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kbsync reconcile");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while child.try_wait().expect("waiting for the sweep").is_none() {
        if let Some(hwm) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        }) {
            peak = peak.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("the sweep's output");
    let wall = started.elapsed();
    assert!(
        out.status.success(),
        "the sweep failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&out.stdout).expect("the sweep's JSON report");
    Sweep {
        report,
        wall,
        peak_rss_kib: peak,
    }
}

async fn execute(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

pub async fn rows() -> Vec<(String, String)> {
    let n: i64 = std::env::var("KBSYNC_BENCH_RECONCILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let drift = n / 100 / 4;
    let config = TempConfig::new(&config_text(DIMS));
    let parsed = Config::load(config.path()).expect("bench config");
    let source = parsed.sources()[0].clone();
    let fingerprint = fingerprint_for(&source, &parsed);

    let db = TestDb::create().await;
    let (client, conn) = tokio_postgres::connect(db.url(), NoTls)
        .await
        .expect("bench connection");
    tokio::spawn(conn);
    execute(
        &client,
        "CREATE TABLE bench_docs (id bigint PRIMARY KEY, tenant_id integer NOT NULL, title text NOT NULL, body text NOT NULL)",
    )
    .await;
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let load = Instant::now();
    execute(
        &client,
        "DROP INDEX tenant_knowledge_embedding_hnsw;
         ALTER TABLE bench_docs DISABLE TRIGGER USER;",
    )
    .await;
    client
        .execute(
            "INSERT INTO bench_docs
             SELECT g, g % 100, 'Document ' || g,
                    'Body of document ' || g || ': shipping, returns and warranty terms for order ' || (g * 7919 % 100003) || '.'
               FROM generate_series(1, $1::bigint) g",
            &[&n],
        )
        .await
        .expect("loading source rows");
    let vector = format!("[{}]", ["0.1"; DIMS].join(","));
    client
        .execute(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash,
                                           embedding, embedding_model, metadata, source_text_hash, chunking, chunk_count,
                                           source_text_hash64, content_hash64)
             SELECT tenant_id::text, 'doc', id::text, 0, text, h, $1::text::vector, $2, '{}', h, $3, 1, h64, h64
               FROM (SELECT id, tenant_id, title || E'\\n' || body AS text,
                            sha256(convert_to(title || E'\\n' || body, 'UTF8')) AS h,
                            hashtextextended((title || E'\\n' || body) COLLATE \"C\", 0) AS h64
                       FROM bench_docs) d",
            &[&vector, &MODEL, &fingerprint],
        )
        .await
        .expect("loading chunks");
    // One statement each: a multi-statement string is one implicit transaction.
    execute(&client, "VACUUM ANALYZE bench_docs").await;
    execute(&client, "VACUUM ANALYZE tenant_knowledge").await;
    let load = load.elapsed();

    // The load must be what the daemon would have written: a dry run finds nothing.
    let check = sweep(config.path(), db.url(), &["--dry-run"]);
    assert!(
        !check.report.found_drift(),
        "the synthetic chunks are not in sync: {:?}",
        check.report
    );

    // Baseline and in-sync sweep alternated, three of each, medians reported: one
    // pair of sub-second timings is too noisy to hold a ratio.
    let mut baselines = Vec::new();
    let mut in_syncs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        execute(
            &client,
            "SELECT count(*), sum(length(title) + length(body)) FROM bench_docs;
             SELECT count(*), sum(length(content)) FROM tenant_knowledge;",
        )
        .await;
        baselines.push(started.elapsed());
        let in_sync = sweep(config.path(), db.url(), &[]);
        assert!(!in_sync.report.found_drift());
        assert!(
            in_sync.report.sources[0].in_sync_by_fingerprint,
            "the in-sync source did not match its fingerprint"
        );
        in_syncs.push(in_sync);
    }
    let baseline = median(baselines.clone());
    let in_sync_wall = median(in_syncs.iter().map(|s| s.wall).collect());
    let in_sync_rss = in_syncs.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0);

    // 1% drift behind kbsync's back, a quarter of each kind.
    client
        .execute(
            "UPDATE bench_docs SET body = body || ' (edited)' WHERE id % 400 = 1",
            &[],
        )
        .await
        .expect("text drift");
    client
        .execute(
            "DELETE FROM tenant_knowledge WHERE source = 'doc' AND source_key::bigint % 400 = 2",
            &[],
        )
        .await
        .expect("missing drift");
    client
        .execute(
            "UPDATE tenant_knowledge SET embedding = NULL WHERE source = 'doc' AND source_key::bigint % 400 = 3",
            &[],
        )
        .await
        .expect("embedding drift");
    client
        .execute("DELETE FROM bench_docs WHERE id % 400 = 4", &[])
        .await
        .expect("orphan drift");
    let drifted = sweep(config.path(), db.url(), &[]);
    let doc = &drifted.report.sources[0];
    assert_eq!(
        (
            doc.stale.text,
            doc.missing,
            doc.missing_embeddings,
            doc.orphan_chunks,
            doc.deleted_chunks
        ),
        (
            drift as u64,
            drift as u64,
            drift as u64,
            drift as u64,
            drift as u64
        ),
        "{doc:?}"
    );
    let queued: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await
        .expect("outbox")
        .get(0);
    assert_eq!(queued, 3 * drift);

    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    let ratio = |d: Duration| format!("{:.1}x", d.as_secs_f64() / baseline.as_secs_f64());
    let mib = |kib: u64| format!("{:.0} MiB", kib as f64 / 1024.0);
    vec![
        (
            format!("setup: {n} rows + {n} chunks loaded in SQL"),
            secs(load),
        ),
        (
            "baseline: one sequential read of both tables (median of 3)".into(),
            secs(baseline),
        ),
        (
            "sweep, in sync (nothing to do; median of 3)".into(),
            secs(in_sync_wall),
        ),
        ("  ratio to the baseline read".into(), ratio(in_sync_wall)),
        (
            "  the 3 runs: sweep / baseline".into(),
            in_syncs
                .iter()
                .zip(&baselines)
                .map(|(s, b)| format!("{:.2} / {:.2} s", s.wall.as_secs_f64(), b.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("  peak RSS of the kbsync process".into(), mib(in_sync_rss)),
        (
            format!(
                "sweep, 1% drift ({drift} each: text changed, chunks missing, embedding NULL, row deleted)"
            ),
            secs(drifted.wall),
        ),
        ("  ratio to the baseline read".into(), ratio(drifted.wall)),
        (
            "  peak RSS of the kbsync process".into(),
            mib(drifted.peak_rss_kib),
        ),
        (
            "  keys queued / orphaned chunks deleted".into(),
            format!("{} / {}", 3 * drift, doc.deleted_chunks),
        ),
    ]
}

fn median(runs: Vec<Duration>) -> Duration {
    let mut seconds: Vec<f64> = runs.iter().map(Duration::as_secs_f64).collect();
    Duration::from_secs_f64(crate::statistics::median(&mut seconds))
}
