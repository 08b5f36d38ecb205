//! Every advisory lock id kbsync takes, in one place: PostgreSQL has one namespace of
//! advisory lock ids per database, shared by session and transaction locks, so two uses
//! of one id would block each other.

/// Serialises concurrent `kbsync install`s.
pub const INSTALL: i64 = 0x6b62_7379_6e63_0001;
/// Taken (transaction-level, try) by the capture triggers so that at most one writer at a
/// time sends the wake-up NOTIFY. Its value is part of installed trigger functions.
pub const WAKE: i64 = 0x6b62_7379_6e63_0002;
/// The one daemon that keeps the HNSW index (drops it for a backlog, builds it back).
pub const INDEX: i64 = 0x6b62_7379_6e63_0003;
/// The one daemon that fills the other model's vectors during a model migration.
pub const MODEL_FILL: i64 = 0x6b62_7379_6e63_0004;
/// One reconcile sweep at a time across all daemons and hosts. It once shared `WAKE`'s
/// id, so a writer sending a wake-up looked like a running sweep.
pub const SWEEP: i64 = 0x6b62_7379_6e63_0005;
/// Held shared by every running daemon (on its listener's session), so that
/// `kbsync status` and `kbsync install` can tell whether any daemon is running.
pub const DAEMON: i64 = 0x6b62_7379_6e63_0006;

/// Every id above, for the check that they differ.
pub const ALL: &[i64] = &[INSTALL, WAKE, INDEX, MODEL_FILL, SWEEP, DAEMON];

/// Whether some session holds `id` (granted, session or transaction level), as seen in
/// `pg_locks`, which every role may read.
pub async fn held(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
) -> Result<bool, tokio_postgres::Error> {
    Ok(holders(client, id).await? > 0)
}

/// How many sessions hold `id` (a shared lock has several holders).
pub async fn holders(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
) -> Result<i64, tokio_postgres::Error> {
    // A bigint advisory key is stored as classid = high 32 bits, objid = low 32 bits.
    let high = i64::from((id >> 32) as u32);
    let low = i64::from((id & 0xffff_ffff) as u32);
    Ok(client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
                AND classid::text::bigint = $1 AND objid::text::bigint = $2",
            &[&high, &low],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_lock_has_an_id_of_its_own() {
        let mut ids = super::ALL.to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), super::ALL.len());
    }
}
