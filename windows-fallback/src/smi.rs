//! `nvidia-smi` CSV output: GPUs and per-process memory where NVML's per-process data is what
//! nvidia-smi shows (on Windows under WDDM it often is not: then gpu-info reports fill in).

use std::process::Command;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmiGpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_percent: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmiApp {
    pub pid: u32,
    pub gpu_uuid: String,
    pub memory_bytes: Option<f64>,
}

/// One nvidia-smi reading: the GPUs and the compute apps on them, or why there is none.
pub type SmiResult = Result<(Vec<SmiGpu>, Vec<SmiApp>), String>;

pub const GPU_QUERY: &str =
    "index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw";
pub const APP_QUERY: &str = "pid,gpu_uuid,used_gpu_memory";

const MIB: f64 = 1024.0 * 1024.0;

/// A number, or None for `[N/A]`, `[Not Supported]` and other non-numbers.
fn number(field: &str) -> Option<f64> {
    field.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

fn fields(line: &str) -> Vec<&str> {
    line.split(',').map(str::trim).collect()
}

/// `--query-gpu=GPU_QUERY --format=csv,noheader,nounits`.
pub fn parse_gpus(csv: &str) -> Result<Vec<SmiGpu>, String> {
    csv.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f = fields(line);
            if f.len() != 8 {
                return Err(format!("expected 8 fields, got {}: {line:?}", f.len()));
            }
            Ok(SmiGpu {
                index: f[0]
                    .parse()
                    .map_err(|_| format!("bad GPU index {:?}", f[0]))?,
                uuid: f[1].to_owned(),
                name: f[2].to_owned(),
                utilization_percent: number(f[3]),
                memory_used_bytes: number(f[4]).map(|m| m * MIB),
                memory_total_bytes: number(f[5]).map(|m| m * MIB),
                temperature_celsius: number(f[6]),
                power_watts: number(f[7]),
            })
        })
        .collect()
}

/// `--query-compute-apps=APP_QUERY --format=csv,noheader,nounits`.
pub fn parse_apps(csv: &str) -> Result<Vec<SmiApp>, String> {
    csv.lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("No running"))
        .map(|line| {
            let f = fields(line);
            if f.len() != 3 {
                return Err(format!("expected 3 fields, got {}: {line:?}", f.len()));
            }
            Ok(SmiApp {
                pid: f[0].parse().map_err(|_| format!("bad pid {:?}", f[0]))?,
                gpu_uuid: f[1].to_owned(),
                memory_bytes: number(f[2]).map(|m| m * MIB),
            })
        })
        .collect()
}

fn query(program: &str, arg: String) -> Result<String, String> {
    let out = Command::new(program)
        .arg(arg)
        .arg("--format=csv,noheader,nounits")
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs nvidia-smi twice (GPUs, then compute apps).
pub fn sample(program: &str) -> SmiResult {
    let gpus = parse_gpus(&query(program, format!("--query-gpu={GPU_QUERY}"))?)?;
    let apps = parse_apps(&query(
        program,
        format!("--query-compute-apps={APP_QUERY}"),
    )?)?;
    Ok((gpus, apps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpus_and_apps_with_missing_values() {
        let gpus = parse_gpus(
            "0, GPU-5d3a, NVIDIA GeForce RTX 4090, 37, 10240, 24564, 61, 287.40\n\
             1, GPU-77aa, NVIDIA RTX A6000, [N/A], 512, 49140, 40, [Not Supported]\n",
        )
        .unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            (gpus[0].index, gpus[0].name.as_str()),
            (0, "NVIDIA GeForce RTX 4090")
        );
        assert_eq!(gpus[0].memory_used_bytes, Some(10240.0 * MIB));
        assert_eq!(gpus[0].power_watts, Some(287.4));
        assert_eq!(
            (gpus[1].utilization_percent, gpus[1].power_watts),
            (None, None),
            "not a number: left out"
        );
        let apps = parse_apps("4242, GPU-5d3a, 8192\n17, GPU-77aa, [N/A]\n").unwrap();
        assert_eq!(
            apps,
            vec![
                SmiApp {
                    pid: 4242,
                    gpu_uuid: "GPU-5d3a".into(),
                    memory_bytes: Some(8192.0 * MIB)
                },
                SmiApp {
                    pid: 17,
                    gpu_uuid: "GPU-77aa".into(),
                    memory_bytes: None
                },
            ]
        );
        assert!(parse_apps("").unwrap().is_empty());
        assert!(parse_gpus("garbage").is_err());
        assert!(parse_apps("x, y, z").is_err());
    }
}
