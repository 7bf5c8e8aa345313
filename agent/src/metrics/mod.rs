//! The metric model shared by every llmscope binary. Each collector declares the families
//! it fills ([`Family`], a `static` beside the code that counts) and adds their samples to the
//! scrape's [`Families`]; [`gather`] runs the collectors and adds the scrape's own families
//! (build info, each collector's success and duration); [`exposition`] encodes the result
//! with prometheus-client. No list of every family exists anywhere: adding a metric is one
//! `static` and one `add` in one collector file.

pub mod exposition;

use std::collections::HashMap;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use serde::Serialize;

use crate::identity::Identity;

/// The labels of every per-process series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ProcessLabels {
    pub pid: String,
    pub name: String,
    pub llm_type: String,
    pub model_name: String,
    pub framework: String,
    pub role: String,
    #[serde(flatten)]
    pub container: ContainerLabels,
}

/// Where a process runs (the cAdvisor / kube-state-metrics label names). Empty fields are
/// left out of the label set: a process in no container has none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ContainerLabels {
    /// The container's id, 12 hex digits (as `docker ps` shows it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// Its name: the Kubernetes container name, or the runtime's (Docker's) name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl ProcessLabels {
    pub fn new(pid: u32, name: &str, identity: &Identity) -> Self {
        ProcessLabels {
            pid: pid.to_string(),
            name: name.to_owned(),
            llm_type: identity.llm_type.clone(),
            model_name: identity.model_name.clone(),
            framework: identity.framework.as_str().to_owned(),
            role: identity.role.as_str().to_owned(),
            container: ContainerLabels::default(),
        }
    }

    pub fn in_container(mut self, container: ContainerLabels) -> Self {
        self.container = container;
        self
    }
}

impl EncodeLabelSet for ProcessLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        let c = &self.container;
        let always = [
            ("pid", &self.pid),
            ("name", &self.name),
            ("llm_type", &self.llm_type),
            ("model_name", &self.model_name),
            ("framework", &self.framework),
            ("role", &self.role),
        ];
        let where_ = [
            ("container_id", &c.container_id),
            ("container", &c.container),
            ("pod", &c.pod),
            ("namespace", &c.namespace),
        ];
        for (key, value) in always
            .into_iter()
            .chain(where_.into_iter().filter(|(_, v)| !v.is_empty()))
        {
            (key, value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// One process's resource use at the last reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessSample {
    #[serde(flatten)]
    pub labels: ProcessLabels,
    /// The parent's pid (0 when not known).
    pub ppid: u32,
    /// False during the grace period after exit (values are the last reading).
    pub alive: bool,
    pub cpu_seconds: f64,
    /// CPU use over the last window of at least a second, in percent of one core; None
    /// until the first window closes.
    pub cpu_percent: Option<f64>,
    pub memory_bytes: u64,
    /// None where the platform does not say (Windows): the series is left out, not 0.
    pub threads: Option<u64>,
    pub start_time_seconds: f64,
}

/// A count with one label value (a kind, a reason, a result), as producers publish them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindCount {
    pub kind: &'static str,
    pub value: u64,
}

impl KindCount {
    pub fn list(counts: &[(&'static str, u64)]) -> Vec<KindCount> {
        counts
            .iter()
            .map(|&(kind, value)| KindCount { kind, value })
            .collect()
    }
}

/// A metric family's descriptor: declared once, as a `static` beside the collector that
/// fills it. Counters are named without `_total` (the encoder adds it).
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricType,
    pub unit: Option<Unit>,
}

impl Family {
    pub const fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: MetricType::Gauge,
            unit: None,
        }
    }

    pub const fn counter(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: MetricType::Counter,
            unit: None,
        }
    }

    /// A histogram of seconds (named without the suffix, which the encoder adds).
    pub const fn histogram_seconds(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: MetricType::Histogram,
            unit: Some(Unit::Seconds),
        }
    }

    /// A gauge with the unit `seconds` (named without the suffix, which the encoder adds).
    pub const fn seconds(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: MetricType::Gauge,
            unit: Some(Unit::Seconds),
        }
    }
}

/// The label set of one sample, whatever its type.
pub(crate) type Labels = Box<dyn EncodeLabelSet + Send + Sync>;

/// One sample: its labels (none in an unlabelled family's one sample) and value.
pub(crate) type Sample = (Option<Labels>, Value);

/// A sample's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Number(f64),
    Histogram(Histogram),
}

/// Observations counted into fixed buckets (upper bounds, ascending; +Inf is implied).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another histogram's observations (of the same buckets) to this one's.
    pub fn merge(&mut self, other: &Histogram) {
        debug_assert_eq!(self.bounds, other.bounds);
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum += other.sum;
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// (upper bound, count in that bucket alone), +Inf last, as the encoder takes them.
    pub(crate) fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// The samples of one scrape, by family, in the order families were first added. A family
/// no collector added a sample to is left out of the exposition.
#[derive(Default)]
pub struct Families {
    list: Vec<(&'static Family, Vec<Sample>)>,
    index: HashMap<&'static str, usize>,
}

impl Families {
    fn samples(&mut self, family: &'static Family) -> &mut Vec<Sample> {
        let i = *self.index.entry(family.name).or_insert_with(|| {
            self.list.push((family, Vec::new()));
            self.list.len() - 1
        });
        debug_assert!(
            std::ptr::eq(self.list[i].0, family) || self.list[i].0.help == family.help,
            "{} declared twice with different help",
            family.name
        );
        &mut self.list[i].1
    }

    /// One labelled sample.
    pub fn add<L>(&mut self, family: &'static Family, labels: L, value: f64)
    where
        L: EncodeLabelSet + Send + Sync + 'static,
    {
        self.samples(family)
            .push((Some(Box::new(labels)), Value::Number(value)));
    }

    /// One labelled histogram.
    pub fn add_histogram<L>(&mut self, family: &'static Family, labels: L, histogram: Histogram)
    where
        L: EncodeLabelSet + Send + Sync + 'static,
    {
        self.samples(family)
            .push((Some(Box::new(labels)), Value::Histogram(histogram)));
    }

    /// Labelled samples; nothing (and no family) when there are none.
    pub fn extend<L>(
        &mut self,
        family: &'static Family,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) where
        L: EncodeLabelSet + Send + Sync + 'static,
    {
        for (labels, value) in samples {
            self.add(family, labels, value);
        }
    }

    /// The one sample of an unlabelled family.
    pub fn set(&mut self, family: &'static Family, value: f64) {
        self.samples(family).push((None, Value::Number(value)));
    }

    /// Counts by one label (`kind`, `reason`, …): every count, 0 included.
    pub fn counts(&mut self, family: &'static Family, label: &'static str, counts: &[KindCount]) {
        self.extend(
            family,
            counts.iter().map(|c| ([(label, c.kind)], c.value as f64)),
        );
    }

    fn append(&mut self, other: Families) {
        for (family, samples) in other.list {
            self.samples(family).extend(samples);
        }
    }

    /// The family names, in order (for tests and debugging).
    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|(f, _)| f.name).collect()
    }
}

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CollectError(pub String);

/// A source of metrics. A collector that fails never fails the scrape: it shows up as
/// `llmscope_collector_success{collector="…"} 0`, and whatever it did add stays.
/// Collectors only read what producers published (`&self`): any number of scrapes may run
/// at once and see the same values.
pub trait Collector: Send + Sync {
    fn name(&self) -> &'static str;
    fn collect(&self, out: &mut Families) -> Result<(), CollectError>;
}

static BUILD_INFO: Family = Family::gauge(
    "llmscope_build_info",
    "llmscope version and mode; always 1.",
);
static COLLECTOR_SUCCESS: Family = Family::gauge(
    "llmscope_collector_success",
    "Whether the collector worked on this scrape (1) or failed (0).",
);
static COLLECTOR_DURATION: Family = Family::seconds(
    "llmscope_collector_duration",
    "How long the collector took on this scrape.",
);

/// Runs every collector, each into its own families (merged after it returns), and adds the
/// scrape's own: build info, and each collector's success and duration. A collector that
/// fails or panics shows as `llmscope_collector_success{collector} 0`.
pub fn gather(collectors: &[Box<dyn Collector>], build: &BuildInfo) -> Families {
    let mut out = Families::default();
    let mut status = Vec::with_capacity(collectors.len());
    for c in collectors {
        let started = Instant::now();
        let mut own = Families::default();
        // A collector that panics fails alone: what it added stays, the scrape goes on.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.collect(&mut own)))
            .unwrap_or_else(|_| Err(CollectError("the collector panicked".into())));
        if let Err(e) = &result {
            tracing::debug!(collector = c.name(), error = %e, "collector failed");
        }
        out.append(own);
        status.push((c.name(), result.is_ok(), started.elapsed().as_secs_f64()));
    }
    out.add(&BUILD_INFO, build.clone(), 1.0);
    for &(name, ok, _) in &status {
        out.add(
            &COLLECTOR_SUCCESS,
            [("collector", name)],
            if ok { 1.0 } else { 0.0 },
        );
    }
    for (name, _, seconds) in status {
        out.add(&COLLECTOR_DURATION, [("collector", name)], seconds);
    }
    out
}

/// Static facts about this build, exported as `llmscope_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct BuildInfo {
    pub version: String,
    /// `ebpf` for the Linux agent, `polling` for windows-fallback.
    pub mode: String,
}

impl BuildInfo {
    pub fn new(mode: &str) -> Self {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: mode.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TRACKED: Family = Family::gauge("tracked", "A test family.");

    struct Panics;
    impl Collector for Panics {
        fn name(&self) -> &'static str {
            "panics"
        }
        fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
            out.add(&TRACKED, [("by", "panics")], 1.0);
            panic!("a bug in a collector")
        }
    }

    struct Counts;
    impl Collector for Counts {
        fn name(&self) -> &'static str {
            "counts"
        }
        fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
            out.add(&TRACKED, [("by", "counts")], 3.0);
            Ok(())
        }
    }

    #[test]
    fn a_panicking_collector_fails_alone_and_keeps_what_it_added() {
        let collectors: Vec<Box<dyn Collector>> = vec![Box::new(Panics), Box::new(Counts)];
        let text = exposition::render(
            gather(&collectors, &BuildInfo::new("ebpf")),
            exposition::Format::Text,
        );
        for line in [
            r#"llmscope_collector_success{collector="panics"} 0.0"#,
            r#"llmscope_collector_success{collector="counts"} 1.0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let tracked: Vec<&str> = text.lines().filter(|l| l.starts_with("tracked{")).collect();
        assert_eq!(
            tracked,
            [r#"tracked{by="panics"} 1.0"#, r#"tracked{by="counts"} 3.0"#],
            "one family, both samples"
        );
        assert_eq!(text.matches("# TYPE tracked ").count(), 1);
    }
}
