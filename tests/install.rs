//! `kbsync install` against a real PostgreSQL: creates everything, is idempotent,
//! `--dry-run` changes nothing, refuses a silent dimension change, follows the config.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use kbsync_testkit::demo_state::embedding_column_and_index;
use kbsync_testkit::{TempConfig, TestDb};

/// Every one of `words` is in `stderr`.
fn says(stderr: &str, words: &[&str]) {
    for words in words {
        assert!(stderr.contains(words), "{words:?} not in: {stderr}");
    }
}

/// The capture triggers (not the knowledge table's own terms triggers).
async fn kbsync_triggers(db: &TestDb) -> Vec<(String, String, u32)> {
    let client = db.client().await;
    client
        .query(
            "SELECT t.tgname::text, t.tgrelid::regclass::text, t.oid::oid
               FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
               JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'kbsync' AND p.proname LIKE 'capture\\_%' AND NOT t.tgisinternal ORDER BY 1",
            &[],
        )
        .await
        .expect("listing triggers")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn install_creates_everything_and_a_second_run_changes_nothing() {
    let db = TestDb::create().await.with_demo_schema().await;
    let first = db.kbsync(&["install"]);
    first.assert_success();
    assert!(first.stdout.contains("migration 0001"), "{}", first.stdout);

    let client = db.client().await;
    for table in [
        "public.tenant_knowledge",
        "kbsync.outbox",
        "kbsync.changes",
        "kbsync.dead_letters",
        "kbsync.reconcile_runs",
    ] {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        assert!(exists, "{table} missing");
    }
    let typmod: i32 = client
        .query_one(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'public.tenant_knowledge'::regclass AND attname = 'embedding'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(typmod, 384);
    let index: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'tenant_knowledge_embedding_hnsw'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        index.contains("hnsw")
            && index.contains("vector_cosine_ops")
            && index.contains("WITH (m='16', ef_construction='128')"),
        "{index}"
    );
    let unique: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'tenant_knowledge_chunk_key' AND contype = 'u'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unique, 1);

    let triggers = kbsync_triggers(&db).await;
    assert_eq!(triggers.len(), 20, "{triggers:?}");
    for (source, table) in [
        ("faq", "web_knowledge_qapair"),
        ("product", "web_knowledge_product"),
        ("page", "web_knowledge_websitepage"),
        ("manual", "ai_model_aiprompts"),
        // The FAQs' related page: its changes queue the FAQs that read it.
        ("faq__page", "web_knowledge_websitepage"),
    ] {
        for op in ["ins", "upd", "del", "trunc"] {
            let name = format!("kbsync_{source}_{op}");
            assert!(
                triggers.iter().any(|(n, t, _)| *n == name && t == table),
                "{name} on {table} missing: {triggers:?}"
            );
        }
    }

    let second = db.kbsync(&["install"]);
    second.assert_success();
    assert!(
        second.stdout.contains("up to date; nothing to do"),
        "{}",
        second.stdout
    );
    assert_eq!(
        kbsync_triggers(&db).await,
        triggers,
        "second install recreated triggers"
    );
    let migrations: i64 = client
        .query_one("SELECT count(*) FROM kbsync.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        migrations as usize,
        kbsync_core::schema::install::MIGRATIONS.len()
    );
}

#[tokio::test]
async fn dry_run_prints_the_sql_and_changes_nothing() {
    let db = TestDb::create().await.with_demo_schema().await;
    let out = db.kbsync(&["install", "--dry-run"]);
    out.assert_success();
    for expected in [
        "CREATE TABLE public.tenant_knowledge",
        "CREATE TABLE kbsync.outbox",
        "vector(384)",
        "CREATE TRIGGER \"kbsync_faq_upd\" AFTER UPDATE ON \"web_knowledge_qapair\"",
        "COMMIT;",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected:?} not in:\n{}",
            out.stdout
        );
    }
    let client = db.client().await;
    let kbsync_objects: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'kbsync')
                  + (SELECT count(*) FROM pg_class WHERE relname = 'tenant_knowledge')
                  + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'kbsync%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kbsync_objects, 0, "--dry-run created objects");

    // After a real install, a dry run has nothing to print.
    db.kbsync(&["install"]).assert_success();
    let again = db.kbsync(&["install", "--dry-run"]);
    again.assert_success();
    assert!(again.stdout.contains("nothing to do"), "{}", again.stdout);
}

fn openai_1536() -> TempConfig {
    TempConfig::shipped_with(&[(
        "provider = \"local\"\nmodel = \"all-MiniLM-L6-v2\"\ndimensions = 384\nmodel_dir = \".kbsync/models/all-MiniLM-L6-v2\"",
        "provider = \"openai\"\nmodel = \"text-embedding-3-small\"\ndimensions = 1536\nbase_url = \"http://127.0.0.1:9/v1\"",
    )])
}

#[tokio::test]
async fn a_dimension_change_is_refused_with_how_to_migrate_and_reset_keeps_texts() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash, embedding, embedding_model)
             VALUES ('1', 'faq', 'k', 0, 'kept text', '\\x00', array_fill(0.5, ARRAY[384])::vector, 'all-MiniLM-L6-v2')",
        )
        .await
        .unwrap();

    let config = openai_1536();
    let refused = db.kbsync_with_config(config.path(), &["install"]);
    refused.assert_failure();
    says(
        &refused.stderr,
        &[
            "vector(384)",
            "dimensions is 1536",
            "--reset-embeddings",
            "kbsync reconcile",
        ],
    );
    let embedded: i64 = client
        .query_one(
            "SELECT count(*) FROM tenant_knowledge WHERE embedding IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(embedded, 1, "a refused install changed the data");

    db.kbsync_with_config(config.path(), &["install", "--reset-embeddings"])
        .assert_success();
    let row = client
        .query_one(
            "SELECT content, embedding IS NULL, embedding_model IS NULL,
                    (SELECT atttypmod FROM pg_attribute WHERE attrelid = 'tenant_knowledge'::regclass AND attname = 'embedding')
               FROM tenant_knowledge",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "kept text");
    assert!(row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert_eq!(row.get::<_, i32>(3), 1536);
}

#[tokio::test]
async fn triggers_of_sources_no_longer_configured_are_removed() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    let text = std::fs::read_to_string(kbsync_testkit::shipped_config()).unwrap();
    let only_faq = text.split("[sources.product]").next().unwrap();
    let config = TempConfig::new(only_faq);
    let out = db.kbsync_with_config(config.path(), &["install"]);
    out.assert_success();
    assert!(
        out.stdout.contains("drop trigger kbsync_page_upd"),
        "{}",
        out.stdout
    );
    // The FAQs' own four, and four on their related page table.
    let triggers = kbsync_triggers(&db).await;
    assert_eq!(triggers.len(), 8, "{triggers:?}");
    assert!(
        triggers
            .iter()
            .all(|(n, _, _)| n.starts_with("kbsync_faq_"))
    );
    let functions: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'kbsync' AND p.proname LIKE 'capture%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(functions, 2, "capture_faq and capture_faq__page");
}

#[tokio::test]
async fn a_changed_text_replaces_only_that_sources_capture_function() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    let before = kbsync_triggers(&db).await;
    let config = TempConfig::shipped_with(&[(
        "text = \"{manual_prompt}\"",
        "text = \"{manual_prompt} {updated_at}\"",
    )]);
    let out = db.kbsync_with_config(config.path(), &["install"]);
    out.assert_success();
    // The watched columns live in the capture function (the triggers are statement-level
    // and compare rows in SQL): only manual's function is replaced, no trigger.
    assert!(
        out.stdout.contains("1 change(s) applied")
            && out.stdout.contains("capture function for source manual"),
        "{}",
        out.stdout
    );
    assert_eq!(
        kbsync_triggers(&db).await,
        before,
        "a trigger was recreated"
    );
}

#[tokio::test]
async fn missing_tables_and_columns_are_named() {
    let db = TestDb::create().await;
    let out = db.kbsync(&["install"]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("sources.faq: table \"web_knowledge_qapair\" does not exist"),
        "{}",
        out.stderr
    );

    let db = db.with_demo_schema().await;
    let config =
        TempConfig::shipped_with(&[("text = \"{manual_prompt}\"", "text = \"{manual_promt}\"")]);
    let out = db.kbsync_with_config(config.path(), &["install"]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("sources.manual: column \"manual_promt\" does not exist"),
        "{}",
        out.stderr
    );
}

/// A database where an older kbsync applied (and recorded) its first `applied`
/// migrations, as that release's install left it.
async fn at_migration(db: &TestDb, applied: usize) -> tokio_postgres::Client {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE SCHEMA kbsync;
             CREATE TABLE kbsync.schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                 checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .unwrap();
    for migration in &kbsync_core::schema::install::MIGRATIONS[..applied] {
        client.batch_execute(migration.sql).await.unwrap();
        client
            .execute(
                "INSERT INTO kbsync.schema_migrations (version, name, checksum)
                 VALUES ($1, $2, encode(sha256(convert_to($3, 'UTF8')), 'hex'))",
                &[&migration.version, &migration.name, &migration.sql],
            )
            .await
            .unwrap();
    }
    client
}

#[tokio::test]
async fn a_database_at_an_older_migration_gets_only_the_newer_ones() {
    let db = TestDb::create().await.with_demo_schema().await;
    // The state the first release left: migration 1 applied and recorded, one chunk.
    let client = at_migration(&db, 1).await;
    client
        .batch_execute(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash)
             VALUES ('1', 'faq', 'k', 0, 'kept', sha256('kept'))",
        )
        .await
        .unwrap();
    let plan = db.kbsync(&["install", "--dry-run"]);
    plan.assert_success();
    assert!(
        plan.stdout.contains("migration 0002") && !plan.stdout.contains("migration 0001"),
        "{}",
        plan.stdout
    );
    db.kbsync(&["install"]).assert_success();
    let (kept, versions): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM tenant_knowledge WHERE content = 'kept' AND source_text_hash IS NULL),
                        (SELECT count(*) FROM kbsync.schema_migrations)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(kept, 1, "the upgrade lost or rewrote a chunk");
    assert_eq!(
        versions as usize,
        kbsync_core::schema::install::MIGRATIONS.len()
    );
}

#[tokio::test]
async fn an_edited_released_migration_is_detected() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    db.client()
        .await
        .batch_execute("UPDATE kbsync.schema_migrations SET checksum = 'edited' WHERE version = 1")
        .await
        .unwrap();
    let out = db.kbsync(&["install"]);
    out.assert_failure();
    assert!(
        out.stderr.contains("must never be edited"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_filter_value_that_looks_like_sql_stays_a_value() {
    let db = TestDb::create().await.with_demo_schema().await;
    let hostile = "completed'); DROP TABLE accounts_user; --";
    let config = TempConfig::shipped_with(&[(
        "filter = [{ column = \"crawl_status\", equals = \"completed\" }]",
        &format!("filter = [{{ column = \"url\", equals = \"{hostile}\" }}]"),
    )]);
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO accounts_user VALUES (1, 'u', 'c', 'd')")
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO web_knowledge_websitepage (id, user_id, url) VALUES (gen_random_uuid(), 1, 'plain'), (gen_random_uuid(), 1, $1)",
            &[&hostile],
        )
        .await
        .unwrap();
    let exists: bool = client
        .query_one("SELECT to_regclass('accounts_user') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(exists);
    let captured: i64 = client
        .query_one(
            "SELECT count(*) FROM kbsync.changes WHERE source = 'page'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        captured, 1,
        "only the row whose url equals the literal passes the filter"
    );
}

#[tokio::test]
async fn the_daemon_refuses_to_start_without_the_schema() {
    let db = TestDb::create().await.with_demo_schema().await;
    let out = db.kbsync(&["run"]);
    out.assert_failure();
    assert!(
        out.stderr.contains("run `kbsync install` first"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn the_upgrade_to_the_terms_table_keeps_every_chunks_words_and_its_readers() {
    let db = TestDb::create().await.with_demo_schema().await;
    // Release 0008: the words in tenant_knowledge itself, and an application role
    // that reads it (as the README told applications to grant).
    let client = at_migration(&db, 8).await;
    let role = format!("kbsync_app_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash,
                                           text_search_config)
             VALUES ('1', 'faq', 'a', 0, 'Hold the reset button', sha256('a'), 'english'),
                    ('2', 'faq', 'b', 0, 'Cards and bank transfers', sha256('b'), 'simple');
             CREATE ROLE {role} NOLOGIN;
             GRANT USAGE ON SCHEMA kbsync TO {role};
             GRANT SELECT ON public.tenant_knowledge TO {role};"
        ))
        .await
        .unwrap();
    let out = db.kbsync(&["install"]);
    out.assert_success();
    assert!(out.stdout.contains("migration 0009"), "{}", out.stdout);
    assert_eq!(
        terms_out_of_step(&client).await,
        0,
        "the chunks' words were not carried over"
    );
    let (stemmed, reader_may_read): (bool, bool) = {
        let row = client
            .query_one(
                "SELECT content_tsv @@ to_tsquery('english', 'buttons')
                   FROM kbsync.knowledge_terms WHERE tenant_id = '1'",
                &[],
            )
            .await
            .unwrap();
        let may: bool = client
            .query_one(
                "SELECT has_table_privilege($1, 'kbsync.knowledge_terms', 'SELECT')",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        (row.get(0), may)
    };
    assert!(
        stemmed,
        "the chunk's own text search configuration was lost"
    );
    assert!(
        reader_may_read,
        "a role that read tenant_knowledge cannot read its words after the upgrade: its text searches would fail"
    );
    client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

/// Chunks whose row in kbsync.knowledge_terms is missing, left over, or holds other
/// words than the chunk's text in its configuration.
async fn terms_out_of_step(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM public.tenant_knowledge t
               FULL JOIN kbsync.knowledge_terms w ON w.id = t.id
              WHERE w.id IS NULL OR t.id IS NULL OR w.tenant_id <> t.tenant_id OR w.source <> t.source
                 OR w.text_search_config <> t.text_search_config
                 OR w.content_tsv <> to_tsvector(t.text_search_config, t.content)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn every_write_to_the_knowledge_table_keeps_its_words_in_step() {
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash)
             SELECT (n % 2)::text, 'faq', n::text, 0, 'answer number ' || n, sha256(n::text::bytea)
               FROM generate_series(1, 50) n",
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .query_one("SELECT count(*) FROM kbsync.knowledge_terms", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        50
    );
    assert_eq!(terms_out_of_step(&client).await, 0, "after an insert");

    let untouched =
        "SELECT w.xmin::text FROM kbsync.knowledge_terms w JOIN tenant_knowledge t USING (id)
                      WHERE t.source_key = '2'";
    let before: String = client.query_one(untouched, &[]).await.unwrap().get(0);
    // The daemon's write: an upsert that stores embeddings and, for one key, new words.
    client
        .batch_execute(
            "UPDATE tenant_knowledge SET embedding_model = 'm', updated_at = now();
             INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash)
             VALUES ('1', 'faq', '1', 0, 'the router was reset', sha256('x')),
                    ('1', 'faq', '1', 1, 'a second chunk', sha256('y'))
             ON CONFLICT (source, source_key, chunk_index)
             DO UPDATE SET content = EXCLUDED.content, content_hash = EXCLUDED.content_hash;
             UPDATE tenant_knowledge SET text_search_config = 'english' WHERE source_key = '3';
             UPDATE tenant_knowledge SET tenant_id = '9', source = 'page' WHERE source_key = '5';",
        )
        .await
        .unwrap();
    assert_eq!(
        terms_out_of_step(&client).await,
        0,
        "after updates and an upsert"
    );
    let after: String = client.query_one(untouched, &[]).await.unwrap().get(0);
    assert_eq!(
        before, after,
        "an update that changed no words rewrote the chunk's terms"
    );
    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM kbsync.knowledge_terms
              WHERE tenant_id = '1' AND content_tsv @@ websearch_to_tsquery('simple', 'router reset')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1);

    client
        .batch_execute("DELETE FROM tenant_knowledge WHERE source_key IN ('1', '7', '8')")
        .await
        .unwrap();
    assert_eq!(terms_out_of_step(&client).await, 0, "after a delete");
    client
        .batch_execute("TRUNCATE tenant_knowledge")
        .await
        .unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM kbsync.knowledge_terms", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a truncate left words behind");
}

/// Make this test database report an older pgvector than it runs: the extension's
/// catalog row says `version` (a superuser may write the catalog; the database is the
/// test's own). The bundled servers all run pgvector 0.8.5, so an old one is shown
/// to install this way.
async fn pretend_pgvector(client: &tokio_postgres::Client, version: &str) {
    client
        .execute(
            "UPDATE pg_extension SET extversion = $1 WHERE extname = 'vector'",
            &[&version],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn install_refuses_a_pgvector_older_than_the_minimum_and_says_how_to_upgrade() {
    let db = TestDb::create().await.with_demo_schema().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
        .await
        .unwrap();
    pretend_pgvector(&client, "0.4.4").await;
    let refused = db.kbsync(&["install"]);
    refused.assert_failure();
    says(
        &refused.stderr,
        &[
            "pgvector 0.4.4",
            "0.5.0 or newer",
            "ALTER EXTENSION vector UPDATE",
        ],
    );
    let schema: bool = client
        .query_one(
            "SELECT to_regclass('kbsync.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!schema, "a refused install changed the database");

    // 0.6 has HNSW but not halfvec: a 1,536-dimension vector model installs, a
    // 3,072-dimension one (halfvec) is refused with both ways out.
    pretend_pgvector(&client, "0.6.2").await;
    let wide = TempConfig::shipped_with(&[(
        "provider = \"local\"\nmodel = \"all-MiniLM-L6-v2\"\ndimensions = 384\nmodel_dir = \".kbsync/models/all-MiniLM-L6-v2\"",
        "provider = \"openai\"\nmodel = \"text-embedding-3-large\"\ndimensions = 3072\nbase_url = \"http://127.0.0.1:9/v1\"",
    )]);
    let refused = db.kbsync_with_config(wide.path(), &["install"]);
    refused.assert_failure();
    says(
        &refused.stderr,
        &[
            "text-embedding-3-large",
            "halfvec",
            "pgvector 0.6.2",
            "0.7.0 or newer",
            "send_dimensions",
        ],
    );
    db.kbsync_with_config(openai_1536().path(), &["install"])
        .assert_success();
}

#[tokio::test]
async fn a_3072_dimension_model_gets_a_halfvec_column_and_a_vector_column_converts_in_place() {
    let db = TestDb::create().await.with_demo_schema().await;
    let wide = TempConfig::shipped_with(&[(
        "provider = \"local\"\nmodel = \"all-MiniLM-L6-v2\"\ndimensions = 384\nmodel_dir = \".kbsync/models/all-MiniLM-L6-v2\"",
        "provider = \"openai\"\nmodel = \"text-embedding-3-large\"\ndimensions = 3072\nbase_url = \"http://127.0.0.1:9/v1\"",
    )]);
    db.kbsync_with_config(wide.path(), &["install"])
        .assert_success();
    let client = db.client().await;
    assert_eq!(
        embedding_column_and_index(&client).await,
        ("halfvec(3072)".into(), "halfvec_cosine_ops".into(), true)
    );
    db.kbsync_with_config(wide.path(), &["install", "--dry-run"])
        .assert_success();

    // `vector` above 2,000 dimensions is refused by the config check, with the fix.
    let forced = TempConfig::new(&std::fs::read_to_string(wide.path()).unwrap().replace(
        "dimensions = 3072",
        "dimensions = 3072\nvector_type = \"vector\"",
    ));
    let refused = db.kbsync_with_config(forced.path(), &["config", "check"]);
    refused.assert_failure();
    assert!(
        refused.stderr.contains("embedding.vector_type") && refused.stderr.contains("halfvec"),
        "{}",
        refused.stderr
    );

    // A 1,536-dimension model stored as vector, then chosen as halfvec: the stored
    // vectors are converted, not cleared (nothing is sent again).
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(openai_1536().path(), &["install"])
        .assert_success();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO tenant_knowledge (tenant_id, source, source_key, chunk_index, content, content_hash, embedding, embedding_model)
             VALUES ('1', 'faq', 'k', 0, 'kept text', '\\x00', array_fill(0.25, ARRAY[1536])::vector, 'text-embedding-3-small')",
        )
        .await
        .unwrap();
    let half = TempConfig::new(
        &std::fs::read_to_string(openai_1536().path())
            .unwrap()
            .replace(
                "\ndimensions = 1536",
                "\ndimensions = 1536\nvector_type = \"halfvec\"",
            ),
    );
    let out = db.kbsync_with_config(half.path(), &["install"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("vector(1536) -> halfvec(1536), every stored vector converted"),
        "{}",
        out.stdout
    );
    let row = client
        .query_one(
            "SELECT format_type(a.atttypid, a.atttypmod), t.embedding = array_fill(0.25, ARRAY[1536])::vector::halfvec,
                    t.embedding_model
               FROM tenant_knowledge t, pg_attribute a
              WHERE a.attrelid = 'public.tenant_knowledge'::regclass AND a.attname = 'embedding'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "halfvec(1536)");
    assert!(row.get::<_, bool>(1), "the stored vector was not kept");
    assert_eq!(row.get::<_, String>(2), "text-embedding-3-small");
}
