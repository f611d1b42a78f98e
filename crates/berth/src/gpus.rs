//! `berth gpus sample`: one read of the GPUs through the sampler berth
//! would use (or the one named), printed — what `scripts/gpu-check` runs on
//! a machine with GPUs to compare NVML with `nvidia-smi`.

use std::time::Duration;

use anyhow::{bail, Result};
use berth_hub::nvml::{Auto, NvmlSource};
use berth_hub::telemetry::{GpuSource, NvidiaSmi};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub(crate) enum GpusCommand {
    /// Read the GPUs and their compute processes once and print them.
    Sample {
        /// auto, nvml or nvidia-smi (default: gpu.sampler).
        #[arg(long)]
        sampler: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: GpusCommand, cfg: &berth_hub::gpus::GpuConfig) -> Result<()> {
    let GpusCommand::Sample { sampler, json } = command;
    let which = sampler.unwrap_or_else(|| cfg.sampler.clone());
    let smi = || NvidiaSmi::new("nvidia-smi", Duration::from_secs(10));
    let source: Box<dyn GpuSource> = match which.as_str() {
        "nvml" => match NvmlSource::load(&cfg.nvml_library) {
            Ok(s) => Box::new(s),
            Err(e) => bail!("{e}"),
        },
        "nvidia-smi" => Box::new(smi()),
        "auto" => Box::new(Auto::new(&cfg.nvml_library, smi())),
        "off" => bail!("gpu.sampler is off: name one with --sampler nvml or --sampler nvidia-smi"),
        other => bail!("{other:?} is not auto, nvml or nvidia-smi"),
    };
    let raw = match source.read().await {
        Ok(r) => r,
        Err(e) => bail!("reading the GPUs through {} failed: {e}", source.name()),
    };
    let container = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| berth_core::gpu_smi::container_id_from_cgroup(&t))
    };
    if json {
        let v = json!({
            "source": source.name(),
            "gpus": raw.gpus,
            "processes": raw.apps.iter().map(|a| json!({
                "gpu_uuid": a.gpu_uuid, "pid": a.pid, "memory_mib": a.memory_mib, "container": container(a.pid),
            })).collect::<Vec<_>>(),
        });
        out!("{v}");
        return Ok(());
    }
    out!("source: {}", source.name());
    let opt = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
    for g in &raw.gpus {
        out!(
            "{} {} {}: utilisation {}, memory {} / {} MiB, {} °C, {} W",
            g.index,
            g.uuid,
            g.name,
            opt(g.utilization_percent.map(|u| format!("{u} %"))),
            opt(g.memory_used_mib.map(|m| m.to_string())),
            opt(g.memory_total_mib.map(|m| m.to_string())),
            opt(g.temperature_c.map(|t| t.to_string())),
            opt(g.power_w.map(|p| format!("{p:.1}"))),
        );
    }
    for a in &raw.apps {
        out!(
            "  pid {} on {}: {} MiB, container {}",
            a.pid,
            a.gpu_uuid,
            opt(a.memory_mib.map(|m| m.to_string())),
            container(a.pid).map(|c| c.chars().take(12).collect::<String>()).unwrap_or_else(|| "none".to_string())
        );
    }
    Ok(())
}
