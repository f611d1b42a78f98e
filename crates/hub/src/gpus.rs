//! The GPUs the hub hands out: the inventory (configured or detected at
//! start-up), allocation through `berth_core::gpu::allocate` recorded in the
//! store, and the report admins see. Allocation is serialised, so two starts
//! never get the same exclusive device.

use std::collections::HashSet;
use std::sync::RwLock;

use berth_core::ServerId;
use berth_store::Store;
use serde::{Deserialize, Serialize};

use crate::error::{HubError, HubResult};

/// The `[gpu]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// 0 off, 1 on, 2 auto-detect (ENABLE_GPU_SUPPORT).
    pub mode: u32,
    /// Comma-separated device ids to use instead of detection.
    pub devices: String,
    /// Image that runs `nvidia-smi -L` to detect GPUs (NVIDIA_AUTODETECT_IMAGE).
    pub probe_image: String,
    /// Most GPUs one server may ask for.
    pub max_per_server: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            mode: 2,
            devices: String::new(),
            probe_image: "nvidia/cuda:12.4.1-base-ubuntu22.04".into(),
            max_per_server: 8,
        }
    }
}

/// A GPU the hub may hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub id: String,
    pub name: String,
}

/// One GPU as admins see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuReport {
    pub id: String,
    pub name: String,
    pub shared: bool,
    /// `alice`, `bob/lab`.
    pub holders: Vec<String>,
}

pub struct Gpus {
    pub cfg: GpuConfig,
    store: Store,
    inventory: RwLock<Vec<Gpu>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Gpus {
    pub fn new(cfg: GpuConfig, store: Store) -> Gpus {
        Gpus { cfg, store, inventory: RwLock::new(Vec::new()), one_at_a_time: tokio::sync::Mutex::new(()) }
    }

    pub fn set_inventory(&self, gpus: Vec<Gpu>) {
        if let Ok(mut g) = self.inventory.write() {
            *g = gpus;
        }
    }

    pub fn inventory(&self) -> Vec<Gpu> {
        self.inventory.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Allocates `want` GPUs to `id`, or says why not.
    pub async fn allocate(&self, id: &ServerId, want: usize) -> HubResult<Vec<String>> {
        if want == 0 {
            return Ok(Vec::new());
        }
        if self.cfg.mode == 0 {
            return Err(HubError::GpusOff);
        }
        if want > self.cfg.max_per_server as usize {
            return Err(HubError::TooManyGpus { max: self.cfg.max_per_server });
        }
        let _serialised = self.one_at_a_time.lock().await;
        let devices: Vec<String> = self.inventory().into_iter().map(|g| g.id).collect();
        let shared: HashSet<String> = self.store.shared_gpus().await?.into_iter().collect();
        let held: Vec<(String, String)> =
            self.store.gpu_allocations().await?.into_iter().map(|(d, u, s)| (d, describe(&u, &s))).collect();
        match berth_core::gpu::allocate(&devices, &shared, &held, want) {
            Ok(ids) => {
                self.store.add_gpu_allocations(id.user(), id.server(), &ids).await?;
                Ok(ids)
            }
            Err(shortage) => Err(HubError::NoGpus { shortage }),
        }
    }

    /// Frees what `id` holds; failures are logged (the next start re-checks).
    pub async fn free(&self, id: &ServerId) {
        match self.store.free_gpus(id.user(), id.server()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(server = %id, count = n, "freed GPUs"),
            Err(e) => tracing::error!(server = %id, error = %e, "could not free GPUs"),
        }
    }

    /// The inventory with who holds each GPU.
    pub async fn report(&self) -> HubResult<Vec<GpuReport>> {
        let allocations = self.store.gpu_allocations().await?;
        let shared: HashSet<String> = self.store.shared_gpus().await?.into_iter().collect();
        Ok(self
            .inventory()
            .into_iter()
            .map(|g| GpuReport {
                holders: allocations.iter().filter(|(d, _, _)| *d == g.id).map(|(_, u, s)| describe(u, s)).collect(),
                shared: shared.contains(&g.id),
                id: g.id,
                name: g.name,
            })
            .collect())
    }

    pub async fn set_shared(&self, id: &str, shared: bool) -> HubResult<()> {
        if !self.inventory().iter().any(|g| g.id == id) {
            return Err(HubError::NoSuchGpu { id: id.to_string() });
        }
        self.store.set_gpu_shared(id, shared).await?;
        Ok(())
    }
}

fn describe(user: &str, server: &str) -> String {
    if server.is_empty() {
        user.to_string()
    } else {
        format!("{user}/{server}")
    }
}
