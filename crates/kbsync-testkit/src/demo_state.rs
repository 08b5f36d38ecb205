//! The demo sources' knowledge table as it must be, computed from the source tables
//! with plain SQL (the test's own reference, independent of kbsync's code), and a
//! deadline-bounded wait until the real table equals it.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_postgres::Client;

use crate::daemon::DaemonProcess;

pub use crate::daemon::TEST_MODEL;
const CONVERGE: Duration = Duration::from_secs(60);

pub type ChunkSet = BTreeSet<(String, String, String, String)>;

/// The FAQ source of a test config, as the reference SQL computes it (`q` the QAPair,
/// `p` its page).
#[derive(Debug, Clone, Copy)]
pub struct FaqReference {
    pub text: &'static str,
    pub filter: &'static str,
}

/// The shipped config's FAQs: their own columns, the tenant through the page.
pub const SHIPPED_FAQ: FaqReference = FaqReference {
    text: r"'Question: ' || q.question || E'\nAnswer: ' || q.answer",
    filter: "q.generation_status = 'completed'",
};

/// FAQs that read their page: its title in the text, its crawl status in the filter.
/// `RELATED_FAQ_EDITS` make the shipped config this.
pub const RELATED_FAQ: FaqReference = FaqReference {
    text: r"'Page: ' || p.title || E'\nQuestion: ' || q.question || E'\nAnswer: ' || q.answer",
    filter: "q.generation_status = 'completed' AND p.crawl_status = 'completed'",
};

/// `TempConfig::edited` pairs that turn the shipped FAQ source into `RELATED_FAQ`.
pub const RELATED_FAQ_EDITS: &[(&str, &str)] = &[
    (
        r#"text = "Question: {question}\nAnswer: {answer}""#,
        r#"text = "Page: {page.title}\nQuestion: {question}\nAnswer: {answer}""#,
    ),
    (
        r#"filter = [{ column = "generation_status", equals = "completed" }]"#,
        r#"filter = [{ column = "generation_status", equals = "completed" }, { column = "page.crawl_status", equals = "completed" }]"#,
    ),
];

/// What tenant_knowledge must hold, computed from the source tables with plain SQL
/// (the demo texts are short: one chunk per row).
pub async fn expected(client: &Client) -> ChunkSet {
    expected_with(client, SHIPPED_FAQ).await
}

/// `expected`, with the FAQs as `faq` says.
pub async fn expected_with(client: &Client, faq: FaqReference) -> ChunkSet {
    let sql = format!(
        r"
        SELECT 'faq', q.id::text, p.user_id::text, btrim({faq_text}, E' \n\t')
          FROM web_knowledge_qapair q JOIN web_knowledge_websitepage p ON p.id = q.page_id
         WHERE {faq_filter}
        UNION ALL
        SELECT 'product', id::text, user_id::text,
               btrim(name || E'\n' || description || E'\nCategory: ' || category || E'\nPrice: ' || coalesce(price::text, '') || ' ' || currency, E' \n\t')
          FROM web_knowledge_product
        UNION ALL
        SELECT 'page', id::text, user_id::text, btrim(title || E'\n\n' || content, E' \n\t')
          FROM web_knowledge_websitepage WHERE crawl_status = 'completed'
        UNION ALL
        SELECT 'manual', user_id::text, user_id::text, btrim(manual_prompt, E' \n\t')
          FROM ai_model_aiprompts",
        faq_text = faq.text,
        faq_filter = faq.filter,
    );
    client
        .query(&sql, &[])
        .await
        .expect("querying the test database")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .filter(|(_, _, _, content): &(String, String, String, String)| !content.is_empty())
        .collect()
}

/// tenant_knowledge as (source, key, tenant, content); panics on anything a correct
/// sync never leaves: a second chunk of a short text, a NULL embedding, a wrong model.
pub async fn actual(client: &Client, model: &str) -> ChunkSet {
    let bad: i64 = client
        .query_one(
            "SELECT count(*) FROM tenant_knowledge
              WHERE chunk_index <> 0 OR embedding IS NULL OR embedding_model IS DISTINCT FROM $1",
            &[&model],
        )
        .await
        .expect("querying the test database")
        .get(0);
    assert_eq!(
        bad, 0,
        "chunks with a NULL embedding, wrong model or unexpected index"
    );
    client
        .query(
            "SELECT source, source_key, tenant_id, content FROM tenant_knowledge",
            &[],
        )
        .await
        .expect("querying the test database")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Outbox entries plus captured changes not collected into the outbox yet.
pub async fn outbox_len(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT (SELECT count(*) FROM kbsync.outbox) + (SELECT count(*) FROM kbsync.changes)",
            &[],
        )
        .await
        .expect("querying the test database")
        .get(0)
}

/// Logical capture: wait until the daemon has decoded everything written to this
/// database so far (the slot's confirmed position passed the WAL position of now) and
/// the collector has folded it into the outbox.
pub async fn decoded(client: &Client, within: Duration) {
    let target: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("querying the test database")
        .get(0);
    let done = tokio::time::timeout(within, async {
        loop {
            let row = client
                .query_one(
                    "SELECT COALESCE((SELECT bool_and(confirmed_flush_lsn >= $1::text::pg_lsn)
                                        FROM pg_replication_slots WHERE database = current_database()), false),
                            (SELECT count(*) FROM kbsync.changes)",
                    &[&target],
                )
                .await
                .expect("querying the test database");
            if row.get::<_, bool>(0) && row.get::<_, i64>(1) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "the slot was not decoded up to {target} within {within:?}"
    );
}

/// Wait until the outbox is drained and the knowledge table is exactly as expected,
/// every chunk embedded by the test server's `test-embedding` model.
pub async fn converged(client: &Client, daemon: &DaemonProcess) {
    converged_with_model(client, daemon, TEST_MODEL).await;
}

/// `converged`, with chunks embedded by `model`.
pub async fn converged_with_model(client: &Client, daemon: &DaemonProcess, model: &str) {
    converged_with(client, daemon, model, SHIPPED_FAQ).await;
}

/// `converged`, with chunks embedded by `model` and the FAQs as `faq` says.
pub async fn converged_with(
    client: &Client,
    daemon: &DaemonProcess,
    model: &str,
    faq: FaqReference,
) {
    let mut last = (ChunkSet::new(), ChunkSet::new());
    let done = tokio::time::timeout(CONVERGE, async {
        loop {
            if outbox_len(client).await == 0 {
                let (want, got) = (
                    expected_with(client, faq).await,
                    actual(client, model).await,
                );
                if want == got {
                    return;
                }
                last = (want, got);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if done.is_err() {
        let (want, got) = last;
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&want).take(5).collect();
        panic!(
            "not converged after {CONVERGE:?}; outbox {}; missing {missing:?}; extra {extra:?}\ndaemon log:\n{}",
            outbox_len(client).await,
            daemon.log()
        );
    }
}

/// `tenant_knowledge.embedding`'s type as PostgreSQL writes it (`halfvec(3072)`), and
/// its HNSW index's operator class and validity.
pub async fn embedding_column_and_index(client: &Client) -> (String, String, bool) {
    let row = client
        .query_one(
            "SELECT format_type(a.atttypid, a.atttypmod), o.opcname::text, i.indisvalid
               FROM pg_attribute a, pg_index i, pg_opclass o
              WHERE a.attrelid = 'public.tenant_knowledge'::regclass AND a.attname = 'embedding'
                AND i.indexrelid = 'public.tenant_knowledge_embedding_hnsw'::regclass
                AND o.oid = i.indclass[0]",
            &[],
        )
        .await
        .expect("the embedding column and its HNSW index");
    (row.get(0), row.get(1), row.get(2))
}
