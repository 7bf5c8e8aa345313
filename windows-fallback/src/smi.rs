//! `nvidia-smi` CSV output: GPUs and per-process memory where NVML's per-process data is what
//! nvidia-smi shows (on Windows under WDDM it often is not: then gpu-info reports fill in).
//!
//! nvidia-smi hangs when the driver does (a GPU fallen off the bus, a stuck reset): every run
//! is bounded by a timeout, after which it is killed with what it started, and it runs on a
//! thread of its own so the process list and gpu-info reports keep their pace meanwhile.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llmscope::state::DeviceSample;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmiApp {
    pub pid: u32,
    pub gpu_uuid: String,
    pub memory_bytes: Option<f64>,
}

/// One nvidia-smi reading: the GPUs and the compute apps on them, or why there is none.
pub type SmiResult = Result<(Vec<DeviceSample>, Vec<SmiApp>), String>;

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

/// `--query-gpu=GPU_QUERY --format=csv,noheader,nounits`, as the agent's device samples
/// (what nvidia-smi does not say is left out, as NVML's unsupported fields are).
pub fn parse_gpus(csv: &str) -> Result<Vec<DeviceSample>, String> {
    csv.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f = fields(line);
            if f.len() != 8 {
                return Err(format!("expected 8 fields, got {}: {line:?}", f.len()));
            }
            Ok(DeviceSample {
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
                ..DeviceSample::default()
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

/// Most output read from one run (a GPU line is ~100 bytes, an app line ~60).
const OUTPUT_LIMIT: u64 = 1 << 20;

fn query(program: &str, arg: String, timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.arg(arg)
        .arg("--format=csv,noheader,nounits")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so a timeout kills whatever it started too.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(OUTPUT_LIMIT).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => break None,
        }
    };
    let Some(status) = status else {
        kill(&mut child);
        return Err(format!(
            "{program} did not answer within {timeout:?}: killed"
        ));
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!(
            "{program} failed with {status}: {}",
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Kills the child and its process group (its pipes close with them).
fn kill(child: &mut std::process::Child) {
    #[cfg(unix)]
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: signals the process group this child leads (process_group(0) above).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs nvidia-smi twice (GPUs, then compute apps), each run within `timeout`.
pub fn sample(program: &str, timeout: Duration) -> SmiResult {
    let gpus = parse_gpus(&query(
        program,
        format!("--query-gpu={GPU_QUERY}"),
        timeout,
    )?)?;
    let apps = parse_apps(&query(
        program,
        format!("--query-compute-apps={APP_QUERY}"),
        timeout,
    )?)?;
    Ok((gpus, apps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_hung_nvidia_smi_is_killed_at_the_timeout_with_what_it_started() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("llmscope-smi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let smi = dir.join("nvidia-smi");
        let pid_file = dir.join("sleeper.pid");
        // What a hung driver looks like: a child that never answers.
        std::fs::write(
            &smi,
            format!(
                "#!/bin/sh\nsleep 3600 &\necho $! > {}\nwait\n",
                pid_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = Instant::now();
        let err = sample(smi.to_str().unwrap(), Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("did not answer within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30), "bounded");
        let sleeper = std::fs::read_to_string(&pid_file).unwrap();
        let gone = (0..100).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", sleeper.trim()));
            // Gone, or a zombie waiting for init.
            let done = state.map_or(true, |s| s.contains(") Z"));
            if !done {
                std::thread::sleep(Duration::from_millis(20));
            }
            done
        });
        assert!(gone, "what nvidia-smi started is killed with it");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
