//! Per-user named volumes (home, workspace, cache) and the shared volume.

use std::collections::HashMap;

use berth_spawner::{DataRole, SpawnError};
use bollard::models::{Volume, VolumeCreateOptions};

use crate::container::own_volume;
use crate::{engine_error, is_not_found, DockerSpawner, LABEL_MANAGED, LABEL_USER};

/// A volume as the engine describes it (for `berth migrate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub driver: String,
    /// The driver options it was created with, sorted by key.
    pub options: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
}

impl From<Volume> for VolumeInfo {
    fn from(v: Volume) -> Self {
        let mut options: Vec<(String, String)> = v.options.into_iter().collect();
        options.sort();
        VolumeInfo { name: v.name, driver: v.driver, options, labels: v.labels }
    }
}

impl DockerSpawner {
    /// Creates the volume unless it exists, labelled as berth's (and the user's).
    /// One engine call when all is well: the engine's create returns a volume
    /// that exists (of the same driver) as it is; when it refuses, a volume of
    /// that name that exists is used as it is (as before, never relabelled).
    pub(crate) async fn ensure_volume(
        &self,
        name: &str,
        driver: &str,
        opts: &[(String, String)],
        user: &str,
    ) -> Result<(), SpawnError> {
        let mut labels = HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]);
        if !user.is_empty() {
            labels.insert(LABEL_USER.to_string(), user.to_string());
        }
        let req = VolumeCreateOptions {
            name: Some(name.to_string()),
            driver: Some(driver.to_string()),
            driver_opts: Some(opts.iter().cloned().collect()),
            labels: Some(labels),
            ..Default::default()
        };
        match self.client()?.create_volume(req).await {
            Ok(_) => Ok(()),
            Err(refused) => match self.client()?.inspect_volume(name).await {
                Ok(_) => Ok(()),
                Err(_) => Err(engine_error(refused)),
            },
        }
    }

    /// Checks that an adopted volume is there; berth never creates one.
    pub(crate) async fn require_volume(&self, name: &str, role: DataRole, user: &str) -> Result<(), SpawnError> {
        match self.client()?.inspect_volume(name).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Err(SpawnError::Failed(format!(
                "the volume {name}, adopted as {user}'s {role} volume, is gone; berth does not make an empty one \
                 in its place: restore it (or recreate it with the same name and driver options)"
            ))),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Every volume the engine has.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, SpawnError> {
        let list = self
            .client()?
            .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
            .await
            .map_err(engine_error)?;
        let mut out: Vec<VolumeInfo> = list.volumes.unwrap_or_default().into_iter().map(VolumeInfo::from).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes berth's own volumes of a user (asked for explicitly when
    /// deleting a user); `owner` is what they are named by: the account id.
    /// Volumes adopted from an earlier deployment are never among them.
    pub async fn remove_user_volumes(&self, owner: &str) -> Result<(), SpawnError> {
        for role in [DataRole::Home, DataRole::Workspace, DataRole::Cache] {
            match self
                .client()?
                .remove_volume(&own_volume(owner, role), None::<bollard::query_parameters::RemoveVolumeOptions>)
                .await
            {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(engine_error(e)),
            }
        }
        Ok(())
    }
}
