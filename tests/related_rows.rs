//! Rows that read a related row — the tenant through `tenant.via`, `{page.title}` in a
//! text, a filter on the page's crawl status: a change of the related row re-syncs the
//! rows that depend on it (set-based, in the writer's transaction or from the decoded
//! WAL), a tenant move leaves no window in which the old tenant still finds the rows,
//! an edit nothing reads costs nothing, and the reconcile sweep repairs related drift
//! made with kbsync stopped. Each behaviour in both capture modes.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kbsync_reconcile::Report;
use kbsync_testkit::demo_state::{
    FaqReference, RELATED_FAQ, RELATED_FAQ_EDITS, SHIPPED_FAQ, TEST_MODEL, converged_with, decoded,
};
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, LOGICAL_CAPTURE, TempConfig, TestDb, sync_config,
    sync_config_with_max_wait, wait_for_daemon,
};
use tokio_postgres::Client;

const DIMS: usize = 8;
/// Long enough that a test can tell the two windows apart.
const DEBOUNCE: Duration = Duration::from_secs(5);
const DELETE_DEBOUNCE: Duration = Duration::from_millis(500);

/// A database with the demo rows, installed, and a daemon that has synced them.
struct Synced {
    server: FakeOpenAi,
    db: TestDb,
    client: Client,
    config: TempConfig,
    daemon: DaemonProcess,
    faq: FaqReference,
    logical: bool,
}

async fn synced(logical: bool, faq: FaqReference) -> Synced {
    let server = FakeOpenAi::start(DIMS).await;
    let mut config = sync_config(&server.base_url(), DIMS, "5s", "500ms");
    if logical {
        config = config.edited(&[LOGICAL_CAPTURE]);
    }
    if faq.text == RELATED_FAQ.text {
        config = config.edited(RELATED_FAQ_EDITS);
    }
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync_with_config(config.path(), &["demo", "data"])
        .assert_success();
    db.kbsync_with_config(config.path(), &["install"])
        .assert_success();
    let client = db.client().await;
    let daemon = DaemonProcess::start(config.path(), db.url());
    converged_with(&client, &daemon, TEST_MODEL, faq).await;
    Synced {
        server,
        db,
        client,
        config,
        daemon,
        faq,
        logical,
    }
}

impl Synced {
    async fn keys(&self, sql: &str) -> BTreeSet<String> {
        self.client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// The FAQ keys `kbsync.search()` finds for `tenant`: every one while the tenant
    /// has at most 1,000 (the largest k it takes).
    async fn faqs_found_by(&self, tenant: &str) -> BTreeSet<String> {
        let vector = format!("{:?}", self.server.vector_for("question"));
        self.client
            .query(
                "SELECT source_key FROM kbsync.search($1, 'question', $2::text::vector, 1000, 'vector',
                                                     ARRAY['faq'], NULL, 100000)",
                &[&tenant, &vector],
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "kbsync.search({tenant}): {}",
                    kbsync_core::db::describe(&e)
                )
            })
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Run `sql`, whose `$1` is a page id, as the application would.
    async fn on_page(&self, sql: &str, page: &str) {
        self.client
            .execute(sql, &[&page])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Wait until the daemon has synced everything and the table is as the rows say.
    async fn converged(&self) {
        if self.logical {
            decoded(&self.client, Duration::from_secs(30)).await;
        }
        converged_with(&self.client, &self.daemon, TEST_MODEL, self.faq).await;
    }

    /// The page (with its completed FAQs) of `tenant` that has the most of them.
    async fn page_with_faqs(&self, tenant: i32) -> (String, BTreeSet<String>) {
        let page: String = self
            .client
            .query_one(
                "SELECT p.id::text FROM web_knowledge_websitepage p JOIN web_knowledge_qapair q ON q.page_id = p.id
                  WHERE p.user_id = $1 AND q.generation_status = 'completed' AND p.crawl_status = 'completed'
                  GROUP BY p.id ORDER BY count(*) DESC, p.id LIMIT 1",
                &[&tenant],
            )
            .await
            .unwrap()
            .get(0);
        let faqs = self
            .keys(&format!(
                "SELECT id::text FROM web_knowledge_qapair WHERE page_id = '{page}' AND generation_status = 'completed'"
            ))
            .await;
        assert!(!faqs.is_empty());
        (page, faqs)
    }
}

async fn a_page_moved_to_another_tenant_takes_its_faqs_at_once(logical: bool) {
    let s = synced(logical, SHIPPED_FAQ).await;
    let (page, faqs) = s.page_with_faqs(3).await;
    assert!(faqs.is_subset(&s.faqs_found_by("3").await));
    let inputs_before = s.server.inputs_total();

    let moved = Instant::now();
    s.on_page(
        "UPDATE web_knowledge_websitepage SET user_id = 1 WHERE id = $1::text::uuid",
        &page,
    )
    .await;
    // A tenant move is a delete from the old tenant: it takes the delete window, not
    // the FAQ's debounce, and tenant 3 stops finding the FAQs within it.
    let bound = DELETE_DEBOUNCE + Duration::from_secs(1);
    let took = wait_for_daemon(
        &s.daemon,
        DEBOUNCE + Duration::from_secs(1),
        "the page's FAQs to move to tenant 1",
        || async {
            let (old, new) = (s.faqs_found_by("3").await, s.faqs_found_by("1").await);
            (faqs.is_disjoint(&old) && faqs.is_subset(&new)).then(|| moved.elapsed())
        },
    )
    .await;
    assert!(
        took <= bound,
        "the FAQs moved after {took:?}; a tenant move must take the delete window ({DELETE_DEBOUNCE:?}) plus at most 1 s"
    );
    let stored = s
        .keys(&format!(
            "SELECT DISTINCT tenant_id FROM tenant_knowledge WHERE source = 'faq'
               AND source_key IN (SELECT id::text FROM web_knowledge_qapair WHERE page_id = '{page}')"
        ))
        .await;
    assert_eq!(stored, BTreeSet::from(["1".to_owned()]));
    assert_eq!(
        s.server.inputs_total(),
        inputs_before,
        "a tenant move re-embeds nothing: the texts did not change"
    );
    s.converged().await;
    eprintln!(
        "{} FAQs moved with their page in {took:?} ({} capture)",
        faqs.len(),
        if logical { "logical" } else { "trigger" }
    );
}

#[tokio::test]
async fn trigger_capture_a_page_moved_to_another_tenant_takes_its_faqs_at_once() {
    a_page_moved_to_another_tenant_takes_its_faqs_at_once(false).await;
}

#[tokio::test]
async fn logical_capture_a_page_moved_to_another_tenant_takes_its_faqs_at_once() {
    a_page_moved_to_another_tenant_takes_its_faqs_at_once(true).await;
}

const BULK_PAGES: i64 = 1_000;

async fn a_thousand_pages_moved_in_one_statement_resync_every_faq(logical: bool) {
    let s = synced(logical, SHIPPED_FAQ).await;
    s.client
        .batch_execute(&format!(
            "INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
             SELECT md5('bulk-page-' || i)::uuid, 2, 'https://bulk.example/' || i, 'Bulk ' || i, 'Content ' || i, 'completed'
               FROM generate_series(1, {BULK_PAGES}) i;
             INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
             SELECT md5('bulk-qa-' || i || '-' || j)::uuid, md5('bulk-page-' || i)::uuid, 'Q ' || i || '/' || j, 'A', 'completed'
               FROM generate_series(1, {BULK_PAGES}) i, generate_series(1, 2) j;"
        ))
        .await
        .unwrap();
    s.converged().await;
    let bulk_faqs = s
        .keys("SELECT q.id::text FROM web_knowledge_qapair q JOIN web_knowledge_websitepage p ON p.id = q.page_id WHERE p.url LIKE 'https://bulk.example/%'")
        .await;
    assert_eq!(bulk_faqs.len() as i64, 2 * BULK_PAGES);
    let inputs_before = s.server.inputs_total();

    let mut writer = s.db.client().await;
    let tx = writer.transaction().await.unwrap();
    let moved = tx
        .execute(
            "UPDATE web_knowledge_websitepage SET user_id = 3 WHERE url LIKE 'https://bulk.example/%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(moved as i64, BULK_PAGES);
    if !logical {
        // In the writer's transaction, by the statement's triggers: every page and
        // every FAQ of theirs, once, as a move (the delete window).
        let appended: Vec<(String, i64, bool)> = tx
            .query(
                "SELECT source, count(*), bool_and(deleted) FROM kbsync.changes GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            appended,
            vec![
                ("faq".to_owned(), 2 * BULK_PAGES, true),
                ("page".to_owned(), BULK_PAGES, true)
            ]
        );
    }
    tx.commit().await.unwrap();
    let committed = Instant::now();
    // More than one search returns: the table says where they all are, and tenant 2
    // (back under 1,000 FAQs) finds none of them.
    let under = |tenant: &'static str| {
        format!(
            "SELECT source_key FROM tenant_knowledge WHERE source = 'faq' AND tenant_id = '{tenant}'"
        )
    };
    wait_for_daemon(
        &s.daemon,
        Duration::from_secs(60),
        "every FAQ of the moved pages under tenant 3",
        || async {
            bulk_faqs
                .is_subset(&s.keys(&under("3")).await)
                .then_some(())
        },
    )
    .await;
    let took = committed.elapsed();
    assert!(bulk_faqs.is_disjoint(&s.keys(&under("2")).await));
    let found = s.faqs_found_by("2").await;
    assert!(!found.is_empty() && found.len() < 1000 && bulk_faqs.is_disjoint(&found));
    s.converged().await;
    assert_eq!(
        s.server.inputs_total(),
        inputs_before,
        "moving pages re-embeds nothing"
    );
    eprintln!(
        "{BULK_PAGES} pages and {} FAQs moved in one statement, synced {took:?} after the commit ({} capture)",
        bulk_faqs.len(),
        if logical { "logical" } else { "trigger" }
    );
}

#[tokio::test]
async fn trigger_capture_a_thousand_pages_moved_in_one_statement_resync_every_faq() {
    a_thousand_pages_moved_in_one_statement_resync_every_faq(false).await;
}

#[tokio::test]
async fn logical_capture_a_thousand_pages_moved_in_one_statement_resync_every_faq() {
    a_thousand_pages_moved_in_one_statement_resync_every_faq(true).await;
}

/// The outbox entries made since `outbox_before` by the statements `sql`, after the
/// capture (in logical mode: the decoder) has recorded them.
async fn queued_by(s: &Synced, sql: &str) -> Vec<(String, i64)> {
    s.client
        .batch_execute("DELETE FROM kbsync.outbox")
        .await
        .unwrap();
    s.client.batch_execute(sql).await.unwrap();
    if s.logical {
        decoded(&s.client, Duration::from_secs(30)).await;
    } else {
        kbsync_core::outbox::collect(&s.client).await.unwrap();
    }
    s.client
        .query(
            "SELECT source, count(*) FROM kbsync.outbox GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn a_page_edit_nothing_reads_queues_nothing(logical: bool) {
    let mut s = synced(logical, SHIPPED_FAQ).await;
    // The daemon stopped: what is queued stays in the outbox to be counted.
    s.daemon.terminate(Duration::from_secs(30)).await;
    let pages = s
        .count("SELECT count(*) FROM web_knowledge_websitepage WHERE crawl_status = 'completed'")
        .await;
    if logical {
        // The decoder is the daemon's: run one whose windows never close.
        let capture_only = sync_config_with_max_wait(&s.server.base_url(), DIMS, "1h", "1h", "2h")
            .edited(&[LOGICAL_CAPTURE]);
        s.daemon = DaemonProcess::start(capture_only.path(), s.db.url());
        s.config = capture_only;
    }
    let inputs_before = s.server.inputs_total();
    assert_eq!(
        queued_by(
            &s,
            "UPDATE web_knowledge_websitepage SET updated_at = now() + interval '1 day'"
        )
        .await,
        vec![],
        "a column no source reads"
    );
    // The page's title is the page source's text, not the FAQs'.
    assert_eq!(
        queued_by(
            &s,
            "UPDATE web_knowledge_websitepage SET title = title || ' (new)'"
        )
        .await,
        vec![("page".to_owned(), pages)],
        "the FAQs read only the page's user_id"
    );
    assert_eq!(s.server.inputs_total(), inputs_before);
}

#[tokio::test]
async fn trigger_capture_a_page_edit_nothing_reads_queues_nothing() {
    a_page_edit_nothing_reads_queues_nothing(false).await;
}

#[tokio::test]
async fn logical_capture_a_page_edit_nothing_reads_queues_nothing() {
    a_page_edit_nothing_reads_queues_nothing(true).await;
}

async fn a_related_column_in_the_text_re_embeds_exactly_its_dependents(logical: bool) {
    let s = synced(logical, RELATED_FAQ).await;
    let (page, faqs) = s.page_with_faqs(2).await;
    let content: String = s
        .client
        .query_one(
            "SELECT content FROM tenant_knowledge WHERE source = 'faq' AND source_key = $1",
            &[faqs.first().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(content.starts_with("Page: "), "{content}");

    let inputs_before = s.server.inputs_total();
    s.on_page(
        "UPDATE web_knowledge_websitepage SET title = 'Renamed page' WHERE id = $1::text::uuid",
        &page,
    )
    .await;
    s.converged().await;
    assert_eq!(
        s.server.inputs_total() - inputs_before,
        faqs.len() + 1,
        "the page's completed FAQs and the page itself, nothing else"
    );
    let renamed = s
        .keys("SELECT source_key FROM tenant_knowledge WHERE source = 'faq' AND content LIKE 'Page: Renamed page%'")
        .await;
    assert_eq!(renamed, faqs);

    // A filter on the page: its FAQs leave with it, and come back with it.
    s.on_page(
        "UPDATE web_knowledge_websitepage SET crawl_status = 'pending' WHERE id = $1::text::uuid",
        &page,
    )
    .await;
    s.converged().await;
    let left = s
        .keys("SELECT source_key FROM tenant_knowledge WHERE source = 'faq'")
        .await;
    assert!(faqs.is_disjoint(&left));
    s.on_page(
        "UPDATE web_knowledge_websitepage SET crawl_status = 'completed' WHERE id = $1::text::uuid",
        &page,
    )
    .await;
    s.converged().await;
    let back = s
        .keys("SELECT source_key FROM tenant_knowledge WHERE source = 'faq'")
        .await;
    assert!(faqs.is_subset(&back));
}

#[tokio::test]
async fn trigger_capture_a_related_column_in_the_text_re_embeds_exactly_its_dependents() {
    a_related_column_in_the_text_re_embeds_exactly_its_dependents(false).await;
}

#[tokio::test]
async fn logical_capture_a_related_column_in_the_text_re_embeds_exactly_its_dependents() {
    a_related_column_in_the_text_re_embeds_exactly_its_dependents(true).await;
}

/// A FAQ committed while another transaction moves its page: the page's trigger ran
/// before the FAQ existed, so only the FAQ's own change queues it; read before the
/// move commits, it would be written under the old tenant for good.
async fn a_faq_written_while_its_page_moves_is_never_left_with_the_old_tenant(logical: bool) {
    let s = synced(logical, SHIPPED_FAQ).await;
    let (page, _) = s.page_with_faqs(3).await;
    let mut mover = s.db.client().await;
    let move_tx = mover.transaction().await.unwrap();
    move_tx
        .execute(
            "UPDATE web_knowledge_websitepage SET user_id = 1 WHERE id = $1::text::uuid",
            &[&page],
        )
        .await
        .unwrap();
    s.on_page("INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
             VALUES (md5('written-during-the-move')::uuid, $1::text::uuid, 'Written meanwhile?', 'Yes', 'completed')", &page).await;
    let faq: String = s
        .client
        .query_one("SELECT md5('written-during-the-move')::uuid::text", &[])
        .await
        .unwrap()
        .get(0);
    // Past the FAQ's window: the daemon has claimed it by now.
    tokio::time::sleep(DEBOUNCE + Duration::from_secs(1)).await;
    let under_old = s
        .count(&format!(
            "SELECT count(*) FROM tenant_knowledge WHERE source_key = '{faq}' AND tenant_id = '3'"
        ))
        .await;
    assert_eq!(
        under_old, 0,
        "the FAQ was written under the tenant its page is leaving"
    );
    move_tx.commit().await.unwrap();
    wait_for_daemon(
        &s.daemon,
        DEBOUNCE + Duration::from_secs(1),
        "the FAQ under tenant 1",
        || async { s.faqs_found_by("1").await.contains(&faq).then_some(()) },
    )
    .await;
    assert!(!s.faqs_found_by("3").await.contains(&faq));
    s.converged().await;
}

#[tokio::test]
async fn trigger_capture_a_faq_written_while_its_page_moves_is_never_left_with_the_old_tenant() {
    a_faq_written_while_its_page_moves_is_never_left_with_the_old_tenant(false).await;
}

#[tokio::test]
async fn logical_capture_a_faq_written_while_its_page_moves_is_never_left_with_the_old_tenant() {
    a_faq_written_while_its_page_moves_is_never_left_with_the_old_tenant(true).await;
}

#[tokio::test]
async fn the_sweep_finds_and_repairs_related_drift_made_with_kbsync_stopped() {
    let mut s = synced(false, RELATED_FAQ).await;
    s.daemon.terminate(Duration::from_secs(30)).await;
    let (renamed_page, renamed_faqs) = s.page_with_faqs(1).await;
    let (moved_page, moved_faqs) = s.page_with_faqs(3).await;
    // Behind kbsync's back: no trigger fires (a restore, a replica promoted).
    s.client
        .batch_execute(&format!(
            "BEGIN;
             SET LOCAL session_replication_role = replica;
             UPDATE web_knowledge_websitepage SET title = 'Drifted title' WHERE id = '{renamed_page}';
             UPDATE web_knowledge_websitepage SET user_id = 2 WHERE id = '{moved_page}';
             COMMIT;"
        ))
        .await
        .unwrap();
    assert_eq!(
        s.count(
            "SELECT (SELECT count(*) FROM kbsync.changes) + (SELECT count(*) FROM kbsync.outbox)"
        )
        .await,
        0
    );
    let out =
        s.db.kbsync_with_config(s.config.path(), &["reconcile", "--dry-run", "--json"]);
    out.assert_success();
    let report: Report = serde_json::from_str(&out.stdout).unwrap();
    let source = |name: &str| {
        report
            .sources
            .iter()
            .find(|r| r.source == name)
            .unwrap_or_else(|| panic!("no {name} in {report:?}"))
    };
    assert_eq!(source("faq").stale.text, renamed_faqs.len() as u64);
    assert_eq!(source("faq").stale.tenant, moved_faqs.len() as u64);
    assert_eq!(source("faq").missing, 0);
    assert_eq!(source("page").stale.text, 1);
    assert_eq!(source("page").stale.tenant, 1);
    assert_eq!(
        source("faq").queued,
        (renamed_faqs.len() + moved_faqs.len()) as u64,
        "what a real run would queue"
    );

    s.db.kbsync_with_config(s.config.path(), &["reconcile"])
        .assert_success();
    s.daemon = DaemonProcess::start(s.config.path(), s.db.url());
    s.converged().await;
    assert!(moved_faqs.is_subset(&s.faqs_found_by("2").await));
    assert!(moved_faqs.is_disjoint(&s.faqs_found_by("3").await));
}

#[tokio::test]
async fn install_refuses_a_related_key_that_is_not_unique_and_warns_of_a_missing_index() {
    let db = TestDb::create().await.with_demo_schema().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE site (id integer, owner integer, name text);
             CREATE TABLE doc (id integer PRIMARY KEY, site_id integer, body text);",
        )
        .await
        .unwrap();
    let config = TempConfig::new(
        "[embedding]\nprovider = \"openai\"\nmodel = \"m\"\ndimensions = 8\nbase_url = \"http://127.0.0.1:1/v1\"\n\
         [sources.doc]\ntable = \"doc\"\nkey = \"id\"\n\
         related.site = { table = \"site\", foreign_key = \"site_id\", references = \"id\" }\n\
         tenant = { column = \"owner\", via = \"site\" }\ntext = \"{site.name}: {body}\"\n",
    );
    let refused = db.kbsync_with_config(config.path(), &["install"]);
    refused.assert_failure();
    assert!(
        refused
            .stderr
            .contains("sources.doc: related.site: \"site\".id is not unique"),
        "{}",
        refused.stderr
    );
    client
        .batch_execute("ALTER TABLE site ADD PRIMARY KEY (id)")
        .await
        .unwrap();
    let warned = db.kbsync_with_config(config.path(), &["install"]);
    warned.assert_success();
    assert!(
        warned.stderr.contains("warning: sources.doc: no index on")
            && warned
                .stderr
                .contains("CREATE INDEX CONCURRENTLY ON \"doc\" (site_id)"),
        "{}",
        warned.stderr
    );
    client
        .batch_execute("CREATE INDEX ON doc (site_id)")
        .await
        .unwrap();
    let quiet = db.kbsync_with_config(config.path(), &["install"]);
    quiet.assert_success();
    assert!(!quiet.stderr.contains("warning"), "{}", quiet.stderr);
    // A related column the table does not have is named as the config writes it.
    let misspelt = config.edited(&[("{site.name}", "{site.nme}")]);
    let check = kbsync_testkit::run_kbsync(
        misspelt.path(),
        &["config", "check"],
        &[("OPENAI_API_KEY", "sk-test"), ("DATABASE_URL", db.url())],
    );
    check.assert_failure();
    assert!(
        check.stderr.contains(
            "sources.doc: related.site: column nme (site.nme) does not exist in table \"site\""
        ),
        "{}",
        check.stderr
    );
    // The site's triggers watch its key, owner and name: nothing else.
    let check = kbsync_testkit::run_kbsync(
        config.path(),
        &["config", "check"],
        &[("OPENAI_API_KEY", "sk-test"), ("DATABASE_URL", db.url())],
    );
    check.assert_success();
    assert!(
        check
            .stdout
            .contains("watches \"site\" (related site, by site_id): id, name, owner"),
        "{}",
        check.stdout
    );
}
