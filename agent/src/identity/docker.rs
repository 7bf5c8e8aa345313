//! Docker's Engine API, for what a container id alone does not say: the container's name
//! and image, and, for containers the kubelet started through Docker (cri-dockerd), the pod,
//! namespace and container name from the labels it sets. One `GET /containers/<id>/json`
//! over the local socket, HTTP/1.0 (the daemon answers and closes: no chunking, no
//! keep-alive), with timeouts and a size limit; the caller runs it off the scrape path.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest inspect answer read (a container with thousands of labels or mounts is still far
/// below it).
const MAX_RESPONSE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: unexpected answer: {1}")]
    Protocol(PathBuf, String),
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
        let io = |e| DockerError::Io(self.socket.clone(), e);
        let mut stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        write!(
            stream,
            "GET /containers/{id}/json HTTP/1.0\r\nHost: docker\r\n\r\n"
        )
        .map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE + 1)
            .read_to_end(&mut raw)
            .map_err(io)?;
        if raw.len() as u64 > MAX_RESPONSE {
            return Err(DockerError::Protocol(
                self.socket.clone(),
                "answer too large".into(),
            ));
        }
        parse_inspect(&raw).map_err(|e| DockerError::Protocol(self.socket.clone(), e))
    }
}

pub(crate) fn parse_inspect(raw: &[u8]) -> Result<Option<DockerContainer>, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    match status {
        200 => {}
        404 => return Ok(None),
        other => return Err(format!("status {other}")),
    }
    let body: serde_json::Value =
        serde_json::from_slice(&raw[split + 4..]).map_err(|e| e.to_string())?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let labels = &body["Config"]["Labels"];
    Ok(Some(DockerContainer {
        name: text(&body["Name"]).trim_start_matches('/').to_owned(),
        image: text(&body["Config"]["Image"]),
        pod: text(&labels["io.kubernetes.pod.name"]),
        namespace: text(&labels["io.kubernetes.pod.namespace"]),
        kubernetes_container: text(&labels["io.kubernetes.container.name"]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
