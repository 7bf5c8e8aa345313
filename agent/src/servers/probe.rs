//! One bounded GET of a server's API path: a connect timeout, one deadline for the whole
//! answer (a server that drips a byte a second is cut off, not waited on), a size limit,
//! HTTP/1.0 (the server answers and closes). Only what the answer is gets kept, never the body.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::ollama::{parse_ps, LoadedModel};
use super::Api;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The whole answer, headers and body, within this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read at most: enough to see a framework's metric names, or Ollama's model list.
const MAX_READ: usize = 256 * 1024;

/// What a server answered on its API path.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The framework's Prometheus metrics are there.
    Metrics,
    /// The server answers, but its metrics are off (llama.cpp without `--metrics`: 501).
    Disabled,
    /// Ollama's loaded models.
    Ollama(Vec<LoadedModel>),
}

impl Answer {
    /// `state` of `llm_server_metrics_endpoint`.
    pub fn state(&self) -> &'static str {
        match self {
            Answer::Metrics => "metrics",
            Answer::Disabled => "disabled",
            Answer::Ollama(_) => "ollama_api",
        }
    }
}

/// A probe's result, as counted in `llmscope_server_probes_total{kind}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Answered(Answer),
    /// Nothing accepted the connection in time.
    Refused,
    /// The answer did not end within [`ANSWER_TIMEOUT`].
    Timeout,
    /// More than [`MAX_READ`] bytes without the framework's names in them.
    TooLarge,
    /// Metrics served as something other than the Prometheus or OpenMetrics text formats.
    WrongContentType,
    /// Something else answers there.
    Other,
}

agent_common::label_enum! {
    /// What a probe found (`kind` of `llmscope_server_probes_total`).
    pub enum ProbeKind {
        Metrics = "metrics",
        Disabled = "disabled",
        Ollama = "ollama",
        Refused = "refused",
        Timeout = "timeout",
        TooLarge = "too_large",
        WrongContentType = "wrong_content_type",
        Other = "other",
    }
}

impl Outcome {
    pub fn kind(&self) -> ProbeKind {
        match self {
            Outcome::Answered(Answer::Metrics) => ProbeKind::Metrics,
            Outcome::Answered(Answer::Disabled) => ProbeKind::Disabled,
            Outcome::Answered(Answer::Ollama(_)) => ProbeKind::Ollama,
            Outcome::Refused => ProbeKind::Refused,
            Outcome::Timeout => ProbeKind::Timeout,
            Outcome::TooLarge => ProbeKind::TooLarge,
            Outcome::WrongContentType => ProbeKind::WrongContentType,
            Outcome::Other => ProbeKind::Other,
        }
    }
}

pub fn probe(addr: SocketAddr, api: Api) -> Outcome {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
        return Outcome::Refused;
    };
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
    let accept = match api {
        Api::Metrics { .. } => "text/plain",
        Api::OllamaPs => "application/json",
    };
    if write!(
        stream,
        "GET {} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n",
        api.path()
    )
    .is_err()
    {
        return Outcome::Other;
    }
    let mut raw = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Outcome::Timeout;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return classify(&raw, api, true),
            Ok(n) => {
                raw.extend_from_slice(&chunk[..n.min(MAX_READ - raw.len())]);
                if raw.len() >= MAX_READ {
                    return classify(&raw, api, false);
                }
                // Metrics are recognised by their first names: no need to read them all.
                if let Outcome::Answered(answer) = classify(&raw, api, false) {
                    return Outcome::Answered(answer);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Outcome::Timeout
            }
            Err(_) => return classify(&raw, api, true),
        }
    }
}

/// What `raw` (the answer so far; `complete` when the server closed) says.
pub(crate) fn classify(raw: &[u8], api: Api, complete: bool) -> Outcome {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if complete {
            Outcome::Other
        } else {
            Outcome::TooLarge
        };
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let body = &raw[end + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_ascii_lowercase())
    });
    let incomplete = if complete {
        Outcome::Other
    } else {
        Outcome::TooLarge
    };
    match (api, status) {
        // llama.cpp's server answers 501 on /metrics unless started with --metrics.
        (Api::Metrics { .. }, 501) => Outcome::Answered(Answer::Disabled),
        (Api::Metrics { prefixes, .. }, 200) => {
            let named = prefixes
                .iter()
                .any(|p| body.windows(p.len()).any(|w| w == p.as_bytes()));
            let text = content_type.as_deref().is_none_or(|t| {
                t.starts_with("text/plain") || t.starts_with("application/openmetrics-text")
            });
            match (named, text) {
                (true, true) => Outcome::Answered(Answer::Metrics),
                (true, false) => Outcome::WrongContentType,
                (false, _) => incomplete,
            }
        }
        (Api::OllamaPs, 200) if complete => parse_ps(body)
            .map(|models| Outcome::Answered(Answer::Ollama(models)))
            .unwrap_or(Outcome::Other),
        (Api::OllamaPs, 200) => incomplete,
        _ if complete => Outcome::Other,
        _ => incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Framework;
    use crate::servers::api;

    fn metrics(answer: &str, framework: Framework) -> Outcome {
        classify(answer.as_bytes(), api(framework).unwrap(), true)
    }

    #[test]
    fn answers() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\r\n# HELP llamacpp:prompt_tokens_total x\nllamacpp:prompt_tokens_total 4\n";
        assert_eq!(
            metrics(ok, Framework::LlamaCpp),
            Outcome::Answered(Answer::Metrics)
        );
        let off = "HTTP/1.1 501 Not Implemented\r\n\r\n{\"error\":{\"message\":\"This server does not support metrics endpoint.\"}}";
        assert_eq!(
            metrics(off, Framework::LlamaCpp),
            Outcome::Answered(Answer::Disabled)
        );
        let other = "HTTP/1.1 200 OK\r\n\r\nnode_cpu_seconds_total 1\n";
        assert_eq!(metrics(other, Framework::LlamaCpp), Outcome::Other);
        assert_eq!(metrics("", Framework::LlamaCpp), Outcome::Other);
        assert_eq!(
            metrics(
                "HTTP/1.1 200 OK\r\n\r\nsglang_num_running_reqs 1\n",
                Framework::Sglang
            ),
            Outcome::Answered(Answer::Metrics)
        );
        let html =
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>vllm:num_requests_running</p>";
        assert_eq!(metrics(html, Framework::Vllm), Outcome::WrongContentType);
    }

    #[test]
    fn a_partial_answer_is_too_large_unless_it_names_the_framework() {
        let vllm = api(Framework::Vllm).unwrap();
        let junk = format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(1000));
        assert_eq!(classify(junk.as_bytes(), vllm, false), Outcome::TooLarge);
        assert_eq!(
            classify(b"HTTP/1.1 200 OK\r\nX: ", vllm, false),
            Outcome::TooLarge
        );
        let named = "HTTP/1.1 200 OK\r\n\r\n# TYPE vllm:num_requests_running gauge\n";
        assert_eq!(
            classify(named.as_bytes(), vllm, false),
            Outcome::Answered(Answer::Metrics)
        );
    }
}
