//! Retrieval for applications: `kbsync.search()`, a SQL function `kbsync install`
//! creates from the config, ranks one tenant's chunks by vector similarity, by
//! full-text relevance, or by both fused with reciprocal rank fusion. Everything that
//! searches goes through it: `kbsync search`, `POST /v1/search`, and any application
//! that embeds its query itself.
//!
//! The vector ranking asks the HNSW index first; when that yields fewer candidates
//! than wanted (a small tenant, whose rows the approximate graph walk can pass over
//! when it filters by tenant afterwards, or a narrow filter) it scans the tenant's
//! chunks exactly if they are few (`EXACT_UP_TO`) or the index found fewer than k.
//! The full-text ranking uses each chunk's own text search configuration (its
//! source's `text_search`) and the narrow terms table of migration 0009.

pub mod index;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use pgvector::Vector;
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use crate::config::Config;
use crate::config::sql_ident::Ident;

/// How chunks are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cosine similarity of the embeddings: paraphrases, other wordings.
    Vector,
    /// Full-text relevance (`websearch_to_tsquery`, `ts_rank`): exact terms,
    /// product codes, names, error numbers.
    Text,
    /// Both rankings fused by reciprocal rank fusion.
    #[default]
    Hybrid,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vector => "vector",
            Self::Text => "text",
            Self::Hybrid => "hybrid",
        }
    }

    /// Whether the query must be embedded.
    pub fn needs_vector(self) -> bool {
        self != Self::Text
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vector" => Ok(Self::Vector),
            "text" => Ok(Self::Text),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!("mode {other:?} is not one of vector, text, hybrid")),
        }
    }
}

/// The most chunks one search returns.
pub const MAX_K: i32 = 1000;

/// A tenant (within a search's filters) with at most this many chunks is scanned
/// exactly when the HNSW index returns fewer candidates than asked: an exact scan
/// of 20,000 chunks of 384 dimensions takes about 30 ms here. A larger tenant is
/// scanned exactly only when the index found fewer than k.
pub const EXACT_UP_TO: u32 = 20_000;

/// One search, as the function takes it.
#[derive(Debug, Clone)]
pub struct Query {
    pub tenant: String,
    pub text: String,
    /// The query embedded with the configured model; required unless `mode` is text.
    pub vector: Option<Vector>,
    pub k: i32,
    pub mode: Mode,
    /// Only these sources (all when None).
    pub sources: Option<Vec<String>>,
    /// Only chunks whose metadata contains this JSON object (`@>`).
    pub metadata: Option<serde_json::Value>,
}

/// One ranked chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// Always the tenant searched: shown so a caller can check it.
    pub tenant: String,
    pub source: String,
    pub key: String,
    pub chunk: i32,
    pub content: String,
    pub metadata: serde_json::Value,
    /// The fused score (reciprocal rank fusion over the rankings the chunk is in).
    pub score: f64,
    /// Its place in the vector ranking (1 = nearest) and its cosine similarity.
    pub vector_rank: Option<i64>,
    pub vector_similarity: Option<f64>,
    /// Its place in the full-text ranking and its `ts_rank`.
    pub text_rank: Option<i64>,
    pub text_score: Option<f32>,
}

/// Run `kbsync.search()`. Errors the function raises for bad arguments have SQLSTATE
/// class 22 (data exception) and say what is wrong.
pub async fn search(
    client: &impl GenericClient,
    query: &Query,
) -> Result<Vec<Hit>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT tenant_id, source, source_key, chunk_index, content, metadata, score,
                    vector_rank, vector_similarity, text_rank, text_score
               FROM kbsync.search($1, $2, $3, $4, $5, $6, $7)",
            &[
                &query.tenant,
                &query.text,
                &query.vector,
                &query.k,
                &query.mode.as_str(),
                &query.sources,
                &query.metadata,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Hit {
            tenant: r.get(0),
            source: r.get(1),
            key: r.get(2),
            chunk: r.get(3),
            content: r.get(4),
            metadata: r.get(5),
            score: r.get(6),
            vector_rank: r.get(7),
            vector_similarity: r.get(8),
            text_rank: r.get(9),
            text_score: r.get(10),
        })
        .collect())
}

/// The text search configurations the configured sources use.
fn text_search_configs(config: &Config) -> BTreeSet<Ident> {
    config
        .sources()
        .iter()
        .map(|s| s.text_search.clone())
        .collect()
}

/// `CREATE OR REPLACE FUNCTION kbsync.search(...)` for this config: its text search
/// configurations and the `[search]` defaults are written into it.
pub fn function_sql(config: &Config) -> String {
    let configs: Vec<String> = text_search_configs(config)
        .iter()
        .map(|c| format!("({}::regconfig)", c.as_literal()))
        .collect();
    format!(
        r#"CREATE OR REPLACE FUNCTION kbsync.search(
    tenant text,
    query_text text,
    query_vector vector,
    k integer DEFAULT 10,
    mode text DEFAULT 'hybrid',
    sources text[] DEFAULT NULL,
    metadata_filter jsonb DEFAULT NULL,
    candidates integer DEFAULT {candidates},
    rrf_k integer DEFAULT {rrf_k})
RETURNS TABLE (tenant_id text, source text, source_key text, chunk_index integer, content text, metadata jsonb,
               score double precision, vector_rank bigint, vector_similarity double precision,
               text_rank bigint, text_score real)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public
AS $kbsync$
#variable_conflict use_column
DECLARE
    caller_ef_search text;
    vector_ids bigint[];
    vector_sims double precision[];
    text_ids bigint[];
    text_scores real[];
BEGIN
    IF tenant IS NULL THEN
        RAISE EXCEPTION 'kbsync.search: tenant is required' USING ERRCODE = '22004';
    END IF;
    IF mode IS NULL OR mode NOT IN ('vector', 'text', 'hybrid') THEN
        RAISE EXCEPTION 'kbsync.search: mode must be vector, text or hybrid, not %', coalesce(mode, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF k IS NULL OR k < 1 OR k > {max_k} THEN
        RAISE EXCEPTION 'kbsync.search: k must be between 1 and {max_k}, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF mode <> 'text' AND query_vector IS NULL THEN
        RAISE EXCEPTION 'kbsync.search: mode % needs query_vector, the query embedded with the model kbsync uses', mode
            USING ERRCODE = '22004';
    END IF;
    IF mode <> 'vector' AND coalesce(btrim(query_text), '') = '' THEN
        RAISE EXCEPTION 'kbsync.search: mode % needs query_text', mode USING ERRCODE = '22004';
    END IF;
    candidates := greatest(coalesce(candidates, {candidates}), k);

    IF mode <> 'text' THEN
        -- The HNSW index filters by tenant after its graph walk: ask for more (and
        -- give the caller's transaction its own setting back afterwards).
        caller_ef_search := current_setting('hnsw.ef_search', true);
        PERFORM set_config('hnsw.ef_search', least(greatest(4 * candidates, 40), 1000)::text, true);
        SELECT array_agg(c.id ORDER BY c.distance, c.source, c.source_key, c.chunk_index),
               array_agg(1 - c.distance ORDER BY c.distance, c.source, c.source_key, c.chunk_index)
          INTO vector_ids, vector_sims
          FROM (SELECT t.id, t.source, t.source_key, t.chunk_index, t.embedding <=> query_vector AS distance
                  FROM public.tenant_knowledge t
                 WHERE {scope} AND t.embedding IS NOT NULL
                 ORDER BY t.embedding <=> query_vector
                 LIMIT candidates) c;
        IF coalesce(cardinality(vector_ids), 0) < k
           OR (coalesce(cardinality(vector_ids), 0) < candidates
               AND (SELECT count(*) FROM (SELECT 1 FROM public.tenant_knowledge t
                                           WHERE {scope} AND t.embedding IS NOT NULL
                                           LIMIT {exact_up_to} + 1) small) <= {exact_up_to}) THEN
            -- Fewer than asked: a small tenant or a narrow filter, which the approximate
            -- walk may have passed over. Scan the tenant's chunks exactly when they are
            -- few (cheap), or when the index did not even find k.
            SELECT array_agg(c.id ORDER BY c.distance, c.source, c.source_key, c.chunk_index),
                   array_agg(1 - c.distance ORDER BY c.distance, c.source, c.source_key, c.chunk_index)
              INTO vector_ids, vector_sims
              FROM (SELECT x.id, x.source, x.source_key, x.chunk_index, x.distance
                      FROM (SELECT t.id, t.source, t.source_key, t.chunk_index,
                                   t.embedding <=> query_vector AS distance
                              FROM public.tenant_knowledge t
                             WHERE {scope} AND t.embedding IS NOT NULL
                            OFFSET 0) x
                     ORDER BY x.distance, x.source, x.source_key, x.chunk_index
                     LIMIT candidates) c;
        END IF;
        PERFORM set_config('hnsw.ef_search', coalesce(caller_ef_search, '40'), true);
    END IF;

    IF mode <> 'vector' THEN
        -- The narrow terms table (migration 0009): a common word matches tens of
        -- thousands of chunks, each ranked; tenant_knowledge's rows carry their vectors.
        -- Ties are ranked by the chunk's key, not its id, so that the same data ranks
        -- the same way whatever order it was written in.
        SELECT array_agg(c.id ORDER BY c.relevance DESC, t.source, t.source_key, t.chunk_index),
               array_agg(c.relevance ORDER BY c.relevance DESC, t.source, t.source_key, t.chunk_index)
          INTO text_ids, text_scores
          FROM (SELECT w.id, ts_rank(w.content_tsv, q.tsq) AS relevance
                  FROM (VALUES {configs}) AS cfg(name)
                 CROSS JOIN LATERAL (SELECT websearch_to_tsquery(cfg.name, query_text) AS tsq) q
                  JOIN kbsync.knowledge_terms w
                    ON w.text_search_config = cfg.name AND w.content_tsv @@ q.tsq
                 WHERE w.tenant_id = tenant
                   AND (sources IS NULL OR w.source = ANY (sources))
                   AND (metadata_filter IS NULL
                        OR EXISTS (SELECT 1 FROM public.tenant_knowledge t
                                    WHERE t.id = w.id AND t.metadata @> metadata_filter))
                 ORDER BY relevance DESC, w.id
                 LIMIT candidates) c
          JOIN public.tenant_knowledge t ON t.id = c.id;
    END IF;

    RETURN QUERY
    WITH by_vector AS (
             SELECT v.id, v.similarity, v.place FROM unnest(vector_ids, vector_sims) WITH ORDINALITY AS v(id, similarity, place)),
         by_text AS (
             SELECT x.id, x.relevance, x.place FROM unnest(text_ids, text_scores) WITH ORDINALITY AS x(id, relevance, place)),
         fused AS (
             SELECT coalesce(v.id, x.id) AS id, v.place AS vector_place, v.similarity, x.place AS text_place, x.relevance,
                    coalesce(1.0 / (rrf_k + v.place), 0) + coalesce(1.0 / (rrf_k + x.place), 0) AS fused_score
               FROM by_vector v FULL JOIN by_text x ON x.id = v.id)
    SELECT t.tenant_id, t.source, t.source_key, t.chunk_index, t.content, t.metadata, f.fused_score::double precision,
           f.vector_place, f.similarity, f.text_place, f.relevance
      FROM fused f JOIN public.tenant_knowledge t ON t.id = f.id AND t.tenant_id = tenant
     ORDER BY f.fused_score DESC, t.source, t.source_key, t.chunk_index
     LIMIT k;
END
$kbsync$"#,
        // Every ranking reads only the tenant's chunks, within the request's filters.
        scope = "t.tenant_id = tenant
                   AND (sources IS NULL OR t.source = ANY (sources))
                   AND (metadata_filter IS NULL OR t.metadata @> metadata_filter)",
        candidates = config.search.candidates,
        exact_up_to = EXACT_UP_TO,
        rrf_k = config.search.rrf_k,
        max_k = MAX_K,
        configs = configs.join(", "),
    )
}

/// Row-level security on tenant_knowledge and its terms (kbsync.knowledge_terms): a role that does not own the table (and is
/// no superuser) reads only the rows of the tenant its session names with
/// `SET kbsync.tenant = '...'`; with no tenant set, none. Nobody but the owner
/// (kbsync) writes it.
pub const ROW_LEVEL_SECURITY_SQL: &str =
    "ALTER TABLE public.tenant_knowledge ENABLE ROW LEVEL SECURITY;
CREATE POLICY kbsync_tenant_isolation ON public.tenant_knowledge FOR SELECT
    USING (tenant_id = current_setting('kbsync.tenant', true));
ALTER TABLE kbsync.knowledge_terms ENABLE ROW LEVEL SECURITY;
CREATE POLICY kbsync_tenant_isolation ON kbsync.knowledge_terms FOR SELECT
    USING (tenant_id = current_setting('kbsync.tenant', true))";

/// Undoes `ROW_LEVEL_SECURITY_SQL`.
pub const NO_ROW_LEVEL_SECURITY_SQL: &str =
    "DROP POLICY IF EXISTS kbsync_tenant_isolation ON public.tenant_knowledge;
ALTER TABLE public.tenant_knowledge DISABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS kbsync_tenant_isolation ON kbsync.knowledge_terms;
ALTER TABLE kbsync.knowledge_terms DISABLE ROW LEVEL SECURITY";

/// The configured text search configurations that this database does not have.
pub async fn unknown_text_search_configs(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT name FROM unnest($1::text[]) AS name
              WHERE NOT EXISTS (SELECT 1 FROM pg_ts_config
                                 WHERE cfgname = name AND pg_ts_config_is_visible(oid))
              ORDER BY name",
            &[&text_search_configs(config)
                .iter()
                .map(Ident::as_str)
                .collect::<Vec<_>>()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
