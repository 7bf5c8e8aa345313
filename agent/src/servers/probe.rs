//! One bounded GET of a server's API path (`crate::http_client`: a connect timeout, one
//! deadline for the whole answer, a size limit), read only until its kind is clear. Only what
//! the answer is gets kept, never the body.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::http_client::{self, HttpError, Limits, Request, Response};

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
    let Ok(conn) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
        return Outcome::Refused;
    };
    let host = addr.to_string();
    let request = Request {
        host: &host,
        path: api.path(),
        accept: match api {
            Api::Metrics { .. } => "text/plain",
            Api::OllamaPs => "application/json",
        },
        authorization: None,
    };
    let limits = Limits {
        timeout: ANSWER_TIMEOUT,
        max_bytes: MAX_READ,
    };
    // Metrics are recognised by their first names: no need to read them all.
    let answered = |r: &Response| matches!(classify(r, api), Outcome::Answered(_));
    match http_client::get(conn, &request, limits, answered) {
        Ok(r) => classify(&r, api),
        Err(HttpError::Timeout(_)) => Outcome::Timeout,
        Err(HttpError::TooLarge(_)) => Outcome::TooLarge,
        Err(HttpError::Io(_) | HttpError::Malformed(_)) => Outcome::Other,
    }
}

/// What an answer (all of it, or as far as it was read) says.
pub(crate) fn classify(r: &Response, api: Api) -> Outcome {
    let incomplete = if r.complete {
        Outcome::Other
    } else {
        Outcome::TooLarge
    };
    match (api, r.status) {
        // llama.cpp's server answers 501 on /metrics unless started with --metrics.
        (Api::Metrics { .. }, 501) => Outcome::Answered(Answer::Disabled),
        (Api::Metrics { prefixes, .. }, 200) => {
            let named = prefixes
                .iter()
                .any(|p| r.body.windows(p.len()).any(|w| w == p.as_bytes()));
            let text = r.content_type.as_deref().is_none_or(|t| {
                t.starts_with("text/plain") || t.starts_with("application/openmetrics-text")
            });
            match (named, text) {
                (true, true) => Outcome::Answered(Answer::Metrics),
                (true, false) => Outcome::WrongContentType,
                (false, _) => incomplete,
            }
        }
        (Api::OllamaPs, 200) if r.complete => parse_ps(&r.body)
            .map(|models| Outcome::Answered(Answer::Ollama(models)))
            .unwrap_or(Outcome::Other),
        (Api::OllamaPs, 200) => incomplete,
        _ if r.complete => Outcome::Other,
        _ => incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Framework;
    use crate::servers::api;

    /// What `raw` says, read to its end (`complete`) or cut there.
    fn outcome(raw: &[u8], api: Api, complete: bool) -> Outcome {
        match http_client::parse(raw, complete) {
            Ok(Some(r)) => classify(&r, api),
            Ok(None) => Outcome::TooLarge,
            Err(_) => Outcome::Other,
        }
    }

    fn metrics(answer: &str, framework: Framework) -> Outcome {
        outcome(answer.as_bytes(), api(framework).unwrap(), true)
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
        assert_eq!(outcome(junk.as_bytes(), vllm, false), Outcome::TooLarge);
        assert_eq!(
            outcome(b"HTTP/1.1 200 OK\r\nX: ", vllm, false),
            Outcome::TooLarge
        );
        let named = "HTTP/1.1 200 OK\r\n\r\n# TYPE vllm:num_requests_running gauge\n";
        assert_eq!(
            outcome(named.as_bytes(), vllm, false),
            Outcome::Answered(Answer::Metrics)
        );
    }
}
