//! Inference servers' own endpoints: which TCP ports a classified server listens on (its
//! socket inodes joined with `/proc/<pid>/net/tcp{,6}`, as its network namespace sees them;
//! the port in argv is only a hint, never trusted), the addresses that namespace answers on,
//! and what the framework serves there — Prometheus metrics (published for `GET /api/sd`) or,
//! for Ollama, the models it has loaded (`GET /api/ps`).

pub(crate) mod addresses;
pub(crate) mod ollama;
pub(crate) mod probe;
/// Reads /proc through procfs: Linux only (windows-fallback finds no servers).
#[cfg(target_os = "linux")]
pub(crate) mod sockets;

pub use addresses::local_addresses;
pub use ollama::LoadedModel;
pub use probe::{probe, Answer, Outcome, ProbeKind};
#[cfg(target_os = "linux")]
pub use sockets::{accepted_fds, listening, parse_tcp_table, socket_inodes};

use crate::identity::Framework;

/// What a framework's server answers, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Prometheus metrics at `path`; any one of `prefixes` in the body: it is that framework's.
    Metrics {
        path: &'static str,
        prefixes: &'static [&'static str],
    },
    /// Ollama's list of loaded models (it has no Prometheus endpoint, ollama/ollama#3144).
    OllamaPs,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Metrics { path, .. } => path,
            Api::OllamaPs => "/api/ps",
        }
    }
}

/// The API of a server framework; None for frameworks whose servers llmscope does not query.
/// Paths and prefixes as each project's source has them (versions in the README).
pub fn api(framework: Framework) -> Option<Api> {
    let (path, prefixes): (&'static str, &'static [&'static str]) = match framework {
        Framework::Vllm => ("/metrics", &["vllm:"]),
        // Both spellings occur across SGLang releases.
        Framework::Sglang => ("/metrics", &["sglang:", "sglang_"]),
        Framework::Tgi => ("/metrics", &["tgi_"]),
        Framework::LlamaCpp => ("/metrics", &["llamacpp:"]),
        // On its metrics port (8002 by default); the HTTP and gRPC ports answer otherwise.
        Framework::Triton => ("/metrics", &["nv_inference_"]),
        // trtllm-serve's /metrics is JSON iteration statistics; Prometheus's is here.
        Framework::TensorrtLlm => ("/prometheus/metrics", &["trtllm_"]),
        // OpenTelemetry's exporter: `api_call` carries no prefix.
        Framework::Localai => ("/metrics", &["localai_", "api_call"]),
        Framework::Ollama => return Some(Api::OllamaPs),
        // A server a user rule names: any Prometheus text on the usual path is its own.
        Framework::Custom(_) => ("/metrics", &["# TYPE "]),
        _ => return None,
    };
    Some(Api::Metrics { path, prefixes })
}
