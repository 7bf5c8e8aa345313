//! The log: one event per line on stderr, as `--log.format` says (node_exporter's flag) —
//! `text` for people (coloured only on a terminal), `logfmt` or `json` for Loki,
//! Promtail/Alloy, Vector and journald. What an operator searches for carries a stable
//! `event` field ([`EVENTS`]) with the process's `pid`, `framework`, `model_name` and
//! container labels as fields — never a command line.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The `event` values the agent logs (README, "Logs", has a LogQL query for each).
pub const EVENTS: [&str; 7] = [
    "process_detected",
    "process_exited",
    "cuda_oom",
    "uprobe_attach_failed",
    "events_lost",
    "nvml_unavailable",
    "gpu_info_rejected",
];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: `2026-11-29T14:22:47.857Z  WARN CUDA out of memory pid=…`.
    #[default]
    Text,
    /// `ts=… level=warn msg="CUDA out of memory" event=cuda_oom pid=…`.
    Logfmt,
    /// `{"timestamp":"…","level":"WARN","message":"CUDA out of memory","event":"cuda_oom",…}`.
    Json,
}

/// Installs the log for the process. `filter` was validated (see `Config::validate`).
pub fn init(filter: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(format == LogFormat::Text && std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Logfmt => builder.event_format(Logfmt).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// The logfmt line: `ts`, `level`, `msg`, then the event's fields in their order.
struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        w.write_str("ts=")?;
        SystemTime.format_time(&mut w)?;
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        write!(w, " level={level} msg={}", quoted(&fields.message))?;
        for (key, value) in &fields.rest {
            write!(w, " {key}={}", quoted(value))?;
        }
        writeln!(w)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            name => self.rest.push((name, value)),
        }
    }
}

/// A logfmt value: bare when it can be, else in double quotes with `"`, `\` and control
/// characters escaped.
fn quoted(value: &str) -> String {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c > ' ' && c != '"' && c != '=' && c != '\\' && c != '\u{7f}');
    if bare {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_values() {
        assert_eq!(quoted("cuda_oom"), "cuda_oom");
        assert_eq!(quoted("Qwen/Qwen2.5-7B"), "Qwen/Qwen2.5-7B");
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("CUDA out of memory"), "\"CUDA out of memory\"");
        assert_eq!(quoted("a=b"), "\"a=b\"");
        assert_eq!(quoted("say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
        assert_eq!(quoted("\u{1b}[2m"), "\"\\u{001b}[2m\"");
    }

    #[test]
    fn a_logfmt_line() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(Logfmt)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(event = "cuda_oom", pid = 42u32, model_name = %"a b", "CUDA out of memory");
        });
        let line = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let (ts, rest) = line.split_once(' ').unwrap();
        assert!(ts.starts_with("ts=20") && ts.ends_with('Z'), "{line}");
        assert_eq!(
            rest,
            "level=warn msg=\"CUDA out of memory\" event=cuda_oom pid=42 model_name=\"a b\"\n"
        );
    }
}
