//! A model migration (`kbsync model start` … the other column filled) beside a plain
//! backfill of the same chunks, in the same run; and an application's edit, commit →
//! visible, with no migration and during one (visible: the chunk has the edit's text,
//! and during the migration both models' vectors of it).
//!
//! Both providers are OpenAI-compatible test servers answering at once, so what is
//! measured is kbsync and PostgreSQL: the fill rewrites each chunk's row, and the
//! active HNSW index gets each row's vector again.

use std::time::{Duration, Instant};

use kbsync_testkit::{DaemonProcess, FakeOpenAi, TempConfig, sync_config};
use tokio_postgres::Client;

use crate::bench_db::{demo_db, drained, load_qapairs};

/// The offline model's dimension: the HNSW index's cost is the realistic one.
const DIMS: usize = 384;
const ROWS: i64 = 20_000;
const EDITS: usize = 40;

/// One edit every 100 ms; each one's time from the commit until `visible` holds.
async fn edit_latencies(client: &Client, visible: &str, round: usize) -> Vec<Duration> {
    let mut took = Vec::with_capacity(EDITS);
    for i in 0..EDITS {
        let key = (i * 37 % ROWS as usize + 1) as i64;
        let answer = format!("Edited in round {round}, edit {i}.");
        client
            .execute(
                "UPDATE web_knowledge_qapair SET answer = $2 WHERE id = md5('bench-' || $1::bigint)::uuid",
                &[&key, &answer],
            )
            .await
            .expect("an edit");
        let started = Instant::now();
        loop {
            let seen: bool = client
                .query_one(visible, &[&answer])
                .await
                .expect("looking for the edit")
                .get(0);
            if seen {
                took.push(started.elapsed());
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "an edit was not visible within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    took.sort();
    took
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p).div_ceil(100).saturating_sub(1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub async fn rows() -> Vec<(String, String)> {
    let active = FakeOpenAi::start(DIMS).await;
    let next = FakeOpenAi::start(DIMS).await;
    let base = sync_config(&active.base_url(), DIMS, "0s", "0s");
    let text = std::fs::read_to_string(base.path()).expect("the bench config");
    let config = TempConfig::new(&format!(
        "{text}
[next_embedding]
provider = \"openai\"
model = \"bench-next-model\"
dimensions = {DIMS}
base_url = \"{}\"
max_inputs_per_request = 64
max_concurrency = 2
",
        next.base_url()
    ));
    let (db, client) = demo_db(&config).await;
    let daemon = DaemonProcess::start_as_shipped(config.path(), db.url());
    daemon
        .wait_until_listening(1, Duration::from_secs(30))
        .await;

    // The plain backfill: every row queued at once, drained.
    let started = Instant::now();
    load_qapairs(&client, ROWS, "pending").await;
    drained(&client, &[&daemon], Duration::from_secs(600)).await;
    let backfill = started.elapsed();
    // The index the deferred backfill builds afterwards: the fill runs with it.
    let index_valid = Instant::now();
    while kbsync_core::search::index::state(&client)
        .await
        .expect("the index state")
        != kbsync_core::search::index::IndexState::Valid
    {
        assert!(
            index_valid.elapsed() < Duration::from_secs(600),
            "no valid index"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let plain = edit_latencies(
        &client,
        "SELECT EXISTS (SELECT 1 FROM tenant_knowledge WHERE content LIKE '%' || $1)",
        0,
    )
    .await;

    db.kbsync_with_config(config.path(), &["model", "start"])
        .assert_success();
    let started = Instant::now();
    let during = edit_latencies(
        &client,
        "SELECT EXISTS (SELECT 1 FROM tenant_knowledge
                         WHERE content LIKE '%' || $1 AND embedding_next IS NOT NULL)",
        1,
    )
    .await;
    loop {
        let missing: i64 = client
            .query_one(
                "SELECT count(*) FROM tenant_knowledge WHERE embedding_next IS NULL",
                &[],
            )
            .await
            .expect("counting what is left")
            .get(0);
        if missing == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "the migration did not finish in 20 minutes:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let migration = started.elapsed();
    let rate = |d: Duration| ROWS as f64 / d.as_secs_f64();
    vec![
        (
            format!("{ROWS} QAPairs at {DIMS} dimensions, zero-latency providers: plain backfill (queued at once, until every chunk is written): rows/s"),
            format!("{:.0} ({:.1} s)", rate(backfill), backfill.as_secs_f64()),
        ),
        (
            "  model migration of the same chunks (`kbsync model start` until every chunk has the new model's vector, the active HNSW index in place, 40 live edits meanwhile): rows/s".into(),
            format!("{:.0} ({:.1} s)", rate(migration), migration.as_secs_f64()),
        ),
        (
            "  ratio migration / backfill throughput".into(),
            format!("**{:.2}**", backfill.as_secs_f64() / migration.as_secs_f64()),
        ),
        (
            format!("  an edit, commit → visible, one every 100 ms, no migration: p50 / p99 of {EDITS}"),
            format!("{} / {}", ms(percentile(&plain, 50)), ms(percentile(&plain, 99))),
        ),
        (
            format!("  the same during the migration (visible with both models' vectors): p50 / p99 of {EDITS}"),
            format!("{} / {}", ms(percentile(&during, 50)), ms(percentile(&during, 99))),
        ),
    ]
}
