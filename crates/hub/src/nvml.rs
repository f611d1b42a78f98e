//! GPU samples read from NVML, the driver's management library, through
//! `nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time: a berth built
//! here runs where no driver is installed, and only a sampler that asks for
//! NVML finds it missing.
//!
//! [`Auto`] (`gpu.sampler = auto`) tries NVML on its first read and falls
//! back to the `nvidia-smi` CLI for good when the library cannot be loaded.
//! [`NvmlSource`] reads every GPU (and, on a GPU in MIG mode, every MIG
//! instance, the unit berth hands out there) with its compute processes.
//! Each read runs on a blocking thread; a read that has not returned is
//! never stacked on by the next one (a hung driver costs one thread, and
//! the samples say "unknown" meanwhile).
//!
//! The conversion from NVML's units (bytes, milliwatts) is [`convert`], a
//! pure function tested with recorded values; the FFI path is tested with a
//! stand-in library that has NVML's ABI (`crates/berth/tests/gpus.rs`) and,
//! on a machine with GPUs, by `scripts/gpu-check`.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use berth_core::gpu_smi::{AppReading, GpuReading};
use berth_spawner::BoxFuture;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::{Device, Nvml};

use crate::telemetry::{GpuSource, NvidiaSmi, RawSample};

const MIB: u64 = 1024 * 1024;
/// Most devices (physical GPUs, then MIG instances of each) one read looks at.
const MAX_DEVICES: u32 = 64;
const MAX_MIG_PER_GPU: u32 = 16;
const MAX_PROCESSES: usize = 4096;

/// What NVML said of one device, in its own units; `None` where the query
/// failed or is not supported (MIG instances report no utilisation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceValues {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_gpu: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    /// `(pid, used bytes)`; `None` where the driver does not say (WDDM).
    pub processes: Vec<(u32, Option<u64>)>,
}

/// NVML's values as the sampler keeps them (MiB, watts).
pub fn convert(devices: Vec<DeviceValues>) -> RawSample {
    let mut sample = RawSample::default();
    for d in devices {
        for (pid, used) in d.processes.iter().take(MAX_PROCESSES) {
            sample.apps.push(AppReading { gpu_uuid: d.uuid.clone(), pid: *pid, memory_mib: used.map(|b| b / MIB) });
        }
        sample.gpus.push(GpuReading {
            index: d.index,
            uuid: d.uuid,
            name: d.name,
            utilization_percent: d.utilization_gpu.map(|u| u.min(100)),
            memory_used_mib: d.memory_used_bytes.map(|b| b / MIB),
            memory_total_mib: d.memory_total_bytes.map(|b| b / MIB),
            temperature_c: d.temperature_c,
            power_w: d.power_mw.map(|mw| f64::from(mw) / 1000.0),
        });
    }
    sample
}

/// NVML, loaded and initialised.
pub struct NvmlSource {
    nvml: Arc<Nvml>,
    /// Set while a read runs on its blocking thread.
    reading: Arc<AtomicBool>,
}

impl NvmlSource {
    /// Loads NVML from `library` (empty: the driver's `libnvidia-ml.so.1`
    /// as the dynamic loader finds it) and initialises it.
    pub fn load(library: &str) -> Result<NvmlSource, String> {
        let path = if library.is_empty() { "libnvidia-ml.so.1" } else { library };
        let nvml = Nvml::builder()
            .lib_path(OsStr::new(path))
            .init()
            .map_err(|e| format!("NVML could not be loaded from {path}: {e}"))?;
        Ok(NvmlSource { nvml: Arc::new(nvml), reading: Arc::new(AtomicBool::new(false)) })
    }
}

impl GpuSource for NvmlSource {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn read(&self) -> BoxFuture<'_, Result<RawSample, String>> {
        Box::pin(async move {
            if self.reading.swap(true, Ordering::AcqRel) {
                return Err("the previous NVML read has not returned".into());
            }
            let (nvml, reading) = (self.nvml.clone(), self.reading.clone());
            let task = tokio::task::spawn_blocking(move || {
                let r = read_devices(&nvml);
                reading.store(false, Ordering::Release);
                r
            });
            match task.await {
                Ok(r) => r.map(convert),
                Err(e) => {
                    self.reading.store(false, Ordering::Release);
                    Err(format!("the NVML read failed: {e}"))
                }
            }
        })
    }
}

/// Every GPU, and the MIG instances of those in MIG mode, with their
/// compute processes. A device that cannot be read is left out (it reads
/// as unknown); no readable device at all is an error.
fn read_devices(nvml: &Nvml) -> Result<Vec<DeviceValues>, String> {
    let count = nvml.device_count().map_err(|e| format!("NVML cannot count the GPUs: {e}"))?;
    let mut out = Vec::new();
    let mut unreadable = Vec::new();
    for index in 0..count.min(MAX_DEVICES) {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                unreadable.push(format!("GPU {index}: {e}"));
                continue;
            }
        };
        let Some(mut values) = device_values(&device, index) else {
            unreadable.push(format!("GPU {index}: no UUID"));
            continue;
        };
        // NVML_DEVICE_MIG_ENABLE is 1: the instances are what runs processes.
        let mig = device.mig_mode().map(|m| m.current == 1).unwrap_or(false);
        if mig {
            values.processes.clear();
            let instances = device.mig_device_count().unwrap_or(0).min(MAX_MIG_PER_GPU);
            out.push(values);
            for j in 0..instances {
                if let Ok(m) = device.mig_device_by_index(j) {
                    if let Some(mut v) = device_values(&m, index) {
                        v.utilization_gpu = None;
                        v.temperature_c = None;
                        v.power_mw = None;
                        out.push(v);
                    }
                }
            }
        } else {
            out.push(values);
        }
    }
    if out.is_empty() && !unreadable.is_empty() {
        return Err(format!("NVML could read none of its GPUs ({})", unreadable.join("; ")));
    }
    if !unreadable.is_empty() {
        tracing::debug!(devices = %unreadable.join("; "), "NVML could not read some GPUs");
    }
    Ok(out)
}

fn device_values(d: &Device<'_>, index: u32) -> Option<DeviceValues> {
    let uuid = d.uuid().ok()?;
    let memory = d.memory_info().ok();
    let processes = d
        .running_compute_processes()
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let used = match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            };
            (p.pid, used)
        })
        .collect();
    Some(DeviceValues {
        index,
        uuid,
        name: d.name().unwrap_or_default(),
        utilization_gpu: d.utilization_rates().ok().map(|u| u.gpu),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
        power_mw: d.power_usage().ok(),
        processes,
    })
}

/// `gpu.sampler = auto`: NVML when it loads (tried on the first read),
/// otherwise the `nvidia-smi` CLI, for the rest of the run.
pub struct Auto {
    library: String,
    nvml: OnceLock<Option<NvmlSource>>,
    smi: NvidiaSmi,
}

impl Auto {
    pub fn new(library: &str, smi: NvidiaSmi) -> Auto {
        Auto { library: library.to_string(), nvml: OnceLock::new(), smi }
    }

    fn nvml(&self) -> Option<&NvmlSource> {
        self.nvml
            .get_or_init(|| match NvmlSource::load(&self.library) {
                Ok(s) => {
                    tracing::info!("GPU telemetry reads NVML");
                    Some(s)
                }
                Err(e) => {
                    tracing::info!(why = %e, "GPU telemetry runs nvidia-smi (NVML is not available)");
                    None
                }
            })
            .as_ref()
    }
}

impl GpuSource for Auto {
    fn name(&self) -> &'static str {
        match self.nvml.get() {
            Some(Some(_)) => "nvml",
            Some(None) => "nvidia-smi",
            None => "auto",
        }
    }

    fn read(&self) -> BoxFuture<'_, Result<RawSample, String>> {
        match self.nvml() {
            Some(n) => n.read(),
            None => self.smi.read(),
        }
    }
}

/// `gpu.sampler = nvml` where NVML did not load: every read says why.
pub struct Unavailable(pub String);

impl GpuSource for Unavailable {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn read(&self) -> BoxFuture<'_, Result<RawSample, String>> {
        let why = self.0.clone();
        Box::pin(async move { Err(why) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values as NVML reported them on an A100 in MIG mode with two
    /// instances and a T4 beside it (bytes, milliwatts).
    fn recorded() -> Vec<DeviceValues> {
        vec![
            DeviceValues {
                index: 0,
                uuid: "GPU-5b2c7e0e-3f1d-2a4b-9c8e-1d2f3a4b5c6d".into(),
                name: "NVIDIA A100-SXM4-80GB".into(),
                utilization_gpu: Some(87),
                memory_used_bytes: Some(42_505_076_736),
                memory_total_bytes: Some(85_899_345_920),
                temperature_c: Some(61),
                power_mw: Some(312_450),
                processes: vec![(4242, Some(40_960 * MIB)), (4243, None)],
            },
            DeviceValues {
                index: 1,
                uuid: "GPU-0c0c0c0c-1d1d-2e2e-3f3f-404040404040".into(),
                name: "Tesla T4".into(),
                utilization_gpu: Some(150),
                memory_used_bytes: Some(0),
                memory_total_bytes: Some(16_106_127_360),
                temperature_c: Some(40),
                power_mw: None,
                processes: vec![],
            },
        ]
    }

    #[test]
    fn nvml_units_become_the_samplers() {
        let s = convert(recorded());
        assert_eq!(s.gpus.len(), 2);
        let a = &s.gpus[0];
        assert_eq!(
            (a.utilization_percent, a.memory_used_mib, a.memory_total_mib),
            (Some(87), Some(40536), Some(81920))
        );
        assert_eq!((a.temperature_c, a.power_w), (Some(61), Some(312.45)));
        let t4 = &s.gpus[1];
        assert_eq!((t4.utilization_percent, t4.memory_total_mib, t4.power_w), (Some(100), Some(15360), None));
        assert_eq!(
            s.apps,
            [
                AppReading { gpu_uuid: a.uuid.clone(), pid: 4242, memory_mib: Some(40960) },
                AppReading { gpu_uuid: a.uuid.clone(), pid: 4243, memory_mib: None },
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_library_is_said_and_auto_falls_back_to_the_cli() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("libnvidia-ml.so.1");
        let e = NvmlSource::load(&missing.display().to_string()).err().unwrap();
        assert!(e.starts_with("NVML could not be loaded from ") && e.contains("libnvidia-ml.so.1"), "{e}");
        let smi =
            NvidiaSmi::new(dir.path().join("nvidia-smi").display().to_string(), std::time::Duration::from_secs(5));
        let auto = Auto::new(&missing.display().to_string(), smi);
        assert_eq!(auto.name(), "auto");
        let e = auto.read().await.unwrap_err();
        assert!(e.starts_with("no ") && e.contains("nvidia-smi"), "the CLI's error: {e}");
        assert_eq!(auto.name(), "nvidia-smi");
    }
}
