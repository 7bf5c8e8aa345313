//! llmscope-fallback: the llmscope metrics where eBPF is not there (Windows, or a Linux host
//! without it). Every `--interval` it lists processes, classifies them with the agent's code,
//! reads gpu-info reports with the agent's hardened reader, and asks nvidia-smi when there is
//! one; `/metrics` serves the last poll with the agent's names and labels.

mod collector;
mod poller;
mod smi;
mod source;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use llmscope::collectors::gpuinfo::GpuInfoCollector;
use llmscope::collectors::process::ProcessCollector;
use llmscope::config::{parse_duration, Common};
use llmscope::gpuinfo::{scan, Limits, Processes};
use llmscope::http::MetricsSource;
use llmscope::identity::{Rules, RulesFile};
use llmscope::metrics::{gather, BuildInfo, Collector, Families, ProcessSample};
use llmscope::state::{GpuInfoView, GpuSample, ProcessGpu, ProcessView, Published};
use llmscope::web_config::WebConfig;

use crate::collector::SmiCollector;
use crate::poller::{Inputs, Poll, Poller, SmiView};
use crate::source::{ProcInfo, ProcessSource, SysinfoSource};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "llmscope-fallback",
    version,
    about = "llmscope's polling agent: the same LLM-process metrics where eBPF is not available (Windows)."
)]
struct Config {
    #[command(flatten)]
    common: Common,
    /// How often processes, gpu-info reports and nvidia-smi are read.
    #[arg(long, env = "LLMSCOPE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    interval: Duration,
    /// nvidia-smi to run (looked up on PATH); a missing or failing one shows as
    /// llmscope_collector_success{collector="nvidia_smi"} 0.
    #[arg(long, env = "LLMSCOPE_NVIDIA_SMI", default_value = "nvidia-smi")]
    nvidia_smi: String,
    /// Do not run nvidia-smi.
    #[arg(long, env = "LLMSCOPE_NO_NVIDIA_SMI")]
    no_nvidia_smi: bool,
    /// An nvidia-smi run that takes longer is killed (a hung driver) and shows as
    /// llmscope_collector_success{collector="nvidia_smi"} 0; nvidia-smi runs on a thread of
    /// its own, so processes and gpu-info reports are polled meanwhile.
    #[arg(long = "nvidia-smi-timeout", env = "LLMSCOPE_NVIDIA_SMI_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    nvidia_smi_timeout: Duration,
}

impl Config {
    /// The agent's checks of the shared flags, and this binary's own; every problem at once.
    fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        self.common.check(&mut problems);
        if self.interval < Duration::from_millis(100) {
            problems.push("--interval must be at least 100ms".to_owned());
        }
        if self.nvidia_smi_timeout < Duration::from_millis(100) {
            problems.push("--nvidia-smi-timeout must be at least 100ms".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// What the last poll published, and the collectors that read it.
struct Source {
    processes: Arc<Published<ProcessView>>,
    gpu_info: Arc<Published<GpuInfoView>>,
    smi: Arc<Published<SmiView>>,
    collectors: Vec<Box<dyn Collector>>,
    last_poll: Mutex<Instant>,
    interval: Duration,
}

impl Source {
    fn new(config: &Config) -> Source {
        let processes = Arc::new(Published::default());
        let gpu_info = Arc::new(Published::default());
        let smi = Arc::new(Published::default());
        let mut collectors: Vec<Box<dyn Collector>> =
            vec![Box::new(ProcessCollector::new(Arc::clone(&processes)))];
        if config.common.gpu_info_dir.is_some() {
            collectors.push(Box::new(GpuInfoCollector::new(Arc::clone(&gpu_info), None)));
        }
        if !config.no_nvidia_smi {
            collectors.push(Box::new(SmiCollector::new(Arc::clone(&smi))));
        }
        Source {
            processes,
            gpu_info,
            smi,
            collectors,
            last_poll: Mutex::new(Instant::now()),
            interval: config.interval,
        }
    }

    fn publish(&self, polled: Poll) {
        self.processes.set(polled.processes);
        if let Some(view) = polled.gpu_info {
            self.gpu_info.set(view);
        }
        if let Some(view) = polled.smi {
            self.smi.set(view);
        }
        *self
            .last_poll
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }
}

impl MetricsSource for Source {
    fn gather(&self) -> Families {
        gather(&self.collectors, &self.build_info())
    }

    fn processes(&self) -> Vec<ProcessSample> {
        self.processes.get().samples.clone()
    }

    fn build_info(&self) -> BuildInfo {
        BuildInfo::new("polling")
    }

    /// The processes, with the GPUs and per-process GPU memory nvidia-smi reported.
    fn node(&self) -> llmscope::api::Node {
        let smi = self.smi.get();
        let gpus = GpuSample {
            devices: smi.devices.clone(),
            processes: smi
                .processes
                .iter()
                .filter_map(|(labels, gpu, bytes)| {
                    Some(ProcessGpu {
                        pid: labels.pid.parse().ok()?,
                        gpu: gpu.gpu.parse().ok()?,
                        memory_bytes: Some(*bytes),
                        ..ProcessGpu::default()
                    })
                })
                .collect(),
            ..GpuSample::default()
        };
        llmscope::api::Node::new(llmscope::api::Parts {
            build: self.build_info(),
            samples: &self.processes(),
            nvml: Some(&gpus),
            cuda: &Default::default(),
            requests: &Default::default(),
        })
    }

    fn health(&self) -> Result<(), String> {
        let age = self
            .last_poll
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed();
        if age <= self.interval * 3 + Duration::from_secs(5) {
            Ok(())
        } else {
            Err(format!("the last poll finished {age:?} ago"))
        }
    }
}

/// Owners and start times for the gpu-info reader, from the poll's own process list.
struct Polled<'a>(&'a [ProcInfo]);

impl Processes for Polled<'_> {
    fn owner_and_start(&self, pid: u32) -> Option<(Option<u32>, f64)> {
        let p = self.0.iter().find(|p| p.pid == pid)?;
        Some((owner(pid), p.start_time as f64))
    }

    /// No PID namespaces here: the process with this pid, if it started then (its creation
    /// time in Unix seconds).
    fn find(&self, pid: u32, start_time_ticks: u64) -> Vec<u32> {
        self.0
            .iter()
            .filter(|p| p.pid == pid && p.start_time == start_time_ticks)
            .map(|p| p.pid)
            .collect()
    }
}

#[cfg(unix)]
fn owner(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

#[cfg(not(unix))]
fn owner(_pid: u32) -> Option<u32> {
    None
}

fn poll_forever(
    config: Config,
    mut processes: SysinfoSource,
    rules: Option<(RulesFile, Rules)>,
    source: Arc<Source>,
    stop: Arc<AtomicBool>,
) {
    let mut poller = Poller::new(
        config.common.grace_period,
        config.common.max_processes as usize,
    );
    let (mut rules_file, rules) = rules.unzip();
    if let Some(rules) = rules {
        poller.set_rules(Some(Arc::new(rules)));
    }
    let limits = Limits {
        ttl: config.common.gpu_info_ttl,
        ..Default::default()
    };
    let smi = (!config.no_nvidia_smi).then(|| spawn_smi(&config, stop.clone()));
    while !stop.load(Ordering::Relaxed) {
        // Every poll classifies every process again: new rules apply to this one.
        match rules_file.as_mut().and_then(RulesFile::reload_if_changed) {
            None => {}
            Some(Ok(rules)) => {
                tracing::info!(
                    event = "classify_rules_reloaded",
                    rules = rules.len(),
                    "classification rules reloaded"
                );
                poller.set_rules(Some(Arc::new(rules)));
            }
            Some(Err(e)) => {
                tracing::warn!(event = "classify_rules_reload_failed", error = %e, "classification rules file changed but cannot be used: the rules in use are kept");
                poller.rules_reload_failed();
            }
        }
        let listed = processes.list();
        let gpu_info = config.common.gpu_info_dir.as_ref().map(|dir| {
            scan(dir, &limits, &Polled(&listed), SystemTime::now())
                .map_err(|e| format!("--gpu-info-dir {}: {e}", dir.display()))
        });
        let smi = smi.as_ref().map(|latest| {
            latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        });
        source.publish(poller.poll(Inputs {
            processes: listed,
            gpu_info,
            smi,
            now: Instant::now(),
        }));
        let deadline = Instant::now() + config.interval;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The nvidia-smi thread: runs it every `--interval` (each run bounded by
/// `--nvidia-smi-timeout`) and keeps the latest answer for the poll to read.
fn spawn_smi(config: &Config, stop: Arc<AtomicBool>) -> Arc<Mutex<smi::SmiResult>> {
    let latest = Arc::new(Mutex::new(
        Err("nvidia-smi has not answered yet".to_owned()),
    ));
    let (program, timeout, interval) = (
        config.nvidia_smi.clone(),
        config.nvidia_smi_timeout,
        config.interval,
    );
    let shared = latest.clone();
    let spawned = std::thread::Builder::new()
        .name("llmscope-smi".into())
        .spawn(move || {
            let mut last_error: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                let result = smi::sample(&program, timeout);
                match &result {
                    Err(e) if last_error.as_ref() != Some(e) => {
                        tracing::warn!("nvidia-smi: {e}; GPU device metrics are left out");
                        last_error = Some(e.clone());
                    }
                    Err(_) => {}
                    Ok(_) => last_error = None,
                }
                *shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = result;
                let deadline = Instant::now() + interval;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
    if let Err(e) = spawned {
        *latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Err(format!("cannot start the nvidia-smi thread: {e}"));
    }
    latest
}

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(problems) = config.validate() {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!("\nFor more information, try '--help'.");
        return ExitCode::from(2);
    }
    llmscope::logging::init(&config.common.log_level, config.common.log_format);
    let source = Arc::new(Source::new(&config));
    let stop = Arc::new(AtomicBool::new(false));
    let processes = match SysinfoSource::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rules = match config.common.load_rules() {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("error: --classify.rules {e}");
            return ExitCode::from(2);
        }
    };
    let poller = {
        let (config, source, stop) = (config.clone(), source.clone(), stop.clone());
        std::thread::Builder::new()
            .name("llmscope-poll".into())
            .spawn(move || poll_forever(config, processes, rules, source, stop))
    };
    let Ok(poller) = poller else {
        eprintln!("error: cannot start the polling thread");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let web = match config
        .common
        .web_config_file
        .as_deref()
        .map(WebConfig::load)
    {
        None => None,
        Some(Ok(web)) => Some(Arc::new(web)),
        Some(Err(e)) => {
            eprintln!("error: --web.config.file {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.common.listen_address).await?;
        tracing::info!(address = %config.common.listen_address, interval = ?config.interval, "serving /metrics");
        llmscope::http::serve(listener, source, web, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    });
    stop.store(true, Ordering::Relaxed);
    let _ = poller.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("--web.listen-address {}: {e}", config.common.listen_address);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_flags_have_the_agents_defaults_and_checks() {
        let agent = llmscope::config::Config::try_parse_from(["llmscope"]).unwrap();
        let fallback = Config::try_parse_from(["llmscope-fallback"]).unwrap();
        assert_eq!(
            format!("{:?}", agent.common),
            format!("{:?}", fallback.common)
        );
        let range = Config::try_parse_from(["llmscope-fallback", "--max-processes", "0"]);
        assert!(range.is_err(), "--max-processes has the agent's range");
        let bad = Config::try_parse_from([
            "llmscope-fallback",
            "--grace-period",
            "0s",
            "--interval",
            "10ms",
            "--log-level",
            "lo[ud",
        ])
        .unwrap();
        assert_eq!(
            bad.validate().unwrap_err().len(),
            3,
            "every problem is reported at once"
        );
    }
}
