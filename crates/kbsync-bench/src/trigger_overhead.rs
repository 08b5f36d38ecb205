//! What kbsync's capture triggers cost the application's writes: pgbench, 2 clients,
//! random single-row UPDATEs of QAPair answers, TPS with the triggers vs the same
//! table with them disabled; and one UPDATE of 100,000 rows with vs without. No
//! daemon runs meanwhile: this is the writer's own cost (the outbox upsert, the
//! tenant lookup through the page, the NOTIFY).

use std::process::Command;
use std::time::{Duration, Instant};

use kbsync_testkit::{PrivateCluster, TestDb, run_kbsync, sync_config};
use tokio_postgres::Client;

use crate::bench_db::{connect, load_qapairs};

const ROWS: i64 = 100_000;

fn pgbench_bin() -> String {
    let out = Command::new(kbsync_testkit::repo_root().join("scripts/pg.sh"))
        .arg("bindir")
        .output()
        .expect("scripts/pg.sh bindir");
    assert!(out.status.success(), "scripts/pg.sh bindir failed");
    format!("{}/pgbench", String::from_utf8_lossy(&out.stdout).trim())
}

/// pgbench's TPS for `seconds` with `clients` running `script`.
fn pgbench(url: &str, script: &std::path::Path, clients: u32, seconds: u32) -> f64 {
    let out = Command::new(pgbench_bin())
        .args(["-n", "-f"])
        .arg(script)
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg(url)
        .output()
        .expect("running pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{text}"))
}

async fn timed(client: &Client, sql: &str) -> Duration {
    let started = Instant::now();
    client.batch_execute(sql).await.expect(sql);
    started.elapsed()
}

/// On the shared test server (fsync off: commits cost nothing, the worst case for the
/// triggers' relative cost) and on a private cluster with fsync on (as in production).
pub async fn rows(seconds: u32) -> Vec<(String, String)> {
    let db = TestDb::create().await;
    let mut rows = measure(db.url(), seconds, "fsync off").await;
    let durable = PrivateCluster::start_durable();
    rows.extend(measure(&durable.database_url("postgres"), seconds, "fsync on").await);
    rows
}

async fn measure(url: &str, seconds: u32, server: &str) -> Vec<(String, String)> {
    let config = sync_config("http://127.0.0.1:9/v1", 8, "5s", "2s");
    for args in [&["demo", "schema"][..], &["install"]] {
        run_kbsync(config.path(), args, &[("DATABASE_URL", url)]).assert_success();
    }
    let client = connect(url).await;
    load_qapairs(&client, ROWS, "completed").await;
    client
        .batch_execute("TRUNCATE kbsync.outbox")
        .await
        .expect("empty outbox");
    execute_all(&client, &["VACUUM ANALYZE web_knowledge_qapair"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("update.sql");
    std::fs::write(
        &script,
        format!(
            "\\set n random(1, {ROWS})\nUPDATE web_knowledge_qapair SET answer = 'Edited ' || random() WHERE id = md5('bench-' || :n)::uuid;\n"
        ),
    )
    .expect("pgbench script");

    let disable = "ALTER TABLE web_knowledge_qapair DISABLE TRIGGER USER";
    let enable = "ALTER TABLE web_knowledge_qapair ENABLE TRIGGER USER";
    execute_all(&client, &[disable]).await;
    let tps_without = pgbench(url, &script, 2, seconds);
    execute_all(&client, &[enable, "VACUUM web_knowledge_qapair"]).await;
    let tps_with = pgbench(url, &script, 2, seconds);
    let queued: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await
        .expect("outbox")
        .get(0);
    assert!(queued > 0, "the triggers queued nothing");

    execute_all(
        &client,
        &[
            "TRUNCATE kbsync.outbox",
            "VACUUM web_knowledge_qapair",
            disable,
        ],
    )
    .await;
    let bulk = "UPDATE web_knowledge_qapair SET answer = answer || '.'";
    let bulk_without = timed(&client, bulk).await;
    execute_all(&client, &[enable, "VACUUM web_knowledge_qapair"]).await;
    let bulk_with = timed(&client, bulk).await;
    let bulk_queued: i64 = client
        .query_one("SELECT count(*) FROM kbsync.outbox", &[])
        .await
        .expect("outbox")
        .get(0);
    assert_eq!(bulk_queued, ROWS, "the bulk update was not fully captured");

    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    vec![
        (
            format!(
                "[{server}] pgbench TPS, 2 clients, {seconds} s, random single-row UPDATEs, triggers off (baseline)"
            ),
            format!("{tps_without:.0}"),
        ),
        (
            format!("[{server}] pgbench TPS, same, with kbsync's triggers"),
            format!("{tps_with:.0}"),
        ),
        (
            format!("[{server}]   TPS ratio with / without (target ≥ 0.90)"),
            format!("{:.2}", tps_with / tps_without),
        ),
        (
            format!("[{server}] one UPDATE of {ROWS} rows, triggers off (baseline)"),
            secs(bulk_without),
        ),
        (
            format!("[{server}] one UPDATE of the same rows, with kbsync's triggers"),
            secs(bulk_with),
        ),
        (
            format!("[{server}]   time ratio with / without (target ≤ 1.5)"),
            format!(
                "{:.2}",
                bulk_with.as_secs_f64() / bulk_without.as_secs_f64()
            ),
        ),
    ]
}

/// Each statement on its own (VACUUM cannot run inside a multi-statement string).
async fn execute_all(client: &Client, statements: &[&str]) {
    for sql in statements {
        client.batch_execute(sql).await.expect(sql);
    }
}
