//! `kbsync demo schema|data`: tables shaped like the original Django models, and
//! deterministic rows for them.

use anyhow::Context;
use kbsync_core::config::Config;

const SCHEMA: &str = include_str!("../../../sql/demo/schema.sql");
const DATA: &str = include_str!("../../../sql/demo/data.sql");

pub async fn schema(config: &Config) -> anyhow::Result<()> {
    let client = crate::connecting::connect(config).await?;
    client
        .batch_execute(SCHEMA)
        .await
        .context("creating the demo tables")?;
    println!("demo tables ready");
    Ok(())
}

pub async fn data(config: &Config) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect(config).await?;
    let tx = client.transaction().await?;
    tx.batch_execute(DATA)
        .await
        .context("inserting demo rows (run `kbsync demo schema` first)")?;
    let counts = tx
        .query_one(
            "SELECT (SELECT count(*) FROM accounts_user), (SELECT count(*) FROM web_knowledge_product),
                    (SELECT count(*) FROM web_knowledge_websitepage), (SELECT count(*) FROM web_knowledge_qapair),
                    (SELECT count(*) FROM ai_model_aiprompts)",
            &[],
        )
        .await?;
    tx.commit().await?;
    println!(
        "demo rows: {} tenants, {} products, {} pages, {} FAQ pairs, {} prompts",
        counts.get::<_, i64>(0),
        counts.get::<_, i64>(1),
        counts.get::<_, i64>(2),
        counts.get::<_, i64>(3),
        counts.get::<_, i64>(4)
    );
    Ok(())
}
