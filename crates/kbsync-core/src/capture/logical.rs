//! Logical capture's objects in the database: the publication of the source tables,
//! the replication slot the daemon reads it through, and what the slot holds back.
//! (The decoding itself is the daemon's: kbsync-daemon's decoder.)

use tokio_postgres::GenericClient;

use crate::config::Config;

/// The publication of the source tables (publications are per database).
pub const PUBLICATION: &str = "kbsync";

/// The slot name: `capture.slot`, else `kbsync_<database oid>`, since slots are
/// cluster-wide and two databases on one server must not share one.
pub async fn slot_name(
    client: &impl GenericClient,
    config: &Config,
) -> Result<String, tokio_postgres::Error> {
    if let Some(slot) = &config.capture.slot {
        return Ok(slot.clone());
    }
    let oid: u32 = client
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0);
    Ok(format!("kbsync_{oid}"))
}

/// What the connected role lacks to decode a replication slot, in words naming the fix
/// (None: it may). Logical capture needs the REPLICATION attribute (or superuser, or on
/// RDS membership of rds_replication).
pub async fn missing_replication_right(
    client: &impl GenericClient,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_one(
            // RDS and Aurora grant the right through membership of rds_replication.
            "SELECT current_user::text,
                    rolreplication OR rolsuper
                    OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                                WHERE r.rolname = 'rds_replication'
                                  AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))
               FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, may): (String, bool) = (row.get(0), row.get(1));
    Ok((!may).then(|| {
        format!(
            "capture.mode = \"logical\" reads a replication slot, which needs a role with the REPLICATION attribute, and {role} has none: an administrator runs `ALTER ROLE \"{role}\" WITH REPLICATION` (RDS / Aurora: `GRANT rds_replication TO \"{role}\"`); or keep capture.mode = \"triggers\", which needs no such right"
        )
    }))
}

/// Tables among `tables` (regclass texts) the connected role does not own (through
/// membership): a publication, and triggers without the TRIGGER privilege, need the owner.
pub async fn tables_not_owned(
    client: &impl GenericClient,
    tables: &[String],
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT c.oid::regclass::text, pg_catalog.pg_get_userbyid(c.relowner)::text
               FROM pg_catalog.pg_class c
              WHERE c.oid = ANY (SELECT t::regclass FROM unnest($1::text[]) t)
                AND NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')
              ORDER BY 1",
            &[&tables],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub async fn wal_level(client: &impl GenericClient) -> Result<String, tokio_postgres::Error> {
    Ok(client.query_one("SHOW wal_level", &[]).await?.get(0))
}

/// What the slot looks like from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub name: String,
    /// A daemon is connected to it.
    pub active: bool,
    /// WAL the server keeps for it (current position − restart_lsn), in bytes.
    pub retained_bytes: i64,
    /// WAL written since the daemon's last confirmed position, in bytes: how far
    /// behind decoding is (0 when caught up and idle).
    pub unconfirmed_bytes: i64,
    /// `wal_status` (reserved, extended, unreserved, lost).
    pub wal_status: String,
}

impl SlotState {
    /// Holds back more WAL than `limit_mb` MiB (`capture.max_retained_wal_mb`), or
    /// the server has already invalidated it.
    pub fn over_limit(&self, limit_mb: u64) -> bool {
        self.retained_bytes > (limit_mb * 1024 * 1024) as i64 || self.wal_status == "lost"
    }
}

/// `None`: there is no such slot in this database.
pub async fn slot_state(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT active,
                    COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8,
                    COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8,
                    COALESCE(wal_status, '')
               FROM pg_replication_slots
              WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        name: slot.to_owned(),
        active: r.get(0),
        retained_bytes: r.get(1),
        unconfirmed_bytes: r.get(2),
        wal_status: r.get(3),
    }))
}
