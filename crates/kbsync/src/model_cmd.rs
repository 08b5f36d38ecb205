//! `kbsync model`: what a change of embedding model would cost (`plan`, see
//! `kbsync_core::model::plan`), and the blue/green migration itself (`start`, `status`,
//! `cutover`, `rollback`, `finish`, see `kbsync_core::model::migration`).

use std::io::IsTerminal;
use std::time::Duration;

use kbsync_core::config::Config;
use kbsync_core::model::migration::{self, Phase, Progress};
use kbsync_core::model::plan::{self, ModelPlan};

pub async fn plan(config: &Config, json: bool) -> anyhow::Result<()> {
    let client = crate::connecting::connect_installed(config).await?;
    let plan = plan::plan(&client, config, &crate::progress_bar::Bar::new()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render(&plan));
    }
    Ok(())
}

pub async fn start(config: &Config) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect_installed(config).await?;
    let state = match migration::start(&mut client, config).await? {
        migration::Started::Began(state) => state,
        migration::Started::AlreadyFilling(state) => {
            println!(
                "kbsync model start: the migration {} -> {} is already filling; nothing to do (`kbsync model status` shows its progress)",
                state.from_model, state.to_model
            );
            return Ok(());
        }
    };
    println!(
        "kbsync model start: {} -> {} ({} dimensions) begun.\n  \
         Applications go on reading {}'s vectors; a running daemon fills in {}'s beside them, the newest chunks first, and gives every chunk written from now on both.\n  \
         Follow it with `kbsync model status`; when nothing is missing, `kbsync model cutover`.",
        state.from_model, state.to_model, state.to_dimensions, state.from_model, state.to_model
    );
    Ok(())
}

pub async fn status(config: &Config, json: bool, watch: bool) -> anyhow::Result<()> {
    let client = crate::connecting::connect_installed(config).await?;
    if json {
        let progress = migration::progress(&client).await?;
        println!("{}", serde_json::to_string_pretty(&progress)?);
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    loop {
        let progress = migration::progress(&client).await?;
        let text = render_progress(&progress, terminal);
        if watch && terminal {
            // Redraw in place.
            print!("\x1b[2J\x1b[H{text}");
        } else {
            print!("{text}");
        }
        if !watch || progress.filling_column.is_none() || progress.chunks_missing == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn render_progress(p: &Progress, terminal: bool) -> String {
    let s = &p.state;
    let mut out = format!(
        "kbsync model migration: {} -> {} ({} dimensions), {}\n",
        s.from_model,
        s.to_model,
        s.to_dimensions,
        s.phase_words()
    );
    if let (Some(column), Some(model)) = (p.filling_column, &p.filling_model) {
        let done = p.chunks - p.chunks_missing;
        let share = if p.chunks > 0 {
            done as f64 / p.chunks as f64
        } else {
            1.0
        };
        if terminal {
            let filled = (share * 30.0).round() as usize;
            out.push_str(&format!(
                "  [{}{}] {:.1}%\n",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                share * 100.0
            ));
        }
        out.push_str(&format!(
            "  {column} ({model}): {done} of {} chunks have a vector; missing {} chunks, {} distinct texts\n",
            p.chunks, p.chunks_missing, p.texts_missing
        ));
        match (p.texts_per_second, p.eta_seconds) {
            (Some(rate), Some(eta)) if p.texts_missing > 0 => out.push_str(&format!(
                "  rate {rate:.1} texts/s; about {} left\n",
                duration(eta)
            )),
            _ if p.texts_missing > 0 => out.push_str(
                "  rate: nothing embedded yet (is a daemon running? it fills the column)\n",
            ),
            _ => {}
        }
        if let Some(valid) = p.other_index_valid {
            out.push_str(&format!(
                "  its HNSW index: {}\n",
                if valid { "valid" } else { "being built" }
            ));
        }
    }
    out.push_str(&format!(
        "  sent for {}: {} texts, {} tokens, {} requests; for {}: {} texts, {} tokens, {} requests\n",
        s.to_model,
        s.to_texts,
        s.to_tokens,
        s.to_requests,
        s.from_model,
        s.from_texts,
        s.from_tokens,
        s.from_requests
    ));
    out.push_str(match s.phase {
        Phase::Filling if p.chunks_missing == 0 => "  next: `kbsync model cutover`\n",
        Phase::Filling => "  next: wait until nothing is missing, then `kbsync model cutover`\n",
        Phase::CutOver => {
            "  next: `kbsync model finish` (drops the old vectors), or `kbsync model rollback`\n"
        }
        Phase::Finished => {
            "  next: put the new model's settings in [embedding] and remove [next_embedding]\n"
        }
    });
    out
}

pub async fn cutover(config: &Config) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect_installed(config).await?;
    let state = migration::cutover(&mut client).await?;
    println!(
        "kbsync model cutover: tenant_knowledge.embedding now holds {}'s vectors ({} dimensions), in one transaction, with its HNSW index.\n  \
         Applications that embed their queries themselves must embed them with {} from now on; kbsync search and POST /v1/search already do.\n  \
         {}'s vectors are kept current in embedding_previous: `kbsync model rollback` goes back at no cost, `kbsync model finish` drops them.",
        state.to_model, state.to_dimensions, state.to_model, state.from_model
    );
    Ok(())
}

pub async fn rollback(config: &Config) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect_installed(config).await?;
    match migration::rollback(&mut client).await? {
        Some(state) => println!(
            "kbsync model rollback: tenant_knowledge.embedding holds {}'s vectors again; no embedding was requested.\n  \
             {}'s are kept in embedding_next and kept current: `kbsync model cutover` again when you want them.",
            state.from_model, state.to_model
        ),
        None => println!(
            "kbsync model rollback: the migration is abandoned and embedding_next dropped; the new model's vectors are kept in kbsync.adopted_embeddings, so a later `kbsync model start` sends only texts changed since."
        ),
    }
    Ok(())
}

pub async fn finish(config: &Config) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect_installed(config).await?;
    let state = migration::finish(&mut client).await?;
    println!(
        "kbsync model finish: {}'s vectors and their index are dropped; tenant_knowledge has one vector column, {}'s.\n  \
         Now put {}'s settings in [embedding] and remove [next_embedding] (the daemons go on meanwhile, embedding with {}).",
        state.from_model, state.to_model, state.to_model, state.to_model
    );
    Ok(())
}

fn render(p: &ModelPlan) -> String {
    let mut out = format!(
        "kbsync model plan: {} -> {} ({} dimensions)\n",
        p.from_model, p.to_model, p.to_dimensions
    );
    for (what, n) in [
        ("chunk texts, cut for the new model", Some(p.texts)),
        ("  of them cut differently than today", Some(p.texts_recut)),
        (
            "already embedded with the new model",
            Some(p.already_embedded),
        ),
        ("to embed", Some(p.to_embed)),
        (
            "tokens to embed (the new model's tokenizer)",
            Some(p.tokens_to_embed),
        ),
        ("requests", p.requests),
    ] {
        if let Some(n) = n {
            out.push_str(&format!("  {what:<46}{n:>12}\n"));
        }
    }
    out.push_str("  by source (a text two sources share is embedded once):\n");
    for s in &p.sources {
        out.push_str(&format!(
            "    {:<20}{:>8} texts{:>8} to embed{:>10} tokens\n",
            s.source, s.texts, s.to_embed, s.tokens_to_embed
        ));
    }
    let limits: Vec<String> = p
        .requests_per_minute
        .map(|r| format!("{r} requests/min"))
        .into_iter()
        .chain(p.tokens_per_minute.map(|t| format!("{t} tokens/min")))
        .collect();
    out.push_str(&match (p.least_seconds_at_rate_limits, p.requests) {
        (Some(s), _) => format!(
            "  least time at the rate limits ({}): {}\n",
            limits.join(", "),
            duration(s)
        ),
        (None, Some(_)) => "  no rate limit in [next_embedding] (requests_per_minute, tokens_per_minute): as fast as the provider answers\n".to_owned(),
        (None, None) => "  the local model: embedded on this machine's CPU, no requests\n".to_owned(),
    });
    out.push_str("  nothing was sent and nothing was changed\n");
    out
}

/// `s` seconds as hours, minutes and seconds.
fn duration(s: f64) -> String {
    let s = s.ceil() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec} s"),
        (0, min, sec) => format!("{min} min {sec} s"),
        (h, min, _) => format!("{h} h {min} min"),
    }
}
