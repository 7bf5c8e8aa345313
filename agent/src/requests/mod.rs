//! Request telemetry for inference servers: what their HTTP exchanges say — route, model,
//! status, time to the first response byte and to the last, tokens — measured from the side,
//! for servers that export no such metrics themselves (Ollama, llama-server without
//! `--metrics`, most OpenAI-compatible shims).
//!
//! Data flow: the probes ([`probes`]) copy a bounded prefix of each read and write on a
//! server's accepted connections into a ring; [`Connections`] feeds each record to its
//! connection's parser ([`exchange`] over [`http1`] and [`json`]); each exchange that ends
//! is added to [`RequestMetrics`], which the collector exports in the OpenTelemetry GenAI
//! server conventions' Prometheus form. Nothing of a body is kept past its parse: no byte
//! of a prompt or a completion is stored, logged or exported.

pub mod exchange;
pub mod http1;
pub mod json;
pub mod kernel;
pub mod probes;

use std::collections::{BTreeMap, HashMap};

use agent_common::http::{HttpRecord, HTTP_ACCEPT, HTTP_CLOSE, HTTP_IN, HTTP_OUT};

use crate::identity::{looks_like_secret, sanitize_label, UNKNOWN};
use crate::metrics::Histogram;
use exchange::{Completed, Connection, Outcome};

/// Connections followed at once, over every probed server.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Series (process × model × route × status class) kept at once.
pub const MAX_SERIES: usize = 4_096;
/// Distinct request models per process; more are counted as `other` (clients choose them).
pub const MAX_MODELS_PER_PROCESS: usize = 16;

/// OpenTelemetry's advice for `gen_ai.server.request.duration`.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// … for `gen_ai.server.time_to_first_token`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// … for `gen_ai.server.time_per_output_token`.
pub const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];

/// One ring record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: u32,
    pub tgid: u32,
    /// The connection: an fd, or the kernel's socket address.
    pub conn: u64,
    /// Bytes of the stream the record stands for (`data`, then a gap).
    pub len: u64,
    pub at_ns: u64,
    pub data: &'a [u8],
}

/// Decodes one record; None for a record too short for what its head says.
pub fn decode(bytes: &[u8]) -> Option<Record<'_>> {
    let head_len = size_of::<HttpRecord>();
    let head = bytes.get(..head_len)?;
    let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(head[o..o + 8].try_into().unwrap());
    let copied = u32_at(32) as usize;
    let data = bytes.get(head_len..head_len.checked_add(copied)?)?;
    Some(Record {
        kind: u32_at(0),
        tgid: u32_at(4),
        conn: u64_at(8),
        len: u64_at(16).max(copied as u64),
        at_ns: u64_at(24),
        data,
    })
}

/// What was counted about the records themselves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Exchanges on routes that are not inference (health checks, metrics).
    pub other_exchanges: u64,
    /// Connections given up, by reason.
    pub given_up: HashMap<&'static str, u64>,
    /// Requests dropped because too many waited on one connection.
    pub overflow: u64,
    /// Connections not followed because [`MAX_CONNECTIONS`] were.
    pub connections_dropped: u64,
    /// Records that did not decode.
    pub malformed_records: u64,
}

/// The followed connections of every probed server.
#[derive(Default)]
pub struct Connections {
    open: HashMap<(u32, u64), Connection>,
    pub stats: Stats,
}

impl Connections {
    /// Handles one record; calls `done(tgid, exchange)` for each exchange that ended.
    pub fn record(&mut self, r: Record<'_>, done: &mut impl FnMut(u32, Completed)) {
        let key = (r.tgid, r.conn);
        if r.kind == HTTP_ACCEPT {
            // A new connection on a reused fd: whatever was kept for the fd is stale.
            self.open.remove(&key);
            self.insert(key, Connection::default());
            return;
        }
        if matches!(r.kind, HTTP_IN | HTTP_OUT) && !self.open.contains_key(&key) {
            // Open before the probes were: read from its next request on.
            self.insert(key, Connection::resyncing());
        }
        let stats = &mut self.stats;
        let mut outcome = |o: Outcome| match o {
            Outcome::Completed(c) => done(r.tgid, c),
            Outcome::Other => stats.other_exchanges += 1,
            Outcome::GaveUp(t) => *stats.given_up.entry(t.as_str()).or_default() += 1,
            Outcome::Overflow => stats.overflow += 1,
        };
        match r.kind {
            HTTP_CLOSE => {
                if let Some(mut c) = self.open.remove(&key) {
                    c.close(r.at_ns, &mut outcome);
                }
            }
            HTTP_IN | HTTP_OUT => {
                if let Some(c) = self.open.get_mut(&key) {
                    c.feed(r.kind == HTTP_IN, r.data, r.len, r.at_ns, &mut outcome);
                }
            }
            _ => stats.malformed_records += 1,
        }
    }

    fn insert(&mut self, key: (u32, u64), c: Connection) {
        if self.open.len() >= MAX_CONNECTIONS {
            self.stats.connections_dropped += 1;
            return;
        }
        self.open.insert(key, c);
    }

    /// Forgets the connections of a process that is no longer probed.
    pub fn forget(&mut self, tgid: u32) {
        self.open.retain(|&(t, _), _| t != tgid);
        if self.open.capacity() > 4 * self.open.len() + 64 {
            self.open.shrink_to_fit();
        }
    }

    /// Requests in flight (read, not yet answered in full) per process.
    pub fn in_flight(&self) -> HashMap<u32, u64> {
        let mut n: HashMap<u32, u64> = HashMap::new();
        for (&(tgid, _), c) in &self.open {
            *n.entry(tgid).or_default() += c.in_flight() as u64;
        }
        n
    }
}

/// A series' key: process, request model (sanitised), route, status class.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub pid: u32,
    pub model: String,
    pub route: &'static str,
    pub status_class: &'static str,
}

/// What the exchanges of one series measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub duration: Histogram,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub input_tokens: u64,
    /// Output tokens by where the count came from.
    pub output_tokens: BTreeMap<&'static str, u64>,
}

impl Series {
    /// Adds another series' observations to this one's.
    pub fn merge(&mut self, other: &Series) {
        self.duration.merge(&other.duration);
        self.time_to_first_token.merge(&other.time_to_first_token);
        self.time_per_output_token
            .merge(&other.time_per_output_token);
        self.input_tokens += other.input_tokens;
        for (source, n) in &other.output_tokens {
            *self.output_tokens.entry(source).or_default() += n;
        }
    }
}

impl Default for Series {
    fn default() -> Self {
        Series {
            duration: Histogram::new(DURATION_BUCKETS),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            time_per_output_token: Histogram::new(TPOT_BUCKETS),
            input_tokens: 0,
            output_tokens: BTreeMap::new(),
        }
    }
}

/// The measured exchanges, per series, bounded.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    pub series: HashMap<SeriesKey, Series>,
    /// Exchanges not counted because [`MAX_SERIES`] series existed.
    pub series_dropped: u64,
}

impl RequestMetrics {
    /// Adds one exchange of process `pid`.
    pub fn add(&mut self, pid: u32, c: &Completed) {
        let model = self.model_label(pid, c.model.as_deref());
        let key = SeriesKey {
            pid,
            model,
            route: c.route,
            status_class: status_class(c.status),
        };
        if !self.series.contains_key(&key) && self.series.len() >= MAX_SERIES {
            self.series_dropped += 1;
            return;
        }
        let s = self.series.entry(key).or_default();
        let seconds = |ns: u64| ns as f64 / 1e9;
        s.duration.observe(seconds(c.duration_ns));
        let ok = (200..300).contains(&c.status);
        if let (true, true, Some(first)) = (ok, c.streamed, c.first_byte_ns) {
            s.time_to_first_token.observe(seconds(first));
            if let Some((n, _)) = c.output_tokens.filter(|(n, _)| *n > 1) {
                let generating = c.duration_ns.saturating_sub(first);
                s.time_per_output_token
                    .observe(seconds(generating) / (n - 1) as f64);
            }
        }
        s.input_tokens += c.input_tokens.unwrap_or(0);
        if let Some((n, source)) = c.output_tokens {
            *s.output_tokens.entry(source.as_str()).or_default() += n;
        }
    }

    /// The request's model as a label: sanitised, never a secret, and one of at most
    /// [`MAX_MODELS_PER_PROCESS`] per process (`other` past them).
    fn model_label(&self, pid: u32, raw: Option<&str>) -> String {
        let label = raw
            .map(sanitize_label)
            .filter(|l| !l.is_empty() && !looks_like_secret(l))
            .unwrap_or_else(|| UNKNOWN.to_owned());
        let mut models: Vec<&str> = self
            .series
            .keys()
            .filter(|k| k.pid == pid)
            .map(|k| k.model.as_str())
            .collect();
        models.sort_unstable();
        models.dedup();
        if models.contains(&label.as_str()) || models.len() < MAX_MODELS_PER_PROCESS {
            label
        } else {
            "other".to_owned()
        }
    }

    /// Drops the series of processes not in `live` (their series end with the process).
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) {
        self.series.retain(|k, _| live(k.pid));
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exchange::TokenSource;

    fn record(kind: u32, conn: u64, data: &[u8], extra: u64, at: u64) -> Vec<u8> {
        let head = HttpRecord {
            kind,
            tgid: 42,
            conn,
            len: data.len() as u64 + extra,
            ktime_ns: at,
            copied: data.len() as u32,
            reserved: 0,
        };
        // SAFETY: HttpRecord is repr(C) plain integers without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const head).cast::<u8>(), size_of::<HttpRecord>())
        };
        [bytes, data].concat()
    }

    #[test]
    fn records_decode_and_short_ones_do_not() {
        let r = record(HTTP_IN, 7, b"GET", 5, 99);
        let d = decode(&r).unwrap();
        assert_eq!(
            (d.kind, d.tgid, d.conn, d.len, d.at_ns, d.data),
            (HTTP_IN, 42, 7, 8, 99, &b"GET"[..])
        );
        assert_eq!(decode(&r[..r.len() - 1]), None);
        assert_eq!(decode(&r[..10]), None);
    }

    #[test]
    fn connections_follow_accept_data_and_close() {
        let mut c = Connections::default();
        let mut done = Vec::new();
        let req = b"POST /completion HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"model\":\"m-1\"}";
        let res =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"tokens_predicted\":3}";
        for r in [
            record(HTTP_ACCEPT, 5, b"", 0, 0),
            record(HTTP_IN, 5, req, 0, 1_000),
            record(HTTP_OUT, 5, res, 0, 2_000_000),
            record(HTTP_CLOSE, 5, b"", 0, 3_000_000),
        ] {
            c.record(decode(&r).unwrap(), &mut |pid, x| done.push((pid, x)));
        }
        assert_eq!(done.len(), 1, "{done:?}");
        let (pid, x) = &done[0];
        assert_eq!(
            (*pid, x.model.as_deref(), x.duration_ns),
            (42, Some("m-1"), 2_999_000)
        );
        assert_eq!(x.output_tokens, Some((3, TokenSource::Server)));
        assert!(c.open.is_empty());
    }

    #[test]
    fn a_connection_open_before_the_probes_is_read_from_its_next_request() {
        let mut c = Connections::default();
        let mut done = Vec::new();
        let mut feed = |c: &mut Connections, kind, data: &[u8]| {
            let r = record(kind, 9, data, 0, 5);
            c.record(decode(&r).unwrap(), &mut |_, x| done.push(x));
        };
        // The middle of an earlier exchange, then a whole one.
        feed(&mut c, HTTP_IN, b"ntent\":\"hi\"}]}");
        feed(&mut c, HTTP_OUT, b"data: {}\n\n");
        feed(
            &mut c,
            HTTP_IN,
            b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        );
        feed(
            &mut c,
            HTTP_OUT,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert_eq!(done.len(), 1);
        assert_eq!(c.stats.given_up, HashMap::new());
    }

    #[test]
    fn connections_are_bounded() {
        let mut c = Connections::default();
        for fd in 0..=MAX_CONNECTIONS as u64 {
            c.record(
                decode(&record(HTTP_ACCEPT, fd, b"", 0, 0)).unwrap(),
                &mut |_, _| {},
            );
        }
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        assert_eq!(c.stats.connections_dropped, 1);
    }

    fn completed(model: &str, status: u16, streamed: bool) -> Completed {
        Completed {
            route: "/v1/chat/completions",
            model: Some(model.into()),
            status,
            streamed,
            duration_ns: 1_100_000_000,
            first_byte_ns: Some(100_000_000),
            input_tokens: Some(5),
            output_tokens: Some((11, TokenSource::Server)),
        }
    }

    #[test]
    fn exchanges_become_series() {
        let mut m = RequestMetrics::default();
        m.add(1, &completed("org/m?sig=secret", 200, true));
        m.add(
            1,
            &completed("sk-abcdefghijklmnopqrstuvwxyz0123", 503, false),
        );
        let key = |model: &str, class| SeriesKey {
            pid: 1,
            model: model.into(),
            route: "/v1/chat/completions",
            status_class: class,
        };
        let ok = &m.series[&key("org/m", "2xx")];
        assert_eq!(ok.duration.count(), 1);
        assert_eq!(ok.time_to_first_token.count(), 1);
        assert!(
            (ok.time_per_output_token.sum() - 0.1).abs() < 1e-9,
            "1 s over 10 tokens"
        );
        assert_eq!((ok.input_tokens, ok.output_tokens["server"]), (5, 11));
        let failed = &m.series[&key(UNKNOWN, "5xx")];
        assert_eq!(
            failed.time_to_first_token.count(),
            0,
            "only successful streams"
        );
    }

    #[test]
    fn clients_cannot_grow_the_series_without_bound() {
        let mut m = RequestMetrics::default();
        for i in 0..100 {
            m.add(1, &completed(&format!("model-{i}"), 200, false));
        }
        assert_eq!(
            m.series.len(),
            MAX_MODELS_PER_PROCESS + 1,
            "16 models and other"
        );
        for pid in 2..=(MAX_SERIES as u32 + 1) {
            m.add(pid, &completed("m", 200, false));
        }
        assert_eq!(m.series.len(), MAX_SERIES);
        assert!(m.series_dropped > 0);
        m.retain(|pid| pid == 1);
        assert_eq!(m.series.len(), MAX_MODELS_PER_PROCESS + 1);
    }
}
