//! `kbsync search`: what a tenant's question retrieves, through `kbsync.search()` — the
//! same ranking applications get from the SQL function and `POST /v1/search`.

use anyhow::bail;
use pgvector::Vector;

use kbsync_core::config::Config;
use kbsync_core::model::migration;
use kbsync_core::search::{self, MAX_K, Mode};
use kbsync_core::sync::embed::Provider;

pub struct Query {
    pub tenant: String,
    pub text: String,
    pub k: i32,
    pub source: Option<String>,
    pub mode: Mode,
    pub json: bool,
}

pub async fn search(config: &Config, query: Query) -> anyhow::Result<()> {
    if !(1..=MAX_K).contains(&query.k) {
        bail!("-k {} is out of range: 1..={MAX_K}", query.k);
    }
    if query.text.trim().is_empty() {
        bail!("the question is empty");
    }
    if let Some(name) = &query.source {
        config.source_named(name).map_err(anyhow::Error::msg)?;
    }
    let client = crate::connecting::connect(config).await?;
    // The query is embedded with the model `embedding` holds: [next_embedding]'s after
    // a model cut-over.
    let vector = if query.mode.needs_vector() {
        let models = migration::current_models(&client, config).await?;
        let provider = Provider::from_config(&migration::with_model(config, &models))?;
        Some(Vector::from(provider.embed_one(&query.text).await?))
    } else {
        None
    };
    let hits = search::search(
        &client,
        &search::Query {
            tenant: query.tenant.clone(),
            text: query.text.clone(),
            vector,
            k: query.k,
            mode: query.mode,
            sources: query.source.clone().map(|s| vec![s]),
            metadata: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("searching: {}", kbsync_core::db::describe(&e)))?;
    if query.json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!(
            "no {} match for tenant {:?}{}",
            query.mode,
            query.tenant,
            query
                .source
                .as_ref()
                .map(|s| format!(" in source {s}"))
                .unwrap_or_default()
        );
    }
    for (rank, hit) in hits.iter().enumerate() {
        let one_line: String = hit.content.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown: String = one_line.chars().take(160).collect();
        let ranks = match (hit.vector_similarity, hit.text_rank) {
            (Some(similarity), Some(text)) => format!("cosine {similarity:.4}, text #{text}"),
            (Some(similarity), None) => format!("cosine {similarity:.4}"),
            (None, Some(text)) => format!("text #{text}"),
            (None, None) => String::new(),
        };
        println!(
            "{:>2}. {}/{}#{}  ({ranks})  {}{}",
            rank + 1,
            hit.source,
            hit.key,
            hit.chunk,
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
