//! Command-line flags, with `LLMSCOPE_*` environment variables as fallbacks. Parsed and
//! validated before anything starts; a bad value is a usage error (exit code 2) naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A path, or "" for "do not use".
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// The flags every llmscope binary takes (the agent and windows-fallback), with the same
/// defaults and checks.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Address to serve /metrics, /healthz and /api/processes on.
    #[arg(
        long = "web.listen-address",
        env = "LLMSCOPE_WEB_LISTEN_ADDRESS",
        default_value = "127.0.0.1:9101"
    )]
    pub listen_address: SocketAddr,

    /// TLS and basic authentication for the HTTP endpoints, in the Prometheus
    /// exporter-toolkit web configuration format (tls_server_config, basic_auth_users).
    #[arg(long = "web.config.file", env = "LLMSCOPE_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,

    /// How long the series of an exited process stay before they disappear (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "LLMSCOPE_GRACE_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub grace_period: Duration,

    /// Most LLM processes tracked at once; more are dropped and counted.
    #[arg(long, env = "LLMSCOPE_MAX_PROCESSES", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_processes: u32,

    /// Directory of `gpu-info-<pid>.json` reports written by processes (see README).
    #[arg(long, env = "LLMSCOPE_GPU_INFO_DIR")]
    pub gpu_info_dir: Option<PathBuf>,

    /// A gpu-info report older than this (by its timestamp) is stale and ignored.
    #[arg(long, env = "LLMSCOPE_GPU_INFO_TTL", default_value = "60s", value_parser = parse_duration)]
    pub gpu_info_ttl: Duration,

    /// User classification rules (YAML; README "Classification rules"): tried before the
    /// built-in rules, they name in-house servers or exclude processes. Read again when the
    /// file changes (a bad version is reported and the rules in use are kept).
    #[arg(long = "classify.rules", env = "LLMSCOPE_CLASSIFY_RULES")]
    pub classify_rules: Option<PathBuf>,

    /// Log level or tracing filter (error, warn, info, debug, trace, or e.g. "llmscope=debug").
    #[arg(long, env = "LLMSCOPE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: text (for people; coloured only on a terminal), logfmt or json (one object
    /// per line), for log systems. Operator events carry a stable `event` field.
    #[arg(
        long = "log.format",
        env = "LLMSCOPE_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: crate::logging::LogFormat,
}

impl Common {
    /// The rules file, read and compiled (None: no `--classify.rules`).
    pub fn load_rules(
        &self,
    ) -> Result<
        Option<(crate::identity::RulesFile, crate::identity::Rules)>,
        crate::identity::RulesError,
    > {
        self.classify_rules
            .as_deref()
            .map(crate::identity::RulesFile::load)
            .transpose()
    }

    /// Adds what is wrong with these flags to `problems`.
    pub fn check(&self, problems: &mut Vec<String>) {
        if self.grace_period.is_zero() {
            problems.push("--grace-period must be greater than 0".to_owned());
        }
        if let Some(dir) = &self.gpu_info_dir {
            if !dir.is_dir() {
                problems.push(format!("--gpu-info-dir {}: not a directory", dir.display()));
            }
        }
        if let Err(e) = self.load_rules() {
            problems.extend(
                e.problems
                    .iter()
                    .map(|p| format!("--classify.rules {}: {p}", e.file.display())),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            problems.push(format!(
                "--log-level {:?} is not a level or tracing filter",
                self.log_level
            ));
        }
    }
}

/// What the binary does besides running the agent.
#[cfg(feature = "top")]
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// A live terminal view of an agent (this host's by default): GPUs, and processes
    /// grouped server → workers with their CPU, memory, GPU memory, CUDA work and requests.
    Top(crate::top::TopArgs),
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "llmscope",
    version,
    about = "Sees every LLM process on this machine the moment it execs, and exports it to Prometheus.",
    args_conflicts_with_subcommands = true
)]
pub struct Config {
    /// Without a command: run the agent.
    #[cfg(feature = "top")]
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: Common,

    /// Docker's API socket, asked for the name (and, for containers the kubelet started, the
    /// pod and namespace) of the containers LLM processes run in. Empty: never asked. A
    /// missing socket is skipped.
    #[arg(
        long = "container.docker-socket",
        env = "LLMSCOPE_CONTAINER_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock",
        value_parser = path_or_empty
    )]
    pub docker_socket: Option<PathBuf>,

    /// containerd's state directory, where its CRI plugin writes each container's bundle
    /// with the pod, namespace and container name. Empty: not read; missing: skipped.
    #[arg(
        long = "container.containerd-state",
        env = "LLMSCOPE_CONTAINER_CONTAINERD_STATE",
        default_value = "/run/containerd",
        value_parser = path_or_empty
    )]
    pub containerd_state: Option<PathBuf>,

    /// CRI-O's storage run directory (bundles with the same names). Empty: not read;
    /// missing: skipped.
    #[arg(
        long = "container.crio-storage",
        env = "LLMSCOPE_CONTAINER_CRIO_STORAGE",
        default_value = "/run/containers/storage",
        value_parser = path_or_empty
    )]
    pub crio_storage: Option<PathBuf>,

    /// The host Prometheus should use for an inference server listening on all addresses of
    /// the agent's or the host's network namespace (`GET /api/sd`); by default 127.0.0.1 for
    /// the agent's (Prometheus on the same machine), the host's own address for the host's.
    #[arg(long = "sd.advertise-host", env = "LLMSCOPE_SD_ADVERTISE_HOST")]
    pub sd_advertise_host: Option<String>,

    /// Root of the proc filesystem to read (the host's /proc mounted at /host/proc in a container).
    #[arg(
        long = "path.procfs",
        env = "LLMSCOPE_PATH_PROCFS",
        default_value = "/proc"
    )]
    pub procfs: PathBuf,

    /// How often a /proc scan repairs what the kernel events missed (lost events).
    #[arg(long, env = "LLMSCOPE_RESCAN_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub rescan_interval: Duration,

    /// Most distinct model_name values exported at once (any local user can start processes
    /// with made-up names); past it, new names are exported as model_name="other" and counted.
    #[arg(long, env = "LLMSCOPE_MAX_MODEL_NAMES", default_value_t = crate::tracker::DEFAULT_MAX_MODEL_NAMES as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_model_names: u32,

    /// CPU the kernel-launch probes may cost each CUDA process, in percent of one core. The
    /// launch probes are attached for a window of every second, sized to this budget, and
    /// counts are extrapolated; 100 keeps them attached (exact counts), 0 turns them off.
    #[arg(long, env = "LLMSCOPE_CUDA_OVERHEAD_BUDGET", default_value_t = 0.5)]
    pub cuda_overhead_budget: f64,

    /// Period of the launch-probe duty cycle: one attach and one detach per period. Longer
    /// periods cost fewer (un)registrations — each stalls probed processes briefly — but
    /// extrapolate over longer stretches.
    #[arg(long, env = "LLMSCOPE_CUDA_LAUNCH_PERIOD", default_value = "1s", value_parser = parse_duration)]
    pub cuda_launch_period: Duration,

    /// How long a probed CUDA library file stays probed after the last process mapping it
    /// exited; then its probes are removed (pod churn brings a new library copy per image).
    #[arg(long, env = "LLMSCOPE_CUDA_LIBRARY_IDLE_TIMEOUT", default_value = "1m", value_parser = parse_duration)]
    pub cuda_library_idle_timeout: Duration,

    /// Most CUDA library files probed at once. When the table is full, a library no live
    /// process maps is unprobed to make room (whatever its idle time); only a table of
    /// libraries all in use refuses a new one (counted as too_many_libraries).
    #[arg(long, env = "LLMSCOPE_CUDA_MAX_LIBRARIES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub cuda_max_libraries: u32,

    /// libnvidia-ml to load (default: the system's libnvidia-ml.so.1).
    #[arg(long, env = "LLMSCOPE_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,

    /// Do not load NVML: no GPU device metrics, no per-process GPU memory or utilisation.
    #[arg(long, env = "LLMSCOPE_NO_NVML")]
    pub no_nvml: bool,

    /// How often NVML is sampled (off the scrape path).
    #[arg(long, env = "LLMSCOPE_NVML_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub nvml_interval: Duration,

    /// How libraries being mapped are seen: auto (the best the kernel has: fentry, kprobe,
    /// perf records, in that order), or one forced — fentry, kprobe or perf (the agent does not
    /// start when the kernel lacks it) — or scan (no hook: the /proc scans only).
    #[arg(
        long = "library-hook",
        env = "LLMSCOPE_LIBRARY_HOOK",
        value_enum,
        default_value_t
    )]
    pub library_hook: LibraryHook,

    /// Request telemetry (requests, latency and tokens of inference servers, read from their
    /// own connections by per-process libc probes): `auto` for servers that export no such
    /// metrics themselves (no Prometheus endpoint found: Ollama, llama-server without
    /// --metrics), `all` for every server found listening, or `off`.
    #[arg(long, env = "LLMSCOPE_REQUESTS", value_enum, default_value_t)]
    pub requests: RequestsMode,

    /// How request telemetry reads the servers' connections: auto (hooks on the kernel's TCP
    /// send, receive and close — fentry, else kprobe — where the kernel has them; else
    /// per-process uprobes on the servers' libc, which cannot see Go servers such as Ollama),
    /// or one forced: fentry or kprobe (the agent does not start when the kernel lacks it),
    /// or libc.
    #[arg(
        long = "requests-hook",
        env = "LLMSCOPE_REQUESTS_HOOK",
        value_enum,
        default_value_t
    )]
    pub requests_hook: RequestsHook,

    /// Size of the kernel → agent event ring buffer: a power of two, at least one page. A
    /// larger ring loses fewer events under exec storms; losses are counted and repaired by
    /// the periodic scan either way.
    #[arg(long, env = "LLMSCOPE_RING_BUFFER_BYTES", default_value_t = 256 * 1024)]
    pub ring_buffer_bytes: u32,
}

impl Config {
    /// Checks what clap cannot: every problem is reported, not just the first.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        self.common.check(&mut problems);
        if self.rescan_interval < Duration::from_secs(1) {
            problems.push("--rescan-interval must be at least 1s".to_owned());
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60))
            .contains(&self.cuda_launch_period)
        {
            problems.push("--cuda-launch-period must be between 100ms and 60s".to_owned());
        }
        if !(0.0..=100.0).contains(&self.cuda_overhead_budget) {
            problems.push(format!(
                "--cuda-overhead-budget {} must be between 0 and 100 (percent of one core)",
                self.cuda_overhead_budget
            ));
        }
        let page = 4096;
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < page {
            problems.push(format!(
                "--ring-buffer-bytes {} must be a power of two of at least {page}",
                self.ring_buffer_bytes
            ));
        }
        if !self.procfs.join("stat").is_file() {
            problems.push(format!(
                "--path.procfs {}: no proc filesystem there (no stat file)",
                self.procfs.display()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Which library hook to use (`--library-hook`): the best the kernel has, or one forced
/// (for tests of each path, or to rule one out on a node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LibraryHook {
    /// fentry, else kprobe, else perf records, else the /proc scans alone.
    #[default]
    Auto,
    /// A BPF trampoline on `security_mmap_file`; the agent does not start without one.
    Fentry,
    /// A kprobe on `security_mmap_file`; the agent does not start without one.
    Kprobe,
    /// The kernel's perf records of executable mappings; the agent does not start without.
    Perf,
    /// No hook: libraries are found by the /proc scans only (`--rescan-interval`).
    Scan,
}

/// Which inference servers request telemetry follows (`--requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RequestsMode {
    /// Servers with no metrics endpoint of their own.
    #[default]
    Auto,
    /// Every server found listening.
    All,
    Off,
}

/// How request telemetry reads connections (`--requests-hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RequestsHook {
    /// fentry, else kprobe, else libc.
    #[default]
    Auto,
    /// BPF trampolines on tcp_sendmsg, tcp_recvmsg and tcp_close.
    Fentry,
    /// kprobes on the same functions.
    Kprobe,
    /// Uprobes on each followed server's libc socket functions.
    Libc,
}

/// `250ms`, `10s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 1m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10y").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn defaults_and_bad_flags() {
        let c = Config::try_parse_from(["llmscope"]).unwrap();
        assert_eq!(c.common.listen_address.to_string(), "127.0.0.1:9101");
        assert_eq!(c.common.grace_period, Duration::from_secs(10));
        assert_eq!(c.rescan_interval, Duration::from_secs(30));
        let err = Config::try_parse_from(["llmscope", "--grace-period", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--grace-period"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let bad = Config::try_parse_from([
            "llmscope",
            "--grace-period",
            "0s",
            "--rescan-interval",
            "10ms",
            "--path.procfs",
            "/nonexistent",
            "--log-level",
            "lo[ud",
            "--ring-buffer-bytes",
            "5000",
            "--cuda-overhead-budget",
            "150",
        ])
        .unwrap();
        assert_eq!(
            bad.validate().unwrap_err().len(),
            6,
            "every problem is reported at once"
        );
    }
}
