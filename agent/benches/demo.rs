//! `cargo xtask demo`: a whole llmscope environment without a GPU, to look at every metric
//! and point a Grafana at. (A bench target because that is how a binary gets the agent's path
//! and the test fixtures' helpers; it measures nothing.)

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::demo::Demo;
use support::require_root;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_root();
    let seconds: u32 = std::env::var("LLMSCOPE_DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let port: u16 = std::env::var("LLMSCOPE_DEMO_PROMETHEUS_PORT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9090);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("starting the llmscope demo (agent, CUDA and NVML test doubles, workloads, a stand-in inference server, Prometheus)…");
    let demo = Demo::start(port, seconds);
    println!(
        "\nllmscope demo is running for {seconds} s (Ctrl-C stops it):\n\
         \n  agent metrics     http://{}/metrics\n  agent processes   http://{}/api/processes\n  inference server  http://{}/metrics\n  Prometheus        http://{}  (try: llm_process_cuda_kernel_launches_total)\n\
         \nGrafana: add a Prometheus data source at http://{} and import dashboards/*.json.",
        demo.agent.addr, demo.agent.addr, demo.server, demo.prometheus.addr, demo.prometheus.addr
    );
    let started = Instant::now();
    while !STOP.load(Ordering::Relaxed)
        && started.elapsed() < Duration::from_secs(u64::from(seconds))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopping…");
}
