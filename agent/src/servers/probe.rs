//! One bounded GET of a server's metrics path: connect and answer timeouts, a size limit,
//! HTTP/1.0 (the server answers and closes). Only whether the framework's metrics are there
//! is kept, never the body.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::MetricsPath;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read at most: enough to see the framework's metric names.
const MAX_READ: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The framework's metrics answer there.
    Metrics,
    /// The server answers, but without metrics (llama.cpp without `--metrics`: 501).
    Disabled,
    /// Something else, or nothing, answers there.
    NotMetrics,
}

pub fn probe(addr: SocketAddr, metrics: MetricsPath) -> Probe {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
        return Probe::NotMetrics;
    };
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
    if write!(
        stream,
        "GET {} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n",
        metrics.path
    )
    .is_err()
    {
        return Probe::NotMetrics;
    }
    let mut raw = Vec::new();
    let _ = stream.take(MAX_READ).read_to_end(&mut raw);
    classify(&String::from_utf8_lossy(&raw), metrics)
}

fn classify(answer: &str, metrics: MetricsPath) -> Probe {
    let status: u16 = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    match status {
        200 if metrics.prefixes.iter().any(|p| body.contains(p)) => Probe::Metrics,
        // llama.cpp's server answers 501 on /metrics unless started with --metrics.
        501 => Probe::Disabled,
        _ => Probe::NotMetrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Framework;
    use crate::servers::metrics_path;

    #[test]
    fn answers() {
        let llama = metrics_path(Framework::LlamaCpp).unwrap();
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n# HELP llamacpp:prompt_tokens_total x\nllamacpp:prompt_tokens_total 4\n";
        assert_eq!(classify(ok, llama), Probe::Metrics);
        let off = "HTTP/1.1 501 Not Implemented\r\n\r\n{\"error\":{\"message\":\"This server does not support metrics endpoint.\"}}";
        assert_eq!(classify(off, llama), Probe::Disabled);
        let other = "HTTP/1.1 200 OK\r\n\r\nnode_cpu_seconds_total 1\n";
        assert_eq!(classify(other, llama), Probe::NotMetrics);
        assert_eq!(classify("", llama), Probe::NotMetrics);
        let sglang = metrics_path(Framework::Sglang).unwrap();
        assert_eq!(
            classify("HTTP/1.1 200 OK\r\n\r\nsglang_num_running_reqs 1\n", sglang),
            Probe::Metrics
        );
    }
}
