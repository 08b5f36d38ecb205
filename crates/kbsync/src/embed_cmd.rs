//! `kbsync embed TEXT`: embed one text with the configured provider and show what came
//! back — a quick check that a provider is set up right.

use std::time::Instant;

use kbsync_core::config::Config;
use kbsync_core::sync::embed::Provider;

pub async fn embed(config: &Config, text: &str) -> anyhow::Result<()> {
    let provider = Provider::from_config(config)?;
    let started = Instant::now();
    let vector = provider.embed_one(text).await?;
    let latency = started.elapsed();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    let first: Vec<String> = vector.iter().take(8).map(|x| format!("{x:.6}")).collect();
    println!("model      {}", provider.model());
    println!("dimension  {}", vector.len());
    println!("norm       {norm:.6}");
    println!(
        "first      [{}{}]",
        first.join(", "),
        if vector.len() > 8 { ", ..." } else { "" }
    );
    println!("latency    {:.1} ms", latency.as_secs_f64() * 1000.0);
    Ok(())
}
