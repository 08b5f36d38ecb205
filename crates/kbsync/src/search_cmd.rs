//! `kbsync search`: what a tenant's question retrieves — the query embedded with the
//! configured provider, then an exact nearest-neighbour search over that tenant's
//! chunks only (no approximate index: this shows the truth about the knowledge base,
//! and a tenant filter after an HNSW scan could miss a small tenant's rows).

use anyhow::{Context, bail};
use pgvector::Vector;

use kbsync_core::config::Config;
use kbsync_core::embed::Provider;

pub struct Query {
    pub tenant: String,
    pub text: String,
    pub k: i64,
    pub source: Option<String>,
    pub json: bool,
}

pub async fn search(config: &Config, query: Query) -> anyhow::Result<()> {
    if !(1..=100).contains(&query.k) {
        bail!("-k {} is out of range: 1..=100", query.k);
    }
    if query.text.trim().is_empty() {
        bail!("the question is empty");
    }
    if let Some(name) = &query.source {
        config.source_named(name).map_err(anyhow::Error::msg)?;
    }
    let provider = Provider::from_config(config)?;
    let vector = provider
        .embed(std::slice::from_ref(&query.text))
        .await?
        .pop()
        .context("the provider returned no vector")?
        .map_err(|e| anyhow::anyhow!("the provider refused the question: {e}"))?;
    let client = crate::connect(config).await?;
    let rows = client
        .query(
            "WITH mine AS MATERIALIZED (
                SELECT source, source_key, chunk_index, content, embedding, tenant_id
                  FROM public.tenant_knowledge
                 WHERE tenant_id = $1 AND ($2::text IS NULL OR source = $2)
                   AND embedding IS NOT NULL AND embedding_model = $3)
             SELECT source, source_key, chunk_index, content, (1 - (embedding <=> $4))::float8, tenant_id
               FROM mine ORDER BY embedding <=> $4 LIMIT $5",
            &[
                &query.tenant,
                &query.source,
                &provider.model(),
                &Vector::from(vector),
                &query.k,
            ],
        )
        .await
        .map_err(|e| anyhow::anyhow!("searching: {}", kbsync_core::db::describe(&e)))?;
    if query.json {
        let hits: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "source": r.get::<_, String>(0), "key": r.get::<_, String>(1),
                    "chunk": r.get::<_, i32>(2), "content": r.get::<_, String>(3),
                    "score": r.get::<_, f64>(4), "tenant": r.get::<_, String>(5),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no chunks for tenant {:?}{} embedded with {}",
            query.tenant,
            query
                .source
                .as_ref()
                .map(|s| format!(" in source {s}"))
                .unwrap_or_default(),
            provider.model()
        );
    }
    for (rank, r) in rows.iter().enumerate() {
        let content: String = r.get(3);
        let one_line: String = content.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown: String = one_line.chars().take(160).collect();
        println!(
            "{:>2}. {:.4}  {}/{}#{}  {}{}",
            rank + 1,
            r.get::<_, f64>(4),
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i32>(2),
            shown,
            if one_line.chars().count() > 160 {
                "…"
            } else {
                ""
            }
        );
    }
    Ok(())
}
