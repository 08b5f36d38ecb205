//! `kbsync uninstall`: what `kbsync install` made, removed (see `kbsync_core::schema::uninstall`).

use kbsync_core::config::Config;
use kbsync_core::schema::uninstall;

pub async fn uninstall(config: &Config, dry_run: bool, drop_knowledge: bool) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect(config).await?;
    const NOTHING: &str = "nothing of kbsync is in this database";
    if dry_run {
        let plan = uninstall::plan(&client, config, drop_knowledge).await?;
        crate::install_cmd::print_dry_run("uninstall", &plan, NOTHING);
        return Ok(());
    }
    let plan = uninstall::apply(&mut client, config, drop_knowledge).await?;
    crate::install_cmd::print_applied("uninstall", &plan, NOTHING);
    if plan.steps.is_empty() {
        return Ok(());
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
