//! `kbsync uninstall`: everything `kbsync install` made, removed — the capture triggers
//! and their functions, the publication and the replication slot, the `kbsync` schema —
//! planned against the catalog like an install; `tenant_knowledge` is kept unless asked.

use tokio_postgres::{Client, GenericClient};

use crate::capture::logical;
use crate::config::Config;
use crate::config::sql_ident::quote_literal;
use crate::schema::install::{InstallError, InstallPlan};

/// What `uninstall` would remove. Refused while a daemon runs (it would recreate what it
/// holds, and its slot cannot be dropped).
pub async fn plan(
    client: &impl GenericClient,
    config: &Config,
    drop_knowledge: bool,
) -> Result<InstallPlan, InstallError> {
    if crate::db::advisory_locks::held(client, crate::db::advisory_locks::DAEMON).await? {
        return Err(InstallError::Refused(
            "a kbsync daemon is running against this database (`kbsync status` counts them): stop every daemon first (systemctl stop kbsync)".into(),
        ));
    }
    let mut plan = InstallPlan::default();
    let triggers = crate::schema::install::installed_capture_triggers(client).await?;
    for (name, table, _, _) in &triggers {
        plan.push(
            format!("drop capture trigger {name} on {table}"),
            format!("DROP TRIGGER \"{name}\" ON {table}"),
        );
    }
    let publication = logical::PUBLICATION;
    let has_publication = crate::schema::install::has_publication(client).await?;
    if has_publication {
        plan.push(
            format!("drop publication {publication}"),
            format!("DROP PUBLICATION {publication}"),
        );
    }
    let knowledge_exists: bool = client
        .query_one(
            "SELECT to_regclass('public.tenant_knowledge') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if knowledge_exists && drop_knowledge {
        plan.push(
            "drop tenant_knowledge (every chunk and embedding)",
            "DROP TABLE public.tenant_knowledge",
        );
    } else if knowledge_exists {
        let policy: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_policy
                                 WHERE polrelid = 'public.tenant_knowledge'::regclass
                                   AND polname = 'kbsync_tenant_isolation')",
                &[],
            )
            .await?
            .get(0);
        if policy {
            plan.push(
                "drop kbsync's row-level security policy on tenant_knowledge",
                "DROP POLICY kbsync_tenant_isolation ON public.tenant_knowledge;
ALTER TABLE public.tenant_knowledge DISABLE ROW LEVEL SECURITY",
            );
        }
    }
    let has_schema: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'kbsync')",
            &[],
        )
        .await?
        .get(0);
    if has_schema {
        plan.push(
            "drop schema kbsync (change log, outbox, dead letters, sweeps, search function, terms, migrations)",
            "DROP SCHEMA kbsync CASCADE",
        );
    }
    let slot = logical::slot_name(client, config).await?;
    if let Some(state) = logical::slot_state(client, &slot).await? {
        if state.active {
            return Err(InstallError::SlotActive { slot });
        }
        plan.push_outside_transaction(
            format!("drop replication slot {slot}"),
            format!(
                "SELECT pg_drop_replication_slot({})",
                quote_literal(&slot).map_err(|e| InstallError::Refused(e.to_string()))?
            ),
        );
    }
    Ok(plan)
}

/// Plan and carry out the removal, under the install lock (never beside an install);
/// returns what was done (empty: nothing was there).
pub async fn apply(
    client: &mut Client,
    config: &Config,
    drop_knowledge: bool,
) -> Result<InstallPlan, InstallError> {
    let lock = crate::db::advisory_locks::INSTALL;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock])
        .await?;
    let done = async {
        let plan = plan(&*client, config, drop_knowledge).await?;
        crate::schema::install::run_plan(client, &plan).await?;
        Ok(plan)
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock])
        .await?;
    done
}
