//! `kbsync model plan`: what a change of embedding model would cost (see
//! `kbsync_core::model_plan`).

use kbsync_core::config::Config;
use kbsync_core::model_plan::{self, ModelPlan};

pub async fn plan(config: &Config, json: bool) -> anyhow::Result<()> {
    let client = crate::connect_installed(config).await?;
    let plan = model_plan::plan(&client, config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render(&plan));
    }
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
