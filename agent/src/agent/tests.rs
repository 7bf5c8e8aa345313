//! The producer threads' logic without a kernel: a [`Table`] whose kernel set is a plain
//! set, over the real /proc, with real processes (this test process, and children it
//! starts). No root needed.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::containers::Containers;
use super::observe::{observe_with_env, track_gpu_user, How};
use super::sampler::{Sampler, Views};
use super::servers::Discovery;
use super::table::{Life, Table};
use crate::identity::ProcessFacts;
use crate::proc::ProcRoot;
use crate::servers::Answer;
use crate::state::{Counters, NvmlState, Published};
use crate::tracker::{Observed, Tracker};

fn table() -> Table {
    let (containers, _) = Containers::new(false);
    Table::new(
        ProcRoot::new("/proc").expect("/proc"),
        Duration::from_secs(30),
        Tracker::new(64),
        Box::new(HashSet::<u32>::new()),
        Arc::new(containers),
        Arc::new(Life::default()),
    )
}

fn sampler(counters: &Arc<Counters>) -> (Sampler, Views) {
    let views = Views::default();
    let published = Views {
        processes: views.processes.clone(),
        gpu_info: views.gpu_info.clone(),
    };
    (Sampler::new(views, counters.clone()), published)
}

/// A sleeping child tracked as a GPU user, read once by a sampler, then killed (its exit
/// event never comes: there is no kernel here).
struct Ended {
    table: Table,
    counters: Arc<Counters>,
    sampler: Sampler,
    views: Views,
    pid: u32,
}

impl Ended {
    fn new() -> Ended {
        let table = table();
        let counters = Arc::new(Counters::default());
        let (mut sampler, views) = sampler(&counters);
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("starting sleep");
        let pid = child.id();
        track_gpu_user(&table, pid, "test");
        sampler.pass(&table, Instant::now(), true);
        let read = views.processes.get();
        let sample = read
            .samples
            .iter()
            .find(|s| s.labels.pid == pid.to_string())
            .expect("the tracked child is read");
        // Read right after its exec, its RSS may still be 0: what it shows is its own stat.
        assert!(
            sample.alive && sample.threads == Some(1) && sample.start_time_seconds > 0.0,
            "{sample:?}"
        );
        assert_eq!(sample.labels.framework, "unknown");
        child.kill().unwrap();
        child.wait().unwrap();
        Ended {
            table,
            counters,
            sampler,
            views,
            pid,
        }
    }

    fn pass(&mut self) {
        self.sampler.pass(&self.table, Instant::now(), true);
    }

    fn missed_exits(&self) -> u64 {
        Counters::get(&self.counters.missed_exit)
    }
}

#[test]
fn the_sampler_repairs_a_lost_exit_once_a_later_drain_did_not_bring_it() {
    let mut ended = Ended::new();
    ended.pass();
    std::thread::sleep(Duration::from_millis(300));
    ended.table.set_drained(Instant::now());
    ended.pass();
    let view = ended.views.processes.get();
    let sample = view
        .samples
        .iter()
        .find(|s| s.labels.pid == ended.pid.to_string())
        .expect("kept through its grace period");
    assert!(!sample.alive);
    assert_eq!(ended.missed_exits(), 1);
}

#[test]
fn an_exit_the_events_thread_has_not_drained_yet_is_not_a_missed_one() {
    let mut ended = Ended::new();
    // No drain has ended since: the exit may still be in the ring.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        ended.pass();
    }
    assert_eq!(ended.missed_exits(), 0);
    let view = ended.views.processes.get();
    assert!(view.members.iter().any(|m| m.pid == ended.pid && m.alive));
    // The exit event arrives.
    assert!(ended.table.exited(ended.pid));
    assert!(!ended.table.exited(ended.pid), "an exit is handled once");
}

/// A process this test pretends is a llama.cpp server: this very process, whose listener
/// answers like one.
#[test]
fn discovery_finds_a_servers_metrics_endpoint() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut stream = stream.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let body =
                "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 4\n";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let table = table();
    let pid = std::process::id();
    let mut facts = ProcessFacts {
        pid,
        ppid: 1,
        comm: "llama-server".into(),
        exe: "/usr/bin/llama-server".into(),
        argv: ["llama-server", "-m", "/models/tiny.gguf", "--metrics"]
            .map(String::from)
            .to_vec(),
        env: Vec::new(),
        libraries: Vec::new(),
    };
    let observed = observe_with_env(&table, &mut facts, How::New);
    assert!(matches!(observed, Observed::Added(_)), "{observed:?}");
    let counters = Arc::new(Counters::default());
    let (mut sampler, views) = sampler(&counters);
    sampler.pass(&table, Instant::now(), true);

    let servers = Arc::new(Published::default());
    let mut discovery = Discovery::new(&table, views.processes.clone(), servers.clone(), None);
    discovery.pass(&table);
    let view = servers.get();
    let target = format!("127.0.0.1:{port}");
    let endpoint = view
        .endpoints
        .iter()
        .find(|e| e.target == target)
        .unwrap_or_else(|| panic!("{target} in {:?}", view.endpoints));
    assert_eq!(endpoint.answer, Answer::Metrics);
    assert_eq!(endpoint.labels.framework, "llama.cpp");
    assert_eq!(endpoint.labels.model_name, "tiny");
    server.join().unwrap();
}

#[test]
fn the_nvml_thread_publishes_why_nvml_is_missing_and_stops_when_asked() {
    let table = Arc::new(table());
    let health = super::health::Health::new();
    let view: Arc<Published<NvmlState>> = Arc::default();
    let thread = super::nvml::spawn(
        table.clone(),
        &health,
        view.clone(),
        Some("/nonexistent/libnvidia-ml.so.1".into()),
        Duration::from_millis(100),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while view.get().error.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = view.get();
    let error = state.error.as_deref().unwrap_or_default();
    assert!(error.starts_with("NVML unavailable"), "{error:?}");
    assert!(state.sample.is_none());
    health.stopping();
    table.life.stop();
    let stopped = Instant::now();
    thread.join().unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(2));
}
