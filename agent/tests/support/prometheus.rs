//! Debian's Prometheus, started for one test with a given configuration, on a free port, with
//! its own storage; killed and removed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// A child process killed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Prometheus {
    pub addr: SocketAddr,
    _process: Killed,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` (prometheus.yml) and waits until it answers.
    pub fn start(config: &str) -> Prometheus {
        Prometheus::start_on(free_port(), config)
    }

    /// The same, listening on `port`.
    pub fn start_on(port: u16, config: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("llmscope-prometheus-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let process = Killed(
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting prometheus (cargo xtask installs Debian's prometheus package)"),
        );
        let prometheus = Prometheus {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            _process: process,
            dir,
        };
        let up = wait_for(Duration::from_secs(30), || {
            http_get(prometheus.addr, "/-/ready", None)
                .ok()
                .filter(|(code, _, _)| *code == 200)
        });
        assert!(up.is_some(), "Prometheus did not start with:\n{config}");
        prometheus
    }

    /// Evaluates `expr` now; None while Prometheus does not answer.
    pub fn query(&self, expr: &str) -> Option<serde_json::Value> {
        let (_, _, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
            None,
        )
        .ok()?;
        serde_json::from_str(&body).ok()
    }

    /// The result vector of `expr` when it has at least one element.
    pub fn vector(&self, expr: &str) -> Option<Vec<serde_json::Value>> {
        let r = self.query(expr)?;
        let v = r["data"]["result"].as_array()?.clone();
        (!v.is_empty()).then_some(v)
    }

    /// Prometheus's GET `path` as JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let (_, _, body) = http_get(self.addr, path, None).unwrap();
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
