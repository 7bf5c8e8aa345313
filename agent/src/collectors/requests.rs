//! Request telemetry (`crate::requests`) in the OpenTelemetry GenAI server conventions'
//! Prometheus form, per server process, request model (`model_name`: the model the request
//! asked for, sanitised and capped; the process's own when the request named none), route
//! and status class; and what the telemetry itself dropped or could not read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

use crate::api::ProcessRequests;
use crate::identity::UNKNOWN;
use crate::metrics::{CollectError, Collector, Families, Family, ProcessLabels};
use crate::requests::http1::Trouble;
use crate::requests::probes::ProbeFailure;
use crate::requests::{RequestMetrics, Series, Stats};
use crate::state::{ProcessView, Published};

static DURATION: Family = Family::histogram_seconds("gen_ai_server_request_duration", "Time from a request's first byte read to its response's last byte written (gen_ai.server.request.duration), measured by the request probes.");
static TTFT: Family = Family::histogram_seconds("gen_ai_server_time_to_first_token", "Time from a request's first byte to its streamed response's first body byte (gen_ai.server.time_to_first_token), successful streams only.");
static TPOT: Family = Family::histogram_seconds("gen_ai_server_time_per_output_token", "Time per output token after the first of a successful stream (gen_ai.server.time_per_output_token).");
static TOKENS: Family = Family::counter("gen_ai_server_tokens", "Tokens of measured exchanges by type (input, output) and source: server (the response said: usage, timings, eval_count) or chunks (stream events counted: an estimate).");
static IN_FLIGHT: Family = Family::gauge(
    "gen_ai_server_active_requests",
    "Requests read whose responses have not ended.",
);
static PROBED: Family = Family::gauge(
    "llmscope_http_probed_processes",
    "Server processes whose connections the request probes follow.",
);
static HOOK: Family = Family::gauge(
    "llmscope_http_hook",
    "How request telemetry reads connections (1 for the one in use): fentry or kprobe (hooks on the kernel's TCP functions, every server), libc (per-process uprobes: not Go servers), or off.",
);
static PROBE_FAILURES: Family = Family::counter("llmscope_http_probe_failures", "Server processes request telemetry could not follow, by reason (go: a Go program such as Ollama, which only the kernel hooks see; no_libc: a static binary; attach: the kernel refused, or its tables were full).");
static OTHER: Family = Family::counter(
    "llmscope_http_other_exchanges",
    "Exchanges on routes that are not inference (health checks, metrics): counted only.",
);
static GIVEN_UP: Family = Family::counter("llmscope_http_connections_given_up", "Connections whose bytes could not be followed, by reason (tls and http2 are out of reach; gap: bytes not copied where the framing needed them).");
static DROPPED: Family = Family::counter(
    "llmscope_http_dropped",
    "What request telemetry dropped to stay bounded, by what (connection, request, series).",
);

/// One read of the request state.
pub struct RequestReading<'a> {
    pub metrics: &'a RequestMetrics,
    /// What the parsers counted.
    pub stats: &'a Stats,
    /// Requests in flight per probed process.
    pub in_flight: &'a HashMap<u32, u64>,
}

/// What the request collector reads: implemented by the agent's request state.
pub trait RequestSource: Send + Sync {
    /// Calls `f` with the state, locked that long.
    fn read(&self, f: &mut dyn FnMut(RequestReading<'_>));
    /// Processes probed now, and probe failures by reason.
    fn probes(&self) -> (usize, Vec<(&'static str, u64)>);
    /// How connections are read: `fentry`, `kprobe`, `libc` or `off`.
    fn hook(&self) -> &'static str;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Route {
    route: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    route: &'static str,
    status_class: &'static str,
    token_type: &'static str,
    source: &'static str,
}

pub struct RequestCollector {
    source: Arc<dyn RequestSource>,
    processes: Arc<Published<ProcessView>>,
}

impl RequestCollector {
    pub fn new(source: Arc<dyn RequestSource>, processes: Arc<Published<ProcessView>>) -> Self {
        RequestCollector { source, processes }
    }
}

impl Collector for RequestCollector {
    fn name(&self) -> &'static str {
        "requests"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let view = self.processes.get();
        let labels: HashMap<u32, &ProcessLabels> =
            view.members.iter().map(|m| (m.pid, &m.labels)).collect();
        self.source.read(&mut |r: RequestReading<'_>| {
            let (metrics, stats, in_flight) = (r.metrics, r.stats, r.in_flight);
            // A request that named no model is shown under the process's: merged with the
            // requests that named that one, so no two series share their labels.
            let mut merged: BTreeMap<(u32, String, &str, &str), Series> = BTreeMap::new();
            for (key, s) in &metrics.series {
                // Series of processes that left the table end with them.
                let Some(process) = labels.get(&key.pid) else {
                    continue;
                };
                let model = if key.model == UNKNOWN {
                    process.model_name.clone()
                } else {
                    key.model.clone()
                };
                merged
                    .entry((key.pid, model, key.route, key.status_class))
                    .or_default()
                    .merge(s);
            }
            for ((pid, model, route, status_class), s) in merged {
                let mut l = labels[&pid].clone();
                l.model_name = model;
                let route = Route {
                    route,
                    status_class,
                };
                out.add_histogram(&DURATION, (l.clone(), route.clone()), s.duration);
                if s.time_to_first_token.count() > 0 {
                    out.add_histogram(&TTFT, (l.clone(), route.clone()), s.time_to_first_token);
                }
                if s.time_per_output_token.count() > 0 {
                    let tpot = s.time_per_output_token;
                    out.add_histogram(&TPOT, (l.clone(), route.clone()), tpot);
                }
                let tokens = std::iter::once(("input", "server", s.input_tokens)).chain(
                    s.output_tokens
                        .iter()
                        .map(|(source, n)| ("output", *source, *n)),
                );
                for (token_type, source, n) in tokens {
                    let t = TokenLabels {
                        route: route.route,
                        status_class: route.status_class,
                        token_type,
                        source,
                    };
                    out.add(&TOKENS, (l.clone(), t), n as f64);
                }
            }
            let mut pids: Vec<_> = in_flight.iter().collect();
            pids.sort();
            for (pid, n) in pids {
                if let Some(process) = labels.get(pid) {
                    out.add(&IN_FLIGHT, (*process).clone(), *n as f64);
                }
            }
            out.set(&OTHER, stats.other_exchanges as f64);
            // Every reason from the start, at 0 until it happens.
            out.extend(
                &GIVEN_UP,
                Trouble::ALL.iter().map(|t| {
                    let n = stats.given_up.get(t.as_str()).copied().unwrap_or(0);
                    ([("reason", t.as_str())], n as f64)
                }),
            );
            out.extend(
                &DROPPED,
                [
                    ("connection", stats.connections_dropped),
                    ("request", stats.overflow),
                    ("series", metrics.series_dropped),
                    ("record", stats.malformed_records),
                ]
                .map(|(what, n)| ([("what", what)], n as f64)),
            );
        });
        let (probed, failures) = self.source.probes();
        out.set(&PROBED, probed as f64);
        out.extend(&HOOK, [([("hook", self.source.hook())], 1.0)]);
        out.extend(
            &PROBE_FAILURES,
            ProbeFailure::ALL.iter().map(|f| {
                let n = failures
                    .iter()
                    .find(|(r, _)| *r == f.as_str())
                    .map_or(0, |(_, n)| *n);
                ([("reason", f.as_str())], n as f64)
            }),
        );
        Ok(())
    }
}

/// The request totals of every process the request telemetry follows.
pub fn per_process(source: &dyn RequestSource) -> BTreeMap<u32, ProcessRequests> {
    let mut out: BTreeMap<u32, ProcessRequests> = BTreeMap::new();
    source.read(&mut |r: RequestReading<'_>| {
        for (key, s) in &r.metrics.series {
            let p = out.entry(key.pid).or_default();
            let n = s.duration.count();
            p.requests += n;
            p.duration_seconds_sum += s.duration.sum();
            if key.status_class == "5xx" {
                p.server_errors += n;
            }
            p.input_tokens += s.input_tokens;
            p.output_tokens += s.output_tokens.values().sum::<u64>();
        }
        for (&pid, &n) in r.in_flight {
            out.entry(pid).or_default().in_flight = n;
        }
    });
    out
}
