//! `kbsync install`.

use kbsync_core::config::Config;
use kbsync_core::install::{self, InstallOptions};

pub async fn install(config: &Config, dry_run: bool, reset_embeddings: bool) -> anyhow::Result<()> {
    let mut client = crate::connect(config).await?;
    let options = InstallOptions { reset_embeddings };
    if dry_run {
        let plan = install::plan(&client, config, options).await?;
        if plan.steps.is_empty() {
            println!("-- kbsync install: the database is up to date; nothing to do");
        } else {
            println!(
                "-- kbsync install --dry-run: {} change(s); nothing was executed",
                plan.steps.len()
            );
            print!("{}", plan.script());
        }
        return Ok(());
    }
    let plan = install::apply(&mut client, config, options).await?;
    if plan.steps.is_empty() {
        println!("kbsync install: the database is up to date; nothing to do");
    } else {
        println!("kbsync install: {} change(s) applied:", plan.steps.len());
        for step in &plan.steps {
            println!("  - {}", step.description);
        }
    }
    Ok(())
}
