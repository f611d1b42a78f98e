//! Volumes adopted from an earlier deployment (`berth migrate jupyterhub`):
//! what a start mounts in place of berth's own volumes. The records live in
//! the store (`adopted_volumes`, migration 7); the volumes themselves are
//! never created, renamed or removed by berth — deleting an account with its
//! data removes berth's own volumes only.

use berth_spawner::{DataRole, VolumeMount};
use berth_store::Store;

use crate::HubResult;

/// The adopted volumes a start of `account_id`'s servers mounts (theirs and
/// the shared one), for [`berth_spawner::SpawnSpec::volumes`].
pub async fn mounts(store: &Store, account_id: &str) -> HubResult<Vec<VolumeMount>> {
    let mut out = Vec::new();
    for v in store.adopted_volumes_for_start(account_id).await? {
        match DataRole::parse(&v.role) {
            Some(role) => out.push(VolumeMount { role, name: v.volume, target: v.mount_point }),
            None => {
                tracing::warn!(volume = %v.volume, role = %v.role, "adopted volume with an unknown role; not mounted")
            }
        }
    }
    Ok(out)
}
