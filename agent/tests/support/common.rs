//! Test helpers that know nothing of the agent: waiting, an HTTP client, an exposition
//! parser. Shared by the agent's tests and windows-fallback's (included by path).
#![allow(dead_code)]

use std::collections::HashMap;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns Some or `limit` passes. The limit only bounds a
/// hang; assertions never depend on how fast something happened.
pub fn wait_for<T>(limit: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_for(limit, Duration::from_millis(20), f)
}

/// [`wait_for`] with a chosen polling interval.
pub fn poll_for<T>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET with the agent's own bounded client; returns (status, content type, body). An
/// answer cut short is an error.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> Result<(u16, String, String), llmscope::http_client::HttpError> {
    use llmscope::http_client::{get_tcp, HttpError, Limits, Request};
    let host = addr.to_string();
    let request = Request {
        host: &host,
        path,
        accept: accept.unwrap_or("*/*"),
        authorization: None,
    };
    let limits = Limits {
        timeout: Duration::from_secs(10),
        max_bytes: 256 << 20,
    };
    let answer = get_tcp(addr, &request, Duration::from_secs(2), limits)?;
    if !answer.complete {
        return Err(HttpError::Malformed(format!(
            "{path}: the answer was cut short"
        )));
    }
    Ok((
        answer.status,
        answer.content_type.unwrap_or_default(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

/// A scraped exposition.
pub struct Exposition(pub String);

pub type Labels = HashMap<String, String>;

impl Exposition {
    /// Samples of `name` as (labels, value).
    pub fn samples(&self, name: &str) -> Vec<(Labels, f64)> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (metric, labels) = match series.split_once('{') {
                    Some((m, rest)) => (m, parse_labels(rest.strip_suffix('}')?)),
                    None => (series, Labels::new()),
                };
                if metric != name {
                    return None;
                }
                Some((labels, value.parse().ok()?))
            })
            .collect()
    }

    /// Samples of `name` whose labels include every `(key, value)` of `want`.
    pub fn find(&self, name: &str, want: &[(&str, &str)]) -> Vec<(Labels, f64)> {
        self.samples(name)
            .into_iter()
            .filter(|(l, _)| {
                want.iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    pub fn value(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.find(name, want).first().map(|(_, v)| *v)
    }
}

fn parse_labels(s: &str) -> Labels {
    let mut labels = Labels::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// Resident memory of process `pid`, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}
