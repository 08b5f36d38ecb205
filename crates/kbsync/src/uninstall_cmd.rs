//! `kbsync uninstall`: what `kbsync install` made, removed (see `kbsync_core::uninstall`).

use kbsync_core::config::Config;
use kbsync_core::uninstall;

pub async fn uninstall(config: &Config, dry_run: bool, drop_knowledge: bool) -> anyhow::Result<()> {
    let mut client = crate::connect(config).await?;
    if dry_run {
        let plan = uninstall::plan(&client, config, drop_knowledge).await?;
        if plan.steps.is_empty() {
            println!("-- kbsync uninstall: nothing of kbsync is in this database");
        } else {
            println!(
                "-- kbsync uninstall --dry-run: {} change(s); nothing was executed",
                plan.steps.len()
            );
            print!("{}", plan.script());
        }
        return Ok(());
    }
    let plan = uninstall::apply(&mut client, config, drop_knowledge).await?;
    if plan.steps.is_empty() {
        println!("kbsync uninstall: nothing of kbsync is in this database");
        return Ok(());
    }
    println!("kbsync uninstall: {} change(s) applied:", plan.steps.len());
    for step in &plan.steps {
        println!("  - {}", step.description);
    }
    if !drop_knowledge {
        let kept: Option<i64> = client
            .query_one(
                "SELECT CASE WHEN to_regclass('public.tenant_knowledge') IS NOT NULL
                             THEN (SELECT count(*) FROM public.tenant_knowledge) END",
                &[],
            )
            .await?
            .get(0);
        if let Some(chunks) = kept {
            println!(
                "tenant_knowledge is kept ({chunks} chunks, no longer kept in sync); `kbsync uninstall --drop-knowledge` drops it (a later `kbsync install` needs it gone or renamed)"
            );
        }
    }
    Ok(())
}
