//! Per-user named volumes (home, workspace, cache) and the shared volume.

use std::collections::HashMap;

use berth_spawner::SpawnError;
use bollard::models::VolumeCreateOptions;

use crate::{engine_error, is_not_found, DockerSpawner, LABEL_MANAGED, LABEL_USER};

impl DockerSpawner {
    /// Creates the volume unless it exists, labelled as berth's (and the user's).
    pub(crate) async fn ensure_volume(
        &self,
        name: &str,
        driver: &str,
        opts: &[(String, String)],
        user: &str,
    ) -> Result<(), SpawnError> {
        match self.client()?.inspect_volume(name).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(e)),
        }
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
        self.client()?.create_volume(req).await.map_err(engine_error)?;
        Ok(())
    }

    /// Removes a user's volumes (asked for explicitly when deleting a user);
    /// `owner` is what they are named by: the account id.
    pub async fn remove_user_volumes(&self, owner: &str) -> Result<(), SpawnError> {
        for suffix in ["home", "workspace", "cache"] {
            match self
                .client()?
                .remove_volume(
                    &format!("berth-{owner}-{suffix}"),
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
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
