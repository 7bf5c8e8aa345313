//! Docker's Engine API, for what a container id alone does not say: the container's name
//! and image, and, for containers the kubelet started through Docker (cri-dockerd), the pod,
//! namespace and container name from the labels it sets. One `GET /containers/<id>/json`
//! over the local socket with the bounded client (`crate::http_client`: one deadline, a size
//! limit); the caller runs it off the scrape path.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::http_client::{self, Limits, Request, Response};

/// Largest inspect answer read (a container with thousands of labels or mounts is still far
/// below it).
const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Http(PathBuf, http_client::HttpError),
    #[error("{0}: unexpected answer: {1}")]
    Protocol(PathBuf, String),
}

/// The part of Docker's inspect answer read.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    #[serde(default)]
    name: String,
    #[serde(default)]
    config: Option<InspectConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectConfig {
    #[serde(default)]
    image: String,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
}

/// What Docker says about a container, as label values (sanitised by the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerContainer {
    /// Docker's name, without the leading `/`.
    pub name: String,
    pub image: String,
    /// From the kubelet's labels (`io.kubernetes.*`), when Kubernetes started it.
    pub pod: String,
    pub namespace: String,
    pub kubernetes_container: String,
}

pub struct Docker {
    socket: PathBuf,
    timeout: Duration,
}

impl Docker {
    pub fn new(socket: &Path, timeout: Duration) -> Docker {
        Docker {
            socket: socket.to_owned(),
            timeout,
        }
    }

    /// The container with this id (full or unique prefix); `Ok(None)` when Docker does not
    /// know it.
    pub fn inspect(&self, id: &str) -> Result<Option<DockerContainer>, DockerError> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.is_empty() {
            return Err(DockerError::Protocol(
                self.socket.clone(),
                format!("not a container id: {id:?}"),
            ));
        }
        let conn = UnixStream::connect(&self.socket)
            .map_err(|e| DockerError::Io(self.socket.clone(), e))?;
        let path = format!("/containers/{id}/json");
        let request = Request {
            host: "docker",
            path: &path,
            accept: "application/json",
            authorization: None,
        };
        let limits = Limits {
            timeout: self.timeout,
            max_bytes: MAX_RESPONSE,
        };
        let answer = http_client::get(conn, &request, limits, |_| false)
            .map_err(|e| DockerError::Http(self.socket.clone(), e))?;
        parse_inspect(&answer).map_err(|e| DockerError::Protocol(self.socket.clone(), e))
    }
}

pub(crate) fn parse_inspect(answer: &Response) -> Result<Option<DockerContainer>, String> {
    match answer.status {
        200 if !answer.complete => return Err("answer too large or cut short".into()),
        200 => {}
        404 => return Ok(None),
        other => return Err(format!("status {other}")),
    }
    let inspect: Inspect = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
    let config = inspect.config.unwrap_or(InspectConfig {
        image: String::new(),
        labels: None,
    });
    let labels = config.labels.unwrap_or_default();
    let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
    Ok(Some(DockerContainer {
        name: inspect.name.trim_start_matches('/').to_owned(),
        image: config.image,
        pod: label("io.kubernetes.pod.name"),
        namespace: label("io.kubernetes.pod.namespace"),
        kubernetes_container: label("io.kubernetes.container.name"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_inspect(raw: &[u8]) -> Result<Option<DockerContainer>, String> {
        let answer = http_client::parse(raw, true)
            .map_err(|e| e.to_string())?
            .ok_or("no head")?;
        super::parse_inspect(&answer)
    }

    #[test]
    fn inspect_answers() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Id\":\"abc\",\"Name\":\"/vllm-qwen\",\"Config\":{\"Image\":\"vllm/vllm-openai:v0.11.0\",\"Labels\":{\"io.kubernetes.pod.name\":\"qwen-0\",\"io.kubernetes.pod.namespace\":\"inference\",\"io.kubernetes.container.name\":\"server\"}}}";
        assert_eq!(
            parse_inspect(ok).unwrap(),
            Some(DockerContainer {
                name: "vllm-qwen".into(),
                image: "vllm/vllm-openai:v0.11.0".into(),
                pod: "qwen-0".into(),
                namespace: "inference".into(),
                kubernetes_container: "server".into(),
            })
        );
        let plain = b"HTTP/1.0 200 OK\r\n\r\n{\"Name\":\"/web\",\"Config\":{\"Image\":\"nginx\",\"Labels\":null}}";
        assert_eq!(parse_inspect(plain).unwrap().unwrap().pod, "");
        assert_eq!(
            parse_inspect(b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"No such container\"}")
                .unwrap(),
            None
        );
        assert!(parse_inspect(b"HTTP/1.0 500 Oops\r\n\r\n{}").is_err());
        assert!(parse_inspect(b"HTTP/1.0 200 OK\r\n\r\n{not json").is_err());
        assert!(parse_inspect(b"garbage").is_err());
    }
}
