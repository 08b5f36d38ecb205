//! `kbsync adopt`: reuse the vectors an earlier system already paid for (see
//! `kbsync_core::model::adopt`), and `kbsync adopt --clear`.

use anyhow::bail;
use kbsync_core::config::Config;
use kbsync_core::config::sql_ident::{Ident, TableName};
use kbsync_core::model::adopt::{self, AdoptReport, ModelOf, OldTable};

/// `kbsync adopt`'s options.
#[derive(clap::Args)]
pub struct AdoptArgs {
    /// The old table: `table` or `schema.table`.
    #[arg(long, required_unless_present = "clear")]
    table: Option<String>,
    /// Its column with the chunk text.
    #[arg(long, default_value = "content")]
    content_column: String,
    /// Its pgvector column.
    #[arg(long, default_value = "embedding")]
    embedding_column: String,
    /// Its column naming the model each vector was made with.
    #[arg(long, conflicts_with = "all_made_with")]
    model_column: Option<String>,
    /// The table records no model: every vector in it was made with MODEL (which must
    /// be the configured embedding.model).
    #[arg(long, value_name = "MODEL")]
    all_made_with: Option<String>,
    /// Count what would be adopted and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Forget every adopted embedding instead (they are no longer needed once the first
    /// sync has stored them as chunks).
    #[arg(long, conflicts_with_all = ["table", "model_column", "all_made_with", "dry_run"])]
    clear: bool,
}

pub async fn adopt(config: &Config, request: AdoptArgs) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect_installed(config).await?;
    if request.clear {
        let removed = adopt::clear(&client).await?;
        println!("kbsync adopt --clear: {removed} adopted embeddings forgotten");
        return Ok(());
    }
    let Some(table) = request.table else {
        bail!("name the old table with --table (or forget earlier adoptions with --clear)");
    };
    let model = match (request.model_column, request.all_made_with) {
        (Some(column), None) => ModelOf::Column(Ident::new(&column)?),
        (None, Some(model)) => ModelOf::Every(model),
        _ => bail!(
            "say which model made the old vectors: --model-column COLUMN (the table records it per row) or --all-made-with MODEL (it does not; every vector was made with MODEL)"
        ),
    };
    let old = OldTable {
        table: TableName::parse(&table)?,
        content: Ident::new(&request.content_column)?,
        embedding: Ident::new(&request.embedding_column)?,
        model,
    };
    let report = adopt::adopt(
        &mut client,
        config,
        &old,
        request.dry_run,
        &crate::progress_bar::Bar::new(),
    )
    .await?;
    if request.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn render(r: &AdoptReport) -> String {
    let verb = if r.dry_run { "would adopt" } else { "adopted" };
    let mut out = format!(
        "kbsync adopt: {verb} {} embeddings of model {:?} ({} dimensions) from {}\n",
        r.adopted, r.model, r.dimensions, r.table
    );
    for (what, n) in [
        ("chunk texts the sources produce today", r.texts),
        ("already embedded with this model", r.already_embedded),
        ("adopted now", r.adopted),
        ("to embed on the first sync", r.to_embed),
    ] {
        out.push_str(&format!("  {what:<40}{n:>10}\n"));
    }
    out.push_str(&format!(
        "  old rows: {} read; not taken: {} without an embedding, {} of another model, {} of another dimension, {} whose text no chunk has today (or already embedded)\n",
        r.old_rows,
        r.skipped_no_embedding,
        r.skipped_other_model,
        r.skipped_other_dimension,
        r.skipped_text_not_needed
    ));
    if r.dry_run {
        out.push_str("  dry run: nothing was changed\n");
    }
    out
}
