//! Where the process list comes from: sysinfo on the real system (Windows or Linux), or a
//! fake in tests.

use std::path::Path;

/// One process as a poll sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    pub exe: String,
    pub argv: Vec<String>,
    /// Start time, seconds since the Unix epoch: with the pid, identifies the process.
    pub start_time: u64,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub threads: Option<u64>,
}

pub trait ProcessSource: Send {
    fn list(&mut self) -> Vec<ProcInfo>;
}

pub struct SysinfoSource {
    system: sysinfo::System,
}

impl SysinfoSource {
    pub fn new() -> Result<Self, String> {
        let system =
            sysinfo::System::new().map_err(|e| format!("reading the process list: {e}"))?;
        Ok(SysinfoSource { system })
    }
}

impl ProcessSource for SysinfoSource {
    fn list(&mut self) -> Vec<ProcInfo> {
        use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, UpdateKind};
        let kind = ProcessRefreshKind::nothing()
            .with_cpu()
            .with_memory()
            .with_cmd(UpdateKind::OnlyIfNotSet)
            .with_exe(UpdateKind::OnlyIfNotSet)
            .with_tasks();
        self.system
            .refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
        self.system
            .processes()
            .values()
            .filter(|p| p.thread_kind().is_none())
            .map(|p| ProcInfo {
                pid: p.pid().as_u32(),
                ppid: p.parent().map_or(0, sysinfo::Pid::as_u32),
                name: p.name().to_string_lossy().into_owned(),
                exe: p
                    .exe()
                    .map(Path::to_string_lossy)
                    .unwrap_or_default()
                    .into_owned(),
                argv: p
                    .cmd()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
                start_time: p.start_time(),
                cpu_seconds: p.accumulated_cpu_time() as f64 / 1000.0,
                memory_bytes: p.memory(),
                threads: p.tasks().map(|t| t.len() as u64),
            })
            .collect()
    }
}
