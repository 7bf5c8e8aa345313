//! Inference servers' own metrics endpoints: which TCP ports a classified server listens on
//! (its socket inodes joined with `/proc/<pid>/net/tcp{,6}`, as its network namespace sees
//! them; the port in argv is only a hint, never trusted), and whether the framework's metrics
//! path answers there — so that Prometheus can be told where to scrape (`GET /api/sd`).

mod probe;
mod sockets;

pub use probe::{probe, Probe};
pub use sockets::{listening, parse_tcp_table};

use crate::identity::Framework;

/// Where a framework serves its Prometheus metrics, and what a genuine answer contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsPath {
    pub path: &'static str,
    /// Metric-name prefixes of that framework (any one of them present: it is its endpoint).
    pub prefixes: &'static [&'static str],
}

/// The metrics path of a server framework; None for frameworks without Prometheus metrics.
pub fn metrics_path(framework: Framework) -> Option<MetricsPath> {
    let (path, prefixes): (&'static str, &'static [&'static str]) = match framework {
        Framework::Vllm => ("/metrics", &["vllm:"]),
        // Both spellings occur across SGLang releases.
        Framework::Sglang => ("/metrics", &["sglang:", "sglang_"]),
        Framework::Tgi => ("/metrics", &["tgi_"]),
        Framework::LlamaCpp => ("/metrics", &["llamacpp:"]),
        Framework::Triton => ("/metrics", &["nv_inference_"]),
        _ => return None,
    };
    Some(MetricsPath { path, prefixes })
}
