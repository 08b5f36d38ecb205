//! What kbsync's capture costs the application's writes (`just bench triggers`).
//!
//! On a private cluster with fsync on (as in production) and wal_level = logical:
//! pgbench `-M prepared`, random single-row UPDATEs of a text column, 1, 4, 16 and 64
//! clients, four variants alternated, `RUNS` runs each: plain (kbsync's triggers
//! disabled, REPLICA IDENTITY DEFAULT: the baseline), trigger capture, logical
//! capture (installed by `kbsync install` in logical mode: no trigger, REPLICA
//! IDENTITY FULL, a daemon decoding the slot throughout the run, on the same 2 cores),
//! and, as the reference the issue compares against, a pgai-shaped capture (the
//! trigger pgai 0.12's vectorizer creates: row-level, one INSERT of the key into a
//! queue table with an index on the key, no NOTIFY; nothing consumes the queue);
//! on the `faq` source (100,000 QAPairs: tenant through the page, filter on
//! generation_status) and the `product` source (20,000 rows, tenant in the row, no
//! filter). In trigger mode no daemon runs: the cost measured is the writer's own
//! (the change-log append, the tenant lookup, the wake-up NOTIFY when it wins the
//! wake-up lock). Then one UPDATE of 100,000 QAPairs in each variant, alternated.
//!
//! Then, with a daemon at debounce 0 working on the very keys the application edits:
//! how long the application's transactions take (100 products × 10 rounds in about
//! 2 s, one transaction of 100 single-row UPDATEs per round), against the same rounds
//! with no daemon running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kbsync_testkit::demo_state::{decoded, outbox_len};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, LOGICAL_CAPTURE, PrivateCluster, TempConfig, run_kbsync,
    sync_config, sync_config_with_max_wait,
};
use tokio_postgres::Client;

use crate::bench_db::{connect, drained, load_qapairs};
use crate::statistics::median;

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

/// Each statement on its own (VACUUM cannot run inside a multi-statement string).
async fn execute_all(client: &Client, statements: &[&str]) {
    for sql in statements {
        client.batch_execute(sql).await.expect(sql);
    }
}

/// What captures the application's writes during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Plain,
    Triggers,
    Logical,
    PgaiShaped,
}

const VARIANTS: [Capture; 4] = [
    Capture::Plain,
    Capture::Triggers,
    Capture::Logical,
    Capture::PgaiShaped,
];

/// The reference capture, shaped like the trigger pgai 0.12's vectorizer puts on a
/// source table (`ai._vectorizer_create_source_trigger`): a row-level plpgsql trigger
/// that inserts the key into a queue table indexed on the key. Created disabled.
fn pgai_shaped_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS bench_pgai_queue (id uuid NOT NULL, queued_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX IF NOT EXISTS bench_pgai_queue_id ON bench_pgai_queue (id);
         CREATE OR REPLACE FUNCTION bench_pgai_enqueue() RETURNS trigger
         LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
         BEGIN
             IF TG_OP = 'DELETE' THEN
                 INSERT INTO public.bench_pgai_queue (id) VALUES (OLD.id);
             ELSE
                 INSERT INTO public.bench_pgai_queue (id) VALUES (NEW.id);
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER bench_pgai AFTER INSERT OR UPDATE OR DELETE ON {table}
             FOR EACH ROW EXECUTE FUNCTION bench_pgai_enqueue();
         ALTER TABLE {table} DISABLE TRIGGER bench_pgai;"
    )
}

/// The configs the bench installs and runs with: windows so long that a daemon only
/// captures (nothing is embedded), trigger or logical capture.
struct Configs {
    triggers: TempConfig,
    logical: TempConfig,
}

impl Configs {
    fn new() -> Self {
        let triggers = sync_config_with_max_wait("http://127.0.0.1:9/v1", 8, "1h", "1h", "2h");
        let logical = triggers.edited(&[LOGICAL_CAPTURE]);
        Self { triggers, logical }
    }
}

/// Set up `capture` for `table` (by `kbsync install`, as a user switches), from an
/// empty change log and outbox and a vacuumed table; in logical mode also start the
/// daemon that decodes the slot.
async fn set_capture(
    client: &Client,
    url: &str,
    configs: &Configs,
    table: &str,
    capture: Capture,
) -> Option<DaemonProcess> {
    let config = match capture {
        Capture::Logical => &configs.logical,
        _ => &configs.triggers,
    };
    run_kbsync(config.path(), &["install"], &[("DATABASE_URL", url)]).assert_success();
    let mut statements = vec![
        "TRUNCATE kbsync.changes, kbsync.outbox, bench_pgai_queue".to_owned(),
        format!("VACUUM {table}"),
        "CHECKPOINT".to_owned(),
    ];
    match capture {
        Capture::Plain => statements.insert(0, format!("ALTER TABLE {table} DISABLE TRIGGER USER")),
        Capture::Triggers => {
            statements.insert(0, format!("ALTER TABLE {table} DISABLE TRIGGER bench_pgai"));
            statements.insert(0, format!("ALTER TABLE {table} ENABLE TRIGGER USER"));
        }
        Capture::PgaiShaped => {
            statements.insert(0, format!("ALTER TABLE {table} ENABLE TRIGGER bench_pgai"));
            statements.insert(0, format!("ALTER TABLE {table} DISABLE TRIGGER USER"));
        }
        Capture::Logical => {
            statements.insert(0, format!("ALTER TABLE {table} DISABLE TRIGGER bench_pgai"))
        }
    }
    if capture != Capture::Logical {
        // A logical install set FULL; the baseline and trigger capture log no old row.
        statements.insert(0, format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT"));
    }
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    execute_all(client, &refs).await;
    if capture != Capture::Logical {
        return None;
    }
    let daemon = DaemonProcess::start_as_shipped(config.path(), url);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !daemon.log().contains("decoding changes") {
        assert!(
            Instant::now() < deadline,
            "the daemon did not start decoding:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(daemon)
}

/// After a run: what was captured (in logical mode once the daemon has decoded it
/// all; the pgai-shaped capture's distinct queued keys); the daemon stops.
async fn captured(client: &Client, capture: Capture, daemon: Option<DaemonProcess>) -> i64 {
    if let Some(mut daemon) = daemon {
        decoded(client, Duration::from_secs(300)).await;
        daemon.terminate(Duration::from_secs(30)).await;
    }
    if capture == Capture::PgaiShaped {
        return client
            .query_one("SELECT count(DISTINCT id) FROM bench_pgai_queue", &[])
            .await
            .expect("counting the queue")
            .get(0);
    }
    outbox_len(client).await
}

/// TPS medians per variant (plain, triggers, logical, pgai-shaped) per client count for `script`
/// on `table`, variants alternated.
async fn tps_by_clients(
    client: &Client,
    url: &str,
    configs: &Configs,
    table: &str,
    script: &Path,
    seconds: u32,
) -> Vec<(u32, [f64; 4])> {
    let mut out = Vec::new();
    for clients in CLIENTS {
        let mut tps: [Vec<f64>; 4] = Default::default();
        for _ in 0..RUNS {
            for (i, capture) in VARIANTS.into_iter().enumerate() {
                let daemon = set_capture(client, url, configs, table, capture).await;
                tps[i].push(pgbench(url, script, clients, seconds));
                let n = captured(client, capture, daemon).await;
                match capture {
                    Capture::Plain => assert_eq!(n, 0, "captured with capture off on {table}"),
                    _ => assert!(n > 0, "{capture:?} captured nothing on {table}"),
                }
            }
        }
        out.push((clients, tps.map(|mut v| median(&mut v))));
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
    let configs = Configs::new();
    for args in [&["demo", "schema"][..], &["install"]] {
        run_kbsync(
            configs.triggers.path(),
            args,
            &[("DATABASE_URL", url.as_str())],
        )
        .assert_success();
    }
    let client = connect(&url).await;
    for table in ["web_knowledge_qapair", "web_knowledge_product"] {
        client
            .batch_execute(&pgai_shaped_sql(table))
            .await
            .expect("the pgai-shaped reference trigger");
    }
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
        for (clients, [plain, triggers, logical, pgai]) in
            tps_by_clients(&client, &url, &configs, table, script, seconds).await
        {
            rows.push((
                format!("{label}, {clients} clients: TPS plain / triggers / logical / pgai-shaped; ratios triggers, logical, pgai-shaped"),
                format!(
                    "{plain:.0} / {triggers:.0} / {logical:.0} / {pgai:.0}; **{:.2}**, **{:.2}**, {:.2}",
                    triggers / plain,
                    logical / plain,
                    pgai / plain
                ),
            ));
        }
    }

    let bulk = "UPDATE web_knowledge_qapair SET answer = answer || '.'";
    let mut took: [Vec<f64>; 4] = Default::default();
    for _ in 0..RUNS {
        for (i, capture) in VARIANTS.into_iter().enumerate() {
            let daemon =
                set_capture(&client, &url, &configs, "web_knowledge_qapair", capture).await;
            let started = Instant::now();
            client.batch_execute(bulk).await.expect(bulk);
            took[i].push(started.elapsed().as_secs_f64());
            let n = captured(&client, capture, daemon).await;
            let want = if capture == Capture::Plain {
                0
            } else {
                QAPAIRS
            };
            assert_eq!(n, want, "the bulk update's capture ({capture:?})");
        }
    }
    let [plain, triggers, logical, pgai] = took.map(|mut v| median(&mut v));
    rows.push((
        format!("one UPDATE of {QAPAIRS} QAPairs: seconds plain / triggers / logical / pgai-shaped; ratios triggers, logical, pgai-shaped"),
        format!(
            "{plain:.2} / {triggers:.2} / {logical:.2} / {pgai:.2}; **{:.2}**, **{:.2}**, {:.2}",
            triggers / plain,
            logical / plain,
            pgai / plain
        ),
    ));
    rows.extend(related_table_rows(&client, &url, &dir, seconds).await);
    // The rest runs with trigger capture.
    set_capture(
        &client,
        &url,
        &configs,
        "web_knowledge_qapair",
        Capture::Triggers,
    )
    .await;
    rows.extend(app_transactions_beside_the_daemon(&durable).await);
    rows
}

const VIA_PAGES: i64 = 5_000;
const VIA_CLIENTS: [u32; 3] = [1, 16, 64];
const MOVED_PAGES: i64 = 1_000;

/// The related table: what moving pages between tenants costs the writer when the
/// FAQs take their tenant through the page (the page's own capture, and the trigger
/// that queues the FAQs of every moved page), beside the same statements with
/// kbsync's triggers on the page table disabled. 5,000 pages with 2 QAPairs each.
async fn related_table_rows(
    client: &Client,
    url: &str,
    dir: &tempfile::TempDir,
    seconds: u32,
) -> Vec<(String, String)> {
    client
        .execute(
            "INSERT INTO accounts_user VALUES (2, 'u2', 'c', 'd'), (3, 'u3', 'c', 'd') ON CONFLICT DO NOTHING;",
            &[],
        )
        .await
        .expect("tenants");
    client
        .batch_execute(&format!(
            "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
             SELECT md5('bench-via-page-' || g)::uuid, 1 + g % 3, 'https://via.example/' || g, 'Page ' || g, 'Content', 'completed'
               FROM generate_series(1, {VIA_PAGES}) g;
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
             SELECT md5('bench-via-qa-' || g || '-' || j)::uuid, md5('bench-via-page-' || g)::uuid, 'Q', 'A', 'completed'
               FROM generate_series(1, {VIA_PAGES}) g, generate_series(1, 2) j;"
        ))
        .await
        .expect("loading pages");
    execute_all(
        client,
        &[
            "VACUUM ANALYZE web_knowledge_websitepage",
            "VACUUM ANALYZE web_knowledge_qapair",
        ],
    )
    .await;
    let page_move = script(
        dir.path(),
        "page_move.sql",
        &format!(
            "\\set n random(1, {VIA_PAGES})\n\\set u random(1, 3)\nUPDATE web_knowledge_websitepage SET user_id = :u WHERE id = md5('bench-via-page-' || :n)::uuid;\n"
        ),
    );
    let table = "web_knowledge_websitepage";
    // Kbsync's triggers on the page table on or off, from an empty change log.
    let switch = |on: bool| async move {
        execute_all(
            client,
            &[
                &format!(
                    "ALTER TABLE {table} {} TRIGGER USER",
                    if on { "ENABLE" } else { "DISABLE" }
                ),
                "TRUNCATE kbsync.changes, kbsync.outbox",
                &format!("VACUUM {table}"),
                "CHECKPOINT",
            ],
        )
        .await
    };
    let queued = || async {
        client
            .query_one("SELECT count(*) FROM kbsync.changes", &[])
            .await
            .expect("counting changes")
            .get::<_, i64>(0)
    };
    let mut rows = Vec::new();
    for clients in VIA_CLIENTS {
        let mut tps: [Vec<f64>; 2] = Default::default();
        for _ in 0..RUNS {
            for (i, on) in [false, true].into_iter().enumerate() {
                switch(on).await;
                tps[i].push(pgbench(url, &page_move, clients, seconds));
                let n = queued().await;
                assert_eq!(
                    n > 0,
                    on,
                    "page moves captured {n} changes (triggers on: {on})"
                );
            }
        }
        let [plain, triggers] = tps.map(|mut v| median(&mut v));
        rows.push((
            format!("page moved to another tenant (its FAQs re-queued), {clients} clients: TPS plain / triggers; ratio"),
            format!("{plain:.0} / {triggers:.0}; **{:.2}**", triggers / plain),
        ));
    }
    let bulk = format!(
        "UPDATE web_knowledge_websitepage SET user_id = 1 + user_id % 3
          WHERE id IN (SELECT md5('bench-via-page-' || g)::uuid FROM generate_series(1, {MOVED_PAGES}) g)"
    );
    let mut took: [Vec<f64>; 2] = Default::default();
    for _ in 0..RUNS {
        for (i, on) in [false, true].into_iter().enumerate() {
            switch(on).await;
            let started = Instant::now();
            client.batch_execute(&bulk).await.expect("the page move");
            took[i].push(started.elapsed().as_secs_f64() * 1000.0);
            let want = if on { 3 * MOVED_PAGES } else { 0 };
            assert_eq!(
                queued().await,
                want,
                "the 1,000-page move's capture (triggers on: {on})"
            );
        }
    }
    let [plain, triggers] = took.map(|mut v| median(&mut v));
    rows.push((
        format!(
            "one UPDATE moving {MOVED_PAGES} pages (and their {} FAQs): ms plain / triggers; ratio",
            2 * MOVED_PAGES
        ),
        format!("{plain:.1} / {triggers:.1}; **{:.2}**", triggers / plain),
    ));
    switch(true).await;
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
    let daemon = DaemonProcess::start_as_shipped(config.path(), &url);
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
