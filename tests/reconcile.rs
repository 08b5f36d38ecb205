//! The reconciliation sweep end to end: drift is made directly in SQL behind
//! kbsync's back (triggers disabled, chunks deleted or altered, config changed), one
//! `kbsync reconcile` plus the daemon repairs it, and a second sweep finds nothing.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_reconcile::Report;
use kbsync_testkit::demo_state::{converged, converged_with_model, outbox_len};
use kbsync_testkit::{
    CommandOutput, DaemonProcess, FakeOpenAi, Installed, TempConfig, TestDb, wait_for,
};
use tokio_postgres::Client;

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    db: TestDb,
    client: Client,
    server: FakeOpenAi,
    config: TempConfig,
}

/// Demo tables and rows, kbsync installed, and the knowledge table converged by a
/// daemon that is then stopped (each test starts its own when it needs one).
async fn synced() -> Setup {
    synced_at(DIMS).await
}

/// `synced`, with a model of `dims` dimensions.
async fn synced_at(dims: usize) -> Setup {
    let Installed {
        db,
        client,
        server,
        config,
    } = Installed::new(dims, "100ms", "100ms").await;
    let s = Setup {
        db,
        client,
        server,
        config,
    };
    let mut daemon = s.daemon(&s.config);
    s.db.kbsync_with_config(s.config.path(), &["demo", "data"])
        .assert_success();
    converged(&s.client, &daemon).await;
    daemon.terminate(WAIT).await;
    s
}

impl Setup {
    fn daemon(&self, config: &TempConfig) -> DaemonProcess {
        DaemonProcess::start(config.path(), self.db.url())
    }

    fn reconcile(&self, args: &[&str]) -> CommandOutput {
        self.reconcile_with(&self.config, args)
    }

    fn reconcile_with(&self, config: &TempConfig, args: &[&str]) -> CommandOutput {
        let mut all = vec!["reconcile"];
        all.extend_from_slice(args);
        self.db.kbsync_with_config(config.path(), &all)
    }

    /// `kbsync reconcile --json ARGS`, which must succeed, as a report.
    fn sweep(&self, config: &TempConfig, args: &[&str]) -> Report {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.reconcile_with(config, &all);
        out.assert_success();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("reconcile --json printed no report ({e}):\n{}", out.stdout))
    }

    async fn count(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Run `sql` with kbsync's capture triggers off on the demo tables: the change
    /// reaches no outbox, as if made by a restore or a trigger-less replica.
    async fn behind_kbsyncs_back(&self, sql: &str) {
        const TABLES: [&str; 4] = [
            "web_knowledge_qapair",
            "web_knowledge_product",
            "web_knowledge_websitepage",
            "ai_model_aiprompts",
        ];
        for t in TABLES {
            self.client
                .batch_execute(&format!("ALTER TABLE {t} DISABLE TRIGGER USER"))
                .await
                .unwrap();
        }
        self.client.batch_execute(sql).await.unwrap();
        for t in TABLES {
            self.client
                .batch_execute(&format!("ALTER TABLE {t} ENABLE TRIGGER USER"))
                .await
                .unwrap();
        }
        assert_eq!(
            outbox_len(&self.client).await,
            0,
            "a change behind kbsync's back reached the outbox"
        );
    }

    /// Everything in the knowledge table and kbsync's bookkeeping, as one digest.
    async fn digest(&self) -> String {
        self.client
            .query_one(
                "SELECT md5(
                    (SELECT COALESCE(string_agg(k::text, '|' ORDER BY k.id), '') FROM tenant_knowledge k) ||
                    (SELECT COALESCE(string_agg(o::text, '|' ORDER BY o.source, o.source_key), '') FROM kbsync.outbox o) ||
                    (SELECT COALESCE(string_agg(d::text, '|' ORDER BY d.id), '') FROM kbsync.dead_letters d))",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }
}

fn source<'r>(report: &'r Report, name: &str) -> &'r kbsync_reconcile::SourceReport {
    report
        .sources
        .iter()
        .find(|s| s.source == name)
        .unwrap_or_else(|| panic!("no {name} in the report: {report:?}"))
}

const PRODUCT_1: &str = "md5('product-1-headlamp-1')::uuid";

#[tokio::test]
async fn one_sweep_repairs_every_kind_of_drift_and_a_second_finds_nothing() {
    repairs_every_kind_of_drift(synced().await).await;
}

/// The same with a 3,072-dimension model, its vectors stored as halfvec.
#[tokio::test]
async fn one_sweep_repairs_every_kind_of_drift_at_3072_dimensions() {
    repairs_every_kind_of_drift(synced_at(3072).await).await;
}

async fn repairs_every_kind_of_drift(s: Setup) {
    let moved_faqs = s
        .count(
            "SELECT count(*) FROM web_knowledge_qapair
              WHERE page_id = md5('page-1-shipping')::uuid AND generation_status = 'completed'",
        )
        .await;
    assert!(moved_faqs > 0);

    s.behind_kbsyncs_back(&format!(
        "-- stale tenant: a page moved to another tenant takes its QAPairs (and itself)
         UPDATE web_knowledge_websitepage SET user_id = 2 WHERE id = md5('page-1-shipping')::uuid;
         -- missing: a new row, and a row whose chunks were deleted
         INSERT INTO web_knowledge_product (id, user_id, name, description, price, category)
              VALUES (md5('sneaked-in')::uuid, 1, 'Sneaked lamp', 'Arrived without a trigger.', 9.99, 'Lighting');
         DELETE FROM tenant_knowledge WHERE source = 'product' AND source_key = {PRODUCT_1}::text;
         -- stale text: an answer edited; a chunk's content altered in the knowledge table
         UPDATE web_knowledge_qapair SET answer = 'Changed behind kbsync''s back.'
          WHERE id = md5('qa-1-shipping-1')::uuid;
         UPDATE tenant_knowledge SET content = 'tampered'
          WHERE source = 'page' AND source_key = md5('page-2-shipping')::uuid::text;
         -- stale metadata only: in_stock is metadata, not text
         UPDATE web_knowledge_product SET in_stock = NOT in_stock
          WHERE id = md5('product-1-headlamp-3')::uuid;
         -- chunk set: a left-over second chunk
         INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash,
                                       embedding, embedding_model, metadata, source_text_hash, chunking, chunk_count,
                                       source_text_hash64, content_hash64)
         SELECT tenant_id, source, source_key, 1, content, content_hash, embedding, embedding_model, metadata,
                source_text_hash, chunking, chunk_count, source_text_hash64, content_hash64
           FROM tenant_knowledge WHERE source = 'product' AND source_key = md5('product-1-headlamp-4')::uuid::text;
         -- missing embedding
         UPDATE tenant_knowledge SET embedding = NULL WHERE source = 'manual' AND source_key = '1';
         -- orphans: a row deleted; a row that left the filter
         DELETE FROM web_knowledge_product WHERE id = md5('product-1-headlamp-2')::uuid;
         UPDATE web_knowledge_qapair SET generation_status = 'pending' WHERE id = md5('qa-2-shipping-1')::uuid;
         -- chunks under a source the config does not declare
         INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash)
              VALUES ('1', 'legacy', 'x', 0, 'old', sha256('old'));
         -- dead letters: one due for a retry (its key is healthy now), one out of retries
         INSERT INTO kbsync.dead_letters (source, source_key, error, attempts, next_retry_at)
              VALUES ('faq', md5('qa-3-shipping-1')::uuid::text, 'provider refused it', 2, now() - interval '1 second');
         INSERT INTO kbsync.dead_letters (source, source_key, error, attempts, retries, next_retry_at)
              VALUES ('faq', 'no-such-key', 'provider refused it', 6, 3, NULL);"
    ))
    .await;
    let product_rows = s.count("SELECT count(*) FROM web_knowledge_product").await;

    let first = s.sweep(&s.config, &[]);
    let product = source(&first, "product");
    assert_eq!(product.rows, product_rows as u64);
    assert_eq!(product.missing, 2, "{product:?}");
    assert_eq!(product.stale.metadata, 1, "{product:?}");
    assert_eq!(product.stale.chunk_set, 1, "{product:?}");
    assert_eq!(
        (
            product.orphan_keys,
            product.orphan_chunks,
            product.deleted_chunks
        ),
        (1, 1, 1)
    );
    assert_eq!(product.queued, 4);
    let faq = source(&first, "faq");
    assert_eq!(faq.stale.text, 1, "{faq:?}");
    // qa-1-shipping-1 is on the moved page too; its first reason is its text.
    assert_eq!(faq.stale.tenant, moved_faqs as u64 - 1, "{faq:?}");
    assert_eq!((faq.orphan_keys, faq.deleted_chunks), (1, 1));
    assert_eq!(faq.dead_letters_retried, 1);
    assert_eq!(faq.dead_letters_permanent, 1);
    assert_eq!(faq.permanent_examples[0].key, "no-such-key");
    assert_eq!(source(&first, "page").stale.text, 1);
    assert_eq!(source(&first, "page").stale.tenant, 1);
    assert_eq!(source(&first, "manual").missing_embeddings, 1);
    assert_eq!(first.unknown_sources.len(), 1);
    assert_eq!(first.unknown_sources[0].source, "legacy");
    assert!(first.safety_stops().next().is_none());

    // The queued keys go through the daemon's one processing path.
    let daemon = s.daemon(&s.config);
    s.client
        .batch_execute("DELETE FROM tenant_knowledge WHERE source = 'legacy'")
        .await
        .unwrap();
    converged(&s.client, &daemon).await;
    assert_eq!(
        s.count("SELECT count(*) FROM kbsync.dead_letters WHERE source_key <> 'no-such-key'")
            .await,
        0,
        "the retried dead letter was processed and cleared"
    );

    let second = s.sweep(&s.config, &[]);
    assert!(
        !second.found_drift(),
        "second sweep found drift: {second:?}"
    );
    assert_eq!(second.sources.iter().map(|s| s.queued).sum::<u64>(), 0);
    assert_eq!(source(&second, "faq").dead_letters_permanent, 1);

    // Both runs are recorded, and `kbsync status` shows them.
    assert_eq!(
        s.count("SELECT count(*) FROM kbsync.reconcile_runs WHERE finished_at IS NOT NULL AND error IS NULL AND NOT dry_run AND origin = 'cli'")
            .await,
        2
    );
    let status = s.db.kbsync_with_config(s.config.path(), &["status"]);
    status.assert_success();
    assert!(
        status.stdout.contains(&format!("#{}", second.run_id))
            && status.stdout.contains("missing 2, stale"),
        "{}",
        status.stdout
    );
}

#[tokio::test]
async fn a_dry_run_reports_the_drift_and_changes_nothing() {
    let s = synced().await;
    s.behind_kbsyncs_back(&format!(
        "DELETE FROM tenant_knowledge WHERE source = 'product' AND source_key = {PRODUCT_1}::text;
         UPDATE web_knowledge_qapair SET answer = 'edited' WHERE id = md5('qa-1-shipping-1')::uuid;
         DELETE FROM web_knowledge_product WHERE id = md5('product-1-headlamp-2')::uuid;
         UPDATE tenant_knowledge SET embedding = NULL WHERE source = 'manual';
         INSERT INTO kbsync.dead_letters (source, source_key, error, attempts, next_retry_at)
              VALUES ('faq', md5('qa-3-shipping-1')::uuid::text, 'refused', 2, now() - interval '1 second');"
    ))
    .await;
    let before = s.digest().await;
    let report = s.sweep(&s.config, &["--dry-run"]);
    assert!(report.dry_run);
    assert_eq!(source(&report, "product").missing, 1);
    assert_eq!(source(&report, "product").orphan_chunks, 1);
    assert_eq!(source(&report, "product").deleted_chunks, 0);
    assert_eq!(source(&report, "faq").stale.text, 1);
    assert_eq!(source(&report, "manual").missing_embeddings, 3);
    assert_eq!(source(&report, "faq").dead_letters_retried, 1);
    assert_eq!(
        report.sources.iter().map(|s| s.queued).sum::<u64>(),
        5,
        "what a real run would queue"
    );
    assert_eq!(s.digest().await, before, "a dry run changed something");
    let human = s.reconcile(&["--dry-run"]);
    human.assert_success();
    assert!(human.stdout.contains("dry run: nothing changed"));
    assert_eq!(s.digest().await, before, "a dry run changed something");
}

#[tokio::test]
async fn the_safety_stop_keeps_a_misconfigured_filter_from_wiping_a_source() {
    let s = synced().await;
    let faq_chunks = s
        .count("SELECT count(*) FROM tenant_knowledge WHERE source = 'faq'")
        .await;
    // Every FAQ leaves the filter at once, and one product lost its chunks.
    s.behind_kbsyncs_back(&format!(
        "UPDATE web_knowledge_qapair SET generation_status = 'pending';
         DELETE FROM tenant_knowledge WHERE source = 'product' AND source_key = {PRODUCT_1}::text;"
    ))
    .await;
    let stopped = s.reconcile(&[]);
    assert_eq!(
        stopped.status.code(),
        Some(3),
        "a safety stop exits 3:\n{}\n{}",
        stopped.stdout,
        stopped.stderr
    );
    assert!(
        stopped.stdout.contains("SAFETY STOP faq") && stopped.stdout.contains("--force"),
        "{}",
        stopped.stdout
    );
    assert_eq!(
        s.count("SELECT count(*) FROM tenant_knowledge WHERE source = 'faq'")
            .await,
        faq_chunks,
        "the safety stop deleted chunks"
    );
    assert_eq!(
        s.count("SELECT count(*) FROM kbsync.outbox WHERE source = 'product'")
            .await,
        1,
        "the rest of the sweep still ran"
    );

    let forced = s.sweep(&s.config, &["--force"]);
    assert_eq!(source(&forced, "faq").deleted_chunks, faq_chunks as u64);
    assert_eq!(
        s.count("SELECT count(*) FROM tenant_knowledge WHERE source = 'faq'")
            .await,
        0
    );
}

#[tokio::test]
async fn only_one_sweep_runs_at_a_time() {
    let s = synced().await;
    // Hold the knowledge table so the first sweep blocks inside its scan, holding
    // the sweep lock.
    let mut blocker = s.db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE tenant_knowledge IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let first = std::process::Command::new(kbsync_testkit::kbsync_bin())
        .arg("--config")
        .arg(s.config.path())
        .arg("reconcile")
        .env("DATABASE_URL", s.db.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(WAIT, "the first sweep to take the lock", || async {
        let held = s
            .count(&format!(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND (classid::bigint << 32) + objid::bigint = {}",
                kbsync_reconcile::SWEEP_LOCK
            ))
            .await;
        (held == 1).then_some(())
    })
    .await;
    let second = s.reconcile(&[]);
    assert_eq!(
        second.status.code(),
        Some(4),
        "{}\n{}",
        second.stdout,
        second.stderr
    );
    assert!(
        second.stderr.contains("another reconcile sweep is running"),
        "{}",
        second.stderr
    );
    tx.rollback().await.unwrap();
    let out = tokio::task::spawn_blocking(move || first.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "the first sweep failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.count("SELECT count(*) FROM kbsync.reconcile_runs WHERE origin = 'cli'")
            .await,
        1,
        "the refused sweep was recorded"
    );
}

#[tokio::test]
async fn source_and_tenant_narrow_the_sweep() {
    let s = synced().await;
    s.behind_kbsyncs_back("DELETE FROM tenant_knowledge WHERE source IN ('faq', 'product');")
        .await;
    let tenant_1_faqs = s
        .count(
            "SELECT count(*) FROM web_knowledge_qapair q JOIN web_knowledge_websitepage p ON p.id = q.page_id
              WHERE p.user_id = 1 AND q.generation_status = 'completed'",
        )
        .await;
    let report = s.sweep(&s.config, &["--source", "faq", "--tenant", "1"]);
    assert_eq!(report.sources.len(), 1);
    assert_eq!(source(&report, "faq").missing, tenant_1_faqs as u64);
    assert_eq!(outbox_len(&s.client).await, tenant_1_faqs);
    assert_eq!(
        s.count("SELECT count(*) FROM kbsync.outbox WHERE source <> 'faq'")
            .await,
        0
    );
    let unknown = s.reconcile(&["--source", "nope"]);
    unknown.assert_failure();
    assert!(
        unknown.stderr.contains("unknown source \"nope\"")
            && unknown.stderr.contains("faq")
            && unknown.stderr.contains("product"),
        "{}",
        unknown.stderr
    );
}

#[tokio::test]
async fn a_changed_chunking_costs_no_embedding_and_a_changed_model_re_embeds_everything() {
    let s = synced().await;
    let chunks = s.count("SELECT count(*) FROM tenant_knowledge").await;

    // Page chunks 300 tokens instead of 512: every page is re-chunked; the texts fit
    // one chunk either way, so nothing needs a new embedding.
    let rechunked = s.config.edited(&[(
        "text = \"{title}\\n\\n{content}\"",
        "text = \"{title}\\n\\n{content}\"\nchunk_tokens = 300",
    )]);
    let report = s.sweep(&rechunked, &[]);
    let pages = s
        .count("SELECT count(*) FROM tenant_knowledge WHERE source = 'page'")
        .await;
    assert_eq!(source(&report, "page").stale.chunking, pages as u64);
    assert_eq!(source(&report, "faq").stale.total(), 0);
    let inputs = s.server.inputs_total();
    let daemon = s.daemon(&rechunked);
    converged(&s.client, &daemon).await;
    assert_eq!(
        s.server.inputs_total(),
        inputs,
        "re-chunking paid for embeddings"
    );
    assert!(!s.sweep(&rechunked, &[]).found_drift());
    drop(daemon);

    // A new model: every chunk is stale and re-embedded with it.
    let new_model =
        rechunked.edited(&[("model = \"test-embedding\"", "model = \"test-embedding-2\"")]);
    let report = s.sweep(&new_model, &[]);
    let stale: u64 = report.sources.iter().map(|s| s.stale.model).sum();
    assert_eq!(stale, chunks as u64, "{report:?}");
    let daemon = s.daemon(&new_model);
    converged_with_model(&s.client, &daemon, "test-embedding-2").await;
    // Every text embedded again (equal texts in one batch are embedded once).
    let distinct = s
        .count("SELECT count(DISTINCT content) FROM tenant_knowledge")
        .await as usize;
    let embedded = s.server.inputs_total() - inputs;
    assert!(
        (distinct..=chunks as usize).contains(&embedded),
        "{embedded} inputs for {distinct} distinct texts in {chunks} chunks"
    );
    assert!(!s.sweep(&new_model, &[]).found_drift());
}

#[tokio::test]
async fn the_schedule_in_the_config_runs_the_sweep_inside_the_daemon() {
    let s = synced().await;
    let scheduled = s.config.edited(&[
        ("enabled = false", "enabled = true"),
        ("schedule = \"0 0 3 * * *\"", "schedule = \"*/2 * * * * *\""),
    ]);
    let daemon = s.daemon(&scheduled);
    s.behind_kbsyncs_back(&format!(
        "DELETE FROM tenant_knowledge WHERE source = 'product' AND source_key = {PRODUCT_1}::text;"
    ))
    .await;
    wait_for(WAIT, "a scheduled sweep to restore the chunks", || async {
        let restored = s
            .count(&format!(
                "SELECT count(*) FROM tenant_knowledge WHERE source = 'product' AND source_key = {PRODUCT_1}::text"
            ))
            .await;
        (restored == 1).then_some(())
    })
    .await;
    converged(&s.client, &daemon).await;
    assert!(
        s.count("SELECT count(*) FROM kbsync.reconcile_runs WHERE origin = 'schedule' AND finished_at IS NOT NULL AND error IS NULL")
            .await
            >= 1
    );
    assert!(
        daemon.log().contains("scheduled reconcile sweep done"),
        "{}",
        daemon.log()
    );
}

/// The sweep's first pass must notice every kind of drift on its own: a drift it
/// missed would never reach the key-by-key comparison. Each drift is made alone,
/// checked with a dry run, and undone; the demo gets a long page first, so that keys
/// cut into several chunks are covered too.
#[tokio::test]
async fn the_fingerprint_notices_every_kind_of_drift_alone() {
    let s = synced().await;
    let long: String = (0..6)
        .map(|p| {
            (0..80)
                .map(|i| format!("para{p}word{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    s.client
        .execute(
            "UPDATE web_knowledge_websitepage SET content = $1 WHERE id = md5('page-2-shipping')::uuid",
            &[&long],
        )
        .await
        .unwrap();
    const LONG: &str = "source = 'page' AND source_key = md5('page-2-shipping')::uuid::text";
    let mut daemon = s.daemon(&s.config);
    wait_for(WAIT, "the long page cut into several chunks", || async {
        let chunks = s
            .count(&format!(
                "SELECT count(*) FROM tenant_knowledge WHERE {LONG} AND embedding IS NOT NULL AND chunk_count > 2"
            ))
            .await;
        (outbox_len(&s.client).await == 0 && chunks > 2).then_some(())
    })
    .await;
    daemon.terminate(WAIT).await;

    let in_sync = s.sweep(&s.config, &["--dry-run"]);
    assert!(!in_sync.found_drift(), "{in_sync:?}");
    for src in &in_sync.sources {
        assert!(
            src.in_sync_by_fingerprint,
            "{}: an in-sync source did not match its fingerprint",
            src.source
        );
    }

    let faq_key = "md5('qa-1-shipping-1')::uuid";
    let knowledge =
        |set: &str, cond: &str| format!("UPDATE tenant_knowledge SET {set} WHERE {cond}");
    let product_chunk = format!("source = 'product' AND source_key = {PRODUCT_1}::text");
    let copy_of = |cond: &str, index: &str, key: &str| {
        format!(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash,
                                           embedding, embedding_model, metadata, source_text_hash, chunking, chunk_count,
                                           source_text_hash64, content_hash64)
             SELECT tenant_id, source, {key}, {index}, content, content_hash, embedding, embedding_model, metadata,
                    source_text_hash, chunking, chunk_count, source_text_hash64, content_hash64
               FROM tenant_knowledge WHERE {cond} AND chunk_index = 0"
        )
    };
    // (what, source it shows in, the drift, how to undo it when the saved chunks
    // are put back)
    let cases: Vec<(&str, &str, String, String)> = vec![
        (
            "a row's text",
            "faq",
            format!("UPDATE web_knowledge_qapair SET answer = answer || '!' WHERE id = {faq_key}"),
            format!(
                "UPDATE web_knowledge_qapair SET answer = left(answer, -1) WHERE id = {faq_key}"
            ),
        ),
        (
            "a row's text made blank",
            "manual",
            "UPDATE ai_model_aiprompts SET manual_prompt = ' ' || chr(160) WHERE id = 1".into(),
            "UPDATE ai_model_aiprompts SET manual_prompt = (SELECT content FROM tenant_knowledge
                WHERE source = 'manual' AND source_key = '1' AND chunk_index = 0) WHERE id = 1"
                .into(),
        ),
        (
            "a row leaving the filter",
            "faq",
            format!(
                "UPDATE web_knowledge_qapair SET generation_status = 'pending' WHERE id = {faq_key}"
            ),
            format!(
                "UPDATE web_knowledge_qapair SET generation_status = 'completed' WHERE id = {faq_key}"
            ),
        ),
        (
            "a row's metadata",
            "product",
            format!(
                "UPDATE web_knowledge_product SET in_stock = NOT in_stock WHERE id = {PRODUCT_1}"
            ),
            format!(
                "UPDATE web_knowledge_product SET in_stock = NOT in_stock WHERE id = {PRODUCT_1}"
            ),
        ),
        (
            "a row's tenant",
            "product",
            format!(
                "UPDATE web_knowledge_product SET user_id = user_id % 2 + 1 WHERE id = {PRODUCT_1}"
            ),
            format!(
                "UPDATE web_knowledge_product SET user_id = user_id % 2 + 1 WHERE id = {PRODUCT_1}"
            ),
        ),
        (
            "a chunk's content",
            "product",
            knowledge("content = content || '!'", &product_chunk),
            String::new(),
        ),
        (
            "a chunk deleted",
            "product",
            format!("DELETE FROM tenant_knowledge WHERE {product_chunk}"),
            String::new(),
        ),
        (
            "a NULL embedding",
            "product",
            knowledge("embedding = NULL", &product_chunk),
            String::new(),
        ),
        (
            "another model",
            "product",
            knowledge("embedding_model = 'other'", &product_chunk),
            String::new(),
        ),
        (
            "another chunking",
            "product",
            knowledge("chunking = 'other'", &product_chunk),
            String::new(),
        ),
        (
            "a chunk's tenant",
            "product",
            knowledge("tenant_id = tenant_id || '0'", &product_chunk),
            String::new(),
        ),
        (
            "a chunk's metadata",
            "product",
            knowledge("metadata = metadata || '{\"x\": 1}'", &product_chunk),
            String::new(),
        ),
        (
            "chunks without the 64-bit hashes",
            "product",
            knowledge("source_text_hash64 = NULL", &product_chunk),
            String::new(),
        ),
        (
            "a left-over second chunk",
            "product",
            copy_of(&product_chunk, "1", "source_key"),
            String::new(),
        ),
        (
            "a chunk of a key with no row",
            "product",
            copy_of(&product_chunk, "0", "md5('ghost')::uuid::text"),
            String::new(),
        ),
        (
            "a middle chunk deleted",
            "page",
            format!("DELETE FROM tenant_knowledge WHERE {LONG} AND chunk_index = 1"),
            String::new(),
        ),
        (
            "a last chunk deleted",
            "page",
            format!(
                "DELETE FROM tenant_knowledge WHERE {LONG} AND chunk_index = (SELECT max(chunk_index) FROM tenant_knowledge WHERE {LONG})"
            ),
            String::new(),
        ),
        (
            "a later chunk's tenant",
            "page",
            knowledge(
                "tenant_id = tenant_id || '0'",
                &format!("{LONG} AND chunk_index = 2"),
            ),
            String::new(),
        ),
        (
            "a later chunk's text hash",
            "page",
            knowledge(
                "source_text_hash64 = source_text_hash64 + 1",
                &format!("{LONG} AND chunk_index = 2"),
            ),
            String::new(),
        ),
        (
            "a later chunk's count",
            "page",
            knowledge(
                "chunk_count = chunk_count + 1",
                &format!("{LONG} AND chunk_index = 1"),
            ),
            String::new(),
        ),
        (
            "every chunk's count one more",
            "page",
            knowledge("chunk_count = chunk_count + 1", LONG),
            String::new(),
        ),
    ];
    s.client
        .batch_execute("CREATE TABLE saved_knowledge AS SELECT * FROM tenant_knowledge")
        .await
        .unwrap();
    for (what, name, drift, undo) in &cases {
        s.behind_kbsyncs_back(drift).await;
        let report = s.sweep(&s.config, &["--dry-run"]);
        let found = source(&report, name);
        assert!(
            !found.in_sync_by_fingerprint && found.found_drift(),
            "{what}: not noticed ({found:?})"
        );
        s.behind_kbsyncs_back(&format!(
            "{undo};
             DELETE FROM tenant_knowledge;
             INSERT INTO tenant_knowledge OVERRIDING SYSTEM VALUE SELECT * FROM saved_knowledge;"
        ))
        .await;
        let back = s.sweep(&s.config, &["--dry-run"]);
        assert!(
            back.sources.iter().all(|s| s.in_sync_by_fingerprint),
            "{what}: undoing it did not bring the fingerprint back ({back:?})"
        );
    }
}

/// Chunks written before migration 0006 have no 64-bit hashes: the first sweep
/// queues their keys once, the daemon rewrites them reusing every embedding, and the
/// next sweep matches by fingerprint.
#[tokio::test]
async fn chunks_from_before_the_64_bit_hashes_are_rewritten_once_without_embedding_calls() {
    let s = synced().await;
    s.client
        .batch_execute(
            "UPDATE tenant_knowledge SET source_text_hash64 = NULL, content_hash64 = NULL",
        )
        .await
        .unwrap();
    let keys = s
        .count("SELECT count(DISTINCT (source, source_key)) FROM tenant_knowledge")
        .await;
    let sent_before = s.server.inputs_total();
    let first = s.sweep(&s.config, &[]);
    let hashes: u64 = first.sources.iter().map(|s| s.stale.hashes).sum();
    assert_eq!(hashes, keys as u64, "{first:?}");
    let mut daemon = s.daemon(&s.config);
    wait_for(WAIT, "every chunk rewritten with its 64-bit hashes", || async {
        let old = s
            .count("SELECT count(*) FROM tenant_knowledge WHERE source_text_hash64 IS NULL OR content_hash64 IS NULL")
            .await;
        (old == 0 && outbox_len(&s.client).await == 0).then_some(())
    })
    .await;
    daemon.terminate(WAIT).await;
    assert_eq!(
        s.server.inputs_total(),
        sent_before,
        "rewriting the hashes sent texts to the provider"
    );
    let second = s.sweep(&s.config, &["--dry-run"]);
    assert!(
        second.sources.iter().all(|s| s.in_sync_by_fingerprint) && !second.found_drift(),
        "{second:?}"
    );
}

/// With the daemon stopped, an edit waits in the change log: the sweep counts its key
/// as already queued (in a dry run too) and does not queue it a second time.
#[tokio::test]
async fn a_change_waiting_in_the_change_log_counts_as_queued_and_is_not_queued_again() {
    let s = synced().await;
    s.client
        .batch_execute(
            "UPDATE web_knowledge_qapair SET answer = 'Edited while kbsync is stopped.'
              WHERE id = md5('qa-1-shipping-1')::uuid",
        )
        .await
        .unwrap();
    let waiting = "SELECT count(*) FROM kbsync.changes WHERE source = 'faq' AND scope = 'row'";
    assert_eq!(
        s.count(waiting).await,
        1,
        "the edit is not in the change log"
    );
    for args in [&["--dry-run"][..], &[]] {
        let report = s.sweep(&s.config, args);
        let faq = report.sources.iter().find(|r| r.source == "faq").unwrap();
        assert_eq!(
            (faq.stale.text, faq.already_queued, faq.queued),
            (1, 1, 0),
            "reconcile {args:?}: {faq:?}"
        );
    }
    assert_eq!(
        s.count("SELECT count(*) FROM kbsync.outbox").await,
        0,
        "the key was queued again"
    );
    assert_eq!(s.count(waiting).await, 1);
}

/// `kbsync errors retry` and the sweep's replay of a due dead letter follow one rule:
/// the key is queued and the dead letter counts the replay, with no timed retry left.
#[tokio::test]
async fn a_dead_letter_replayed_by_hand_or_by_the_sweep_follows_one_rule() {
    let s = synced().await;
    let ids: Vec<i64> = s
        .client
        .query(
            "INSERT INTO kbsync.dead_letters (source, source_key, error, attempts, retries, next_retry_at)
             VALUES ('faq', 'by-hand', 'provider refused it', 6, 3, NULL),
                    ('faq', 'by-sweep', 'provider refused it', 2, 0, now() - interval '1 second')
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    s.db.kbsync_with_config(
        s.config.path(),
        &["errors", "retry", "--id", &ids[0].to_string()],
    )
    .assert_success();
    let report = s.sweep(&s.config, &[]);
    assert_eq!(source(&report, "faq").dead_letters_retried, 1);
    let rows = s
        .client
        .query(
            "SELECT d.source_key, d.retries, d.next_retry_at IS NULL,
                    EXISTS (SELECT 1 FROM kbsync.outbox o
                             WHERE o.source = d.source AND o.scope = 'row' AND o.source_key = d.source_key)
               FROM kbsync.dead_letters d ORDER BY d.id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        [
            ("by-hand".to_owned(), 4, true, true),
            ("by-sweep".to_owned(), 1, true, true)
        ]
    );
}
