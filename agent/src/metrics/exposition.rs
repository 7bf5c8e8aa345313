//! Rendering one scrape's families as OpenMetrics or as the Prometheus text format (0.0.4),
//! chosen by the scraper's `Accept` header.
//!
//! prometheus-client writes OpenMetrics only. The classic text format differs in three ways
//! that matter here: a counter's HELP/TYPE lines name the sample (`x_total`), there are no
//! `# UNIT` lines, and there is no `# EOF`. [`openmetrics_to_text`] does that translation.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{Families, Labels, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text,
}

impl Format {
    /// OpenMetrics when the scraper accepts it (Prometheus asks for it first), else text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

pub fn render(families: Families, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(families));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    match format {
        Format::OpenMetrics => out,
        Format::Text => openmetrics_to_text(&out),
    }
}

/// A boxed label set, as prometheus-client's encoder takes it.
struct Dyn<'a>(&'a Labels);

impl EncodeLabelSet for Dyn<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// The families of one scrape, written with const metrics (the values were read by the
/// collectors, not kept in live metric objects).
impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (family, samples) in &self.list {
            let mut metric = encoder.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                family.kind,
            )?;
            if let [(None, value)] = samples.as_slice() {
                write(family.kind, value, metric)?;
                continue;
            }
            for (labels, value) in samples {
                debug_assert!(
                    labels.is_some(),
                    "{}: unlabelled among labelled",
                    family.name
                );
                if let Some(labels) = labels {
                    write(family.kind, value, metric.encode_family(&Dyn(labels))?)?;
                }
            }
        }
        Ok(())
    }
}

fn write(
    kind: MetricType,
    value: &Value,
    mut sample: MetricEncoder,
) -> Result<(), std::fmt::Error> {
    match (kind, value) {
        (_, Value::Histogram(h)) => sample
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum(),
                h.count(),
                &h.buckets(),
                None,
            ),
        (MetricType::Counter, Value::Number(v)) => ConstCounter::new(*v).encode(sample),
        (_, Value::Number(v)) => ConstGauge::new(*v).encode(sample),
    }
}

pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            pending_help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(help) = pending_help.take() {
                let text = help.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Family;

    static COUNTED: Family = Family::counter("llmscope_counted", "A counter.");
    static LEVEL: Family = Family::gauge("llmscope_level", "A gauge.");
    static TOOK: Family = Family::seconds("llmscope_took", "A duration.");

    fn families() -> Families {
        let mut f = Families::default();
        f.add(&COUNTED, [("kind", "exec")], 7.0);
        f.set(&LEVEL, 3.0);
        f.add(&TOOK, [("collector", "process")], 0.001);
        f
    }

    #[test]
    fn text_names_counters_with_total_and_has_no_units_or_eof() {
        let text = render(families(), Format::Text);
        for expected in [
            "# HELP llmscope_counted_total A counter.",
            "# TYPE llmscope_counted_total counter",
            r#"llmscope_counted_total{kind="exec"} 7.0"#,
            "# TYPE llmscope_level gauge",
            "llmscope_level 3.0",
            r#"llmscope_took_seconds{collector="process"} 0.001"#,
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "missing {expected:?} in\n{text}"
            );
        }
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn openmetrics_keeps_eof_and_units() {
        let om = render(families(), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# UNIT llmscope_took_seconds seconds"));
        assert!(om.contains("# TYPE llmscope_counted counter"));
    }

    static WAITED: Family = Family::histogram_seconds("llmscope_waited", "A histogram.");

    #[test]
    fn histograms_in_both_formats() {
        let mut f = Families::default();
        let mut h = crate::metrics::Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 7.0] {
            h.observe(v);
        }
        f.add_histogram(&WAITED, [("route", "/v1/completions")], h);
        let text = render(f, Format::Text);
        for expected in [
            "# TYPE llmscope_waited_seconds histogram",
            r#"llmscope_waited_seconds_bucket{le="0.1",route="/v1/completions"} 2"#,
            r#"llmscope_waited_seconds_bucket{le="1.0",route="/v1/completions"} 3"#,
            r#"llmscope_waited_seconds_bucket{le="+Inf",route="/v1/completions"} 4"#,
            r#"llmscope_waited_seconds_count{route="/v1/completions"} 4"#,
            r#"llmscope_waited_seconds_sum{route="/v1/completions"} 7.65"#,
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "missing {expected:?} in\n{text}"
            );
        }
    }

    #[test]
    fn an_empty_scrape_is_valid() {
        assert_eq!(render(Families::default(), Format::OpenMetrics), "# EOF\n");
        assert_eq!(render(Families::default(), Format::Text), "");
    }

    #[test]
    fn negotiation() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
    }
}
