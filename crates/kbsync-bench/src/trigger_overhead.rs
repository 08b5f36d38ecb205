//! What kbsync's capture costs the application's writes (`just bench triggers`).
//!
//! On a private cluster with fsync on (as in production): pgbench `-M prepared`, random
//! single-row UPDATEs of a text column, 1, 4, 16 and 64 clients, the table with its
//! kbsync triggers disabled (the baseline) and enabled, alternated, `RUNS` runs each;
//! on the `faq` source (100,000 QAPairs: tenant through the page, filter on
//! generation_status) and the `product` source (20,000 rows, tenant in the row, no
//! filter). No daemon runs: this is the writer's own cost (the change-log append, the
//! tenant lookup, the wake-up NOTIFY when it wins the wake-up lock). Then one UPDATE
//! of 100,000 QAPairs, with and without, alternated.
//!
//! Then, with a daemon at debounce 0 working on the very keys the application edits:
//! how long the application's transactions take (100 products × 10 rounds in about
//! 2 s, one transaction of 100 single-row UPDATEs per round), against the same rounds
//! with no daemon running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kbsync_testkit::{DaemonProcess, FakeOpenAi, PrivateCluster, run_kbsync, sync_config};
use tokio_postgres::Client;

use crate::bench_db::{connect, drained, load_qapairs};

const QAPAIRS: i64 = 100_000;
const PRODUCTS: i64 = 20_000;
const CLIENTS: [u32; 4] = [1, 4, 16, 64];
const RUNS: usize = 2;

fn pgbench_bin() -> String {
    let out = Command::new(kbsync_testkit::repo_root().join("scripts/pg.sh"))
        .arg("bindir")
        .output()
        .expect("scripts/pg.sh bindir");
    assert!(out.status.success(), "scripts/pg.sh bindir failed");
    format!("{}/pgbench", String::from_utf8_lossy(&out.stdout).trim())
}

fn pgbench_command(url: &str, script: &Path, clients: u32, seconds: u32) -> Command {
    let mut command = Command::new(pgbench_bin());
    command
        .args(["-n", "-M", "prepared", "-f"])
        .arg(script)
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg(url);
    command
}

/// pgbench's TPS for `seconds` with `clients` running `script`.
pub fn pgbench(url: &str, script: &Path, clients: u32, seconds: u32) -> f64 {
    let out = pgbench_command(url, script, clients, seconds)
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

/// pgbench in the background (for load while something else is measured).
pub fn pgbench_background(
    url: &str,
    script: &Path,
    clients: u32,
    seconds: u32,
) -> std::process::Child {
    pgbench_command(url, script, clients, seconds)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting pgbench")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Each statement on its own (VACUUM cannot run inside a multi-statement string).
async fn execute_all(client: &Client, statements: &[&str]) {
    for sql in statements {
        client.batch_execute(sql).await.expect(sql);
    }
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// One table's kbsync triggers on or off, the change log emptied and the table
/// vacuumed, so that every run starts from the same state.
async fn set_triggers(client: &Client, table: &str, on: bool) {
    let toggle = if on {
        format!("ALTER TABLE {table} ENABLE TRIGGER USER")
    } else {
        format!("ALTER TABLE {table} DISABLE TRIGGER USER")
    };
    let vacuum = format!("VACUUM {table}");
    execute_all(
        client,
        &[&toggle, "TRUNCATE kbsync.changes", &vacuum, "CHECKPOINT"],
    )
    .await;
}

/// TPS medians (without, with) per client count for `script` on `table`, variants
/// alternated (the first run starts without, the next with, and so on).
async fn tps_by_clients(
    client: &Client,
    url: &str,
    table: &str,
    script: &Path,
    seconds: u32,
) -> Vec<(u32, f64, f64)> {
    let mut out = Vec::new();
    for clients in CLIENTS {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for run in 0..RUNS * 2 {
            let on = run % 2 == 1;
            set_triggers(client, table, on).await;
            let tps = pgbench(url, script, clients, seconds);
            if on {
                let captured = count(client, "SELECT count(*) FROM kbsync.changes").await;
                assert!(captured > 0, "the triggers captured nothing on {table}");
                with.push(tps);
            } else {
                without.push(tps);
            }
        }
        out.push((clients, median(&mut without), median(&mut with)));
    }
    out
}

fn script(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("pgbench script");
    path
}

pub async fn rows(seconds: u32) -> Vec<(String, String)> {
    let durable = PrivateCluster::start_durable();
    let url = durable.database_url("postgres");
    let config = sync_config("http://127.0.0.1:9/v1", 8, "5s", "2s");
    for args in [&["demo", "schema"][..], &["install"]] {
        run_kbsync(config.path(), args, &[("DATABASE_URL", url.as_str())]).assert_success();
    }
    let client = connect(&url).await;
    load_qapairs(&client, QAPAIRS, "completed").await;
    client
        .execute(
            "INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('bench-product-' || g)::uuid, 1, 'Product ' || g, 'First description of product ' || g
               FROM generate_series(1, $1::bigint) g",
            &[&PRODUCTS],
        )
        .await
        .expect("loading products");
    execute_all(
        &client,
        &[
            "TRUNCATE kbsync.changes, kbsync.outbox",
            "VACUUM ANALYZE web_knowledge_qapair",
            "VACUUM ANALYZE web_knowledge_product",
        ],
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let faq = script(
        dir.path(),
        "faq.sql",
        &format!(
            "\\set n random(1, {QAPAIRS})\nUPDATE web_knowledge_qapair SET answer = 'Edited ' || random() WHERE id = md5('bench-' || :n)::uuid;\n"
        ),
    );
    let product = script(
        dir.path(),
        "product.sql",
        &format!(
            "\\set n random(1, {PRODUCTS})\nUPDATE web_knowledge_product SET description = 'Edited ' || random() WHERE id = md5('bench-product-' || :n)::uuid;\n"
        ),
    );

    let mut rows = Vec::new();
    for (label, table, script) in [
        (
            "faq (QAPair: tenant via the page, filter)",
            "web_knowledge_qapair",
            &faq,
        ),
        ("product (one table)", "web_knowledge_product", &product),
    ] {
        for (clients, without, with) in tps_by_clients(&client, &url, table, script, seconds).await
        {
            rows.push((
                format!("{label}, {clients} clients: TPS triggers off / on, ratio"),
                format!("{without:.0} / {with:.0}, **{:.2}**", with / without),
            ));
        }
    }

    let bulk = "UPDATE web_knowledge_qapair SET answer = answer || '.'";
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for run in 0..RUNS * 2 {
        let on = run % 2 == 1;
        set_triggers(&client, "web_knowledge_qapair", on).await;
        let started = Instant::now();
        client.batch_execute(bulk).await.expect(bulk);
        let took = started.elapsed().as_secs_f64();
        if on {
            let captured = count(&client, "SELECT count(*) FROM kbsync.changes").await;
            assert_eq!(captured, QAPAIRS, "the bulk update was not fully captured");
            with.push(took);
        } else {
            without.push(took);
        }
    }
    let (without, with) = (median(&mut without), median(&mut with));
    rows.push((
        format!("one UPDATE of {QAPAIRS} QAPairs: seconds triggers off / on, ratio"),
        format!("{without:.2} / {with:.2}, **{:.2}**", with / without),
    ));
    rows.extend(app_transactions_beside_the_daemon(&durable).await);
    rows
}

const ROUNDS: usize = 10;
const ROUND_ROWS: i64 = 100;

/// Each round's transaction time and each of its UPDATEs' times.
async fn edit_rounds(client: &mut Client, generation: usize) -> (Vec<Duration>, Vec<Duration>) {
    let update = client
        .prepare(
            "UPDATE web_knowledge_product SET description = $1
              WHERE id = md5('app-product-' || $2::bigint)::uuid",
        )
        .await
        .expect("prepare");
    let (mut transactions, mut statements) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let started = Instant::now();
        let tx = client.transaction().await.expect("begin");
        for n in 1..=ROUND_ROWS {
            let one = Instant::now();
            tx.execute(
                &update,
                &[&format!("Edit {generation}.{round} of product {n}"), &n],
            )
            .await
            .expect("update");
            statements.push(one.elapsed());
        }
        tx.commit().await.expect("commit");
        let took = started.elapsed();
        transactions.push(took);
        // Ten rounds in about two seconds.
        tokio::time::sleep(Duration::from_millis(200).saturating_sub(took)).await;
    }
    (transactions, statements)
}

fn stats(label: &str, mut times: Vec<Duration>) -> (String, String) {
    times.sort();
    let at = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        label.to_owned(),
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            ms(at(0.5)),
            ms(at(0.99)),
            ms(times[times.len() - 1])
        ),
    )
}

/// The application's transactions with a daemon at debounce 0 and its largest batch
/// working on the same keys, beside the same rounds with no daemon.
async fn app_transactions_beside_the_daemon(cluster: &PrivateCluster) -> Vec<(String, String)> {
    let name = format!("app_{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&cluster.database_url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = cluster.database_url(&name);
    let server = FakeOpenAi::start(8).await;
    // The provider takes a little while, as a real one does: batches overlap the edits.
    server.set_latency(Duration::from_millis(20));
    let config = sync_config(&server.base_url(), 8, "0s", "0s")
        .edited(&[("batch_size = 256", "batch_size = 10000")]);
    for args in [&["demo", "schema"][..], &["install"]] {
        run_kbsync(config.path(), args, &[("DATABASE_URL", url.as_str())]).assert_success();
    }
    let mut client = connect(&url).await;
    client
        .execute(
            "WITH u AS (INSERT INTO accounts_user VALUES (1, 'u', 'c', 'd') RETURNING id)
             INSERT INTO web_knowledge_product (id, user_id, name, description)
             SELECT md5('app-product-' || g)::uuid, u.id, 'App product ' || g, 'First' FROM u, generate_series(1, $1::bigint) g",
            &[&ROUND_ROWS],
        )
        .await
        .expect("loading products");

    let (alone_tx, alone_stmt) = edit_rounds(&mut client, 0).await;
    let daemon = DaemonProcess::start(config.path(), &url);
    drained(&client, &[&daemon], Duration::from_secs(120)).await;
    let batches_before = server.request_count();
    let (beside_tx, beside_stmt) = edit_rounds(&mut client, 1).await;
    let batches = server.request_count() - batches_before;
    assert!(batches > 0, "the daemon did no work during the edits");
    drop(daemon);
    vec![
        stats(
            "application transactions (100 UPDATEs), no daemon: p50 / p99 / max",
            alone_tx,
        ),
        stats(
            "application transactions, daemon at debounce 0 on the same keys: p50 / p99 / max",
            beside_tx,
        ),
        stats(
            "the same transactions' single UPDATEs, no daemon: p50 / p99 / max",
            alone_stmt,
        ),
        stats(
            "the same transactions' single UPDATEs, beside the daemon: p50 / p99 / max",
            beside_stmt,
        ),
        (
            "embedding requests the daemon made during those edits".to_owned(),
            batches.to_string(),
        ),
    ]
}
