//! The GPUs the hub hands out: the inventory (configured or detected at
//! start-up), allocation through `berth_core::gpu::allocate` recorded in the
//! store, and what each caller may see of them (`view`: holders with
//! `read:gpus` or when they are the caller's own, and the sampler's live
//! readings from `telemetry`). Allocation is serialised, so two starts never
//! get the same exclusive device.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use berth_core::ServerId;
use berth_store::Store;
use serde::{Deserialize, Serialize};

use crate::error::{HubError, HubResult};
use crate::identity::Caller;
use crate::nvml::NvmlSource;
use crate::telemetry::{NvidiaSmi, SampleState, Telemetry};

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
    /// Where utilisation comes from: `auto` (NVML when it loads, else
    /// `nvidia-smi`, when there are GPUs to sample), `nvml`, `nvidia-smi`,
    /// or `off`.
    pub sampler: String,
    /// The NVML library to load; empty: the driver's `libnvidia-ml.so.1`.
    pub nvml_library: String,
    /// Seconds between samples.
    #[serde(with = "berth_core::serde_secs")]
    pub sample_interval_seconds: Duration,
    /// A GPU below this utilisation (percent) counts as idle.
    pub idle_below_percent: u32,
    /// A start that asks for more GPUs than are free: `queue` (it waits in
    /// line, first come first served) or `refuse` (it fails, naming the
    /// shortage).
    pub when_full: String,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            mode: 2,
            devices: String::new(),
            probe_image: "nvidia/cuda:12.4.1-base-ubuntu22.04".into(),
            max_per_server: 8,
            sampler: "auto".into(),
            nvml_library: String::new(),
            sample_interval_seconds: Duration::from_secs(5),
            idle_below_percent: 5,
            when_full: "queue".into(),
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

/// One compute process on a GPU as a caller sees it: the PID and owner only
/// when the caller may see who holds what, or it is their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessView {
    pub pid: Option<u32>,
    pub memory_mib: Option<u64>,
    pub user: Option<String>,
    pub server: Option<String>,
}

/// One GPU as a caller sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuView {
    pub id: String,
    pub name: String,
    pub shared: bool,
    pub held: bool,
    pub holder_count: usize,
    /// Every holder with `read:gpus`; otherwise the servers the caller may
    /// read (`read:servers`), i.e. their own.
    pub holders: Vec<String>,
    pub utilization_percent: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    /// Seconds it has been seen idle; `None` when busy or not known.
    pub idle_seconds: Option<u64>,
    pub processes: Vec<ProcessView>,
}

/// What the sampler says, for `GpusView`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplerView {
    pub source: &'static str,
    #[serde(flatten)]
    pub state: SampleState,
    /// Unix milliseconds of the latest sample, when there was one.
    pub sampled_at_ms: Option<i64>,
}

/// The GPUs as one caller sees them (`GET /hub/api/gpus`, the pages).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpusView {
    pub mode: u32,
    pub sampler: SamplerView,
    pub total: usize,
    /// Held by nobody.
    pub free: usize,
    pub held: usize,
    /// What a start may still get: free ones and shared ones.
    pub available: usize,
    /// Whether holder names of others are shown (`read:gpus`).
    pub holders_visible: bool,
    pub gpus: Vec<GpuView>,
}

pub struct Gpus {
    pub cfg: GpuConfig,
    /// The sampler's latest readings (filled by the server's `gpu-sampler` job).
    pub telemetry: Telemetry,
    store: Store,
    inventory: RwLock<Vec<Gpu>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Gpus {
    pub fn new(cfg: GpuConfig, store: Store) -> Gpus {
        let smi = || NvidiaSmi::new("nvidia-smi", Duration::from_secs(10));
        let source: Option<Arc<dyn crate::telemetry::GpuSource>> = match (cfg.mode, cfg.sampler.as_str()) {
            (0, _) | (_, "off") => None,
            (_, "nvidia-smi") => Some(Arc::new(smi())),
            (_, "nvml") => match NvmlSource::load(&cfg.nvml_library) {
                Ok(n) => Some(Arc::new(n)),
                Err(e) => {
                    tracing::warn!(why = %e, "gpu.sampler is nvml, but NVML is not available: GPU utilisation unknown");
                    Some(Arc::new(crate::nvml::Unavailable(e)))
                }
            },
            // `auto`: NVML is tried on the first sample, so commands that
            // never sample (`berth user …`) never load it.
            _ => Some(Arc::new(crate::nvml::Auto::new(&cfg.nvml_library, smi()))),
        };
        let telemetry = Telemetry::new(source, cfg.sample_interval_seconds, cfg.idle_below_percent);
        Gpus { cfg, store, telemetry, inventory: RwLock::new(Vec::new()), one_at_a_time: tokio::sync::Mutex::new(()) }
    }

    /// Whether the sampler job should run: a source, and (with `auto`)
    /// GPUs in the inventory.
    pub fn samples(&self) -> bool {
        self.telemetry.enabled() && (self.cfg.sampler != "auto" || !self.inventory().is_empty())
    }

    /// The GPUs, their holders and live readings as `caller` may see them.
    pub async fn view(&self, caller: &Caller, now_ms: i64) -> HubResult<GpusView> {
        let all = caller.allows("read:gpus", berth_core::Target::Hub);
        // A holder's name and a process's owner are shown with `read:gpus`,
        // or to a caller that may read that server (a session or token of
        // its owner with `read:servers`; a scopeless token sees counts only).
        let own =
            |u: &str, s: &str| all || caller.allows("read:servers", berth_core::Target::Server { user: u, server: s });
        let report = self.report().await?;
        let allocations = self.store.gpu_allocations().await?;
        let snap = self.telemetry.snapshot(now_ms);
        let fresh = snap.state == SampleState::Ok;
        let gpus: Vec<GpuView> = report
            .into_iter()
            .map(|g| {
                let reading = if fresh { snap.gpu(&g.id) } else { None };
                let holders: Vec<String> = allocations
                    .iter()
                    .filter(|(d, u, s)| *d == g.id && own(u, s))
                    .map(|(_, u, s)| describe(u, s))
                    .collect();
                let processes = if fresh {
                    snap.processes_on(&g.id)
                        .take(256)
                        .map(|p| {
                            let visible =
                                p.owner.as_ref().is_some_and(|(u, s)| own(u, s)) || (all && p.owner.is_none());
                            ProcessView {
                                pid: visible.then_some(p.pid),
                                memory_mib: p.memory_mib,
                                user: p.owner.as_ref().filter(|_| visible).map(|(u, _)| u.clone()),
                                server: p.owner.as_ref().filter(|_| visible).map(|(_, s)| s.clone()),
                            }
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                GpuView {
                    held: !g.holders.is_empty(),
                    holder_count: g.holders.len(),
                    holders,
                    utilization_percent: reading.and_then(|r| r.utilization_percent),
                    memory_used_mib: reading.and_then(|r| r.memory_used_mib),
                    memory_total_mib: reading.and_then(|r| r.memory_total_mib),
                    temperature_c: reading.and_then(|r| r.temperature_c),
                    power_w: reading.and_then(|r| r.power_w),
                    idle_seconds: self.telemetry.idle_for(&g.id, now_ms).map(|d| d.as_secs()),
                    processes,
                    // A configured id has no name of its own; the driver's is better.
                    name: match reading {
                        Some(r) if g.name == "configured" => r.name.clone(),
                        _ => g.name,
                    },
                    id: g.id,
                    shared: g.shared,
                }
            })
            .collect();
        let held = gpus.iter().filter(|g| g.held).count();
        Ok(GpusView {
            mode: self.cfg.mode,
            sampler: SamplerView {
                source: snap.source,
                sampled_at_ms: (snap.at_ms > 0).then_some(snap.at_ms),
                state: snap.state.clone(),
            },
            total: gpus.len(),
            free: gpus.len() - held,
            held,
            available: gpus.iter().filter(|g| !g.held || g.shared).count(),
            holders_visible: all,
            gpus,
        })
    }

    pub fn set_inventory(&self, gpus: Vec<Gpu>) {
        if let Ok(mut g) = self.inventory.write() {
            *g = gpus;
        }
    }

    pub fn inventory(&self) -> Vec<Gpu> {
        self.inventory.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Whether starts that find too few GPUs free wait in the queue.
    pub fn queues(&self) -> bool {
        self.cfg.when_full != "refuse"
    }

    /// Whether `want` GPUs may ever be had here: GPUs on, within
    /// `gpu.max_per_server` and the inventory. A request that fails this
    /// is refused at once, never queued.
    pub fn check_request(&self, want: usize) -> HubResult<()> {
        if want == 0 {
            return Ok(());
        }
        if self.cfg.mode == 0 {
            return Err(HubError::GpusOff);
        }
        if want > self.cfg.max_per_server as usize {
            return Err(HubError::TooManyGpus { max: self.cfg.max_per_server });
        }
        // One server's GPUs are on one machine (Swarm nodes: `node:id`).
        let devices: Vec<String> = self.inventory().into_iter().map(|g| g.id).collect();
        let total = berth_core::gpu::largest_node(&devices);
        if want > total {
            return Err(HubError::GpusExceedInventory { wanted: want, total });
        }
        Ok(())
    }

    /// Allocates `want` GPUs to `id`, all on one machine (`on`: that one,
    /// see [`berth_spawner::Spawner::data_node`]), or says why not.
    pub async fn allocate(&self, id: &ServerId, want: usize, on: Option<Option<String>>) -> HubResult<Vec<String>> {
        if want == 0 {
            return Ok(Vec::new());
        }
        self.check_request(want)?;
        let _serialised = self.one_at_a_time.lock().await;
        let devices: Vec<String> = self.inventory().into_iter().map(|g| g.id).collect();
        let shared: HashSet<String> = self.store.shared_gpus().await?.into_iter().collect();
        let held: Vec<(String, String)> =
            self.store.gpu_allocations().await?.into_iter().map(|(d, u, s)| (d, describe(&u, &s))).collect();
        let on = on.as_ref().map(|n| n.as_deref());
        match berth_core::gpu::allocate_on_one_node(&devices, &shared, &held, want, on) {
            Ok(ids) => {
                self.store.add_gpu_allocations(id.user(), id.server(), &ids).await?;
                Ok(ids)
            }
            Err(shortage) => Err(HubError::NoGpus { shortage }),
        }
    }

    /// Frees what `id` holds and says how many; failures are logged (the
    /// next start re-checks).
    pub async fn free(&self, id: &ServerId) -> u64 {
        self.free_at(id, berth_store::now_ms()).await
    }

    /// [`Gpus::free`], ending the GPUs' usage at `at`.
    pub async fn free_at(&self, id: &ServerId, at: i64) -> u64 {
        match self.store.free_gpus_at(id.user(), id.server(), at).await {
            Ok(0) => 0,
            Ok(n) => {
                tracing::info!(server = %id, count = n, "freed GPUs");
                n
            }
            Err(e) => {
                tracing::error!(server = %id, error = %e, "could not free GPUs");
                0
            }
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
