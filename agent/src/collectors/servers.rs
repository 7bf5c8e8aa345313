//! Inference servers' own endpoints, as the discovery thread last found them
//! (`agent::servers`): `llm_server_metrics_endpoint`, the models Ollama servers have loaded,
//! the probe counts, and the targets of `GET /api/sd`.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

use crate::http::SdTarget;
use crate::metrics::{CollectError, Collector, Families, Family};
use crate::servers::{Answer, LoadedModel};
use crate::state::{Endpoint, Published, ServersView};

static ENDPOINT: Family = Family::gauge("llm_server_metrics_endpoint", "An inference server's own endpoint (1), by address; state=\"metrics\": published for Prometheus at /api/sd; \"disabled\": the server answers there without metrics (llama.cpp without --metrics); \"ollama_api\": Ollama's /api/ps (no Prometheus metrics; see llm_ollama_*).");
static PROBES: Family = Family::counter("llmscope_server_probes", "Probes of inference servers' API paths, by outcome (metrics, disabled, ollama; refused, timeout, too_large, wrong_content_type, other: not a target).");
static OLLAMA_SIZE: Family = Family::gauge("llm_ollama_model_size_bytes", "Size of a model an Ollama server has loaded (GET /api/ps), bytes; model_name is the loaded model.");
static OLLAMA_VRAM: Family = Family::gauge(
    "llm_ollama_model_vram_bytes",
    "Part of a loaded Ollama model held in GPU memory (GET /api/ps), bytes.",
);
static OLLAMA_EXPIRY: Family = Family::gauge(
    "llm_ollama_model_expiry_timestamp_seconds",
    "When Ollama unloads a model unless it is used again (GET /api/ps), Unix seconds.",
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
    state: &'static str,
}

pub struct ServersCollector {
    servers: Arc<Published<ServersView>>,
}

impl ServersCollector {
    pub fn new(servers: Arc<Published<ServersView>>) -> Self {
        ServersCollector { servers }
    }
}

impl Collector for ServersCollector {
    fn name(&self) -> &'static str {
        "servers"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let view = self.servers.get();
        out.counts(&PROBES, "kind", &view.probes);
        out.extend(
            &ENDPOINT,
            view.endpoints.iter().map(|e| {
                let extra = EndpointLabels {
                    endpoint: e.target.clone(),
                    state: e.answer.state(),
                };
                ((e.labels.clone(), extra), 1.0)
            }),
        );
        // One series per (process, model), however many sockets answered for it.
        let mut seen = std::collections::HashSet::new();
        let models: Vec<_> = view
            .endpoints
            .iter()
            .flat_map(|e| {
                match &e.answer {
                    Answer::Ollama(models) => models.as_slice(),
                    _ => &[],
                }
                .iter()
                .map(|m| {
                    // The loaded model is the model: `ollama serve` names none itself.
                    let mut labels = e.labels.clone();
                    labels.model_name = m.name.clone();
                    (labels, m)
                })
            })
            .filter(|(labels, _)| seen.insert((labels.pid.clone(), labels.model_name.clone())))
            .collect();
        let mut each = |family: &'static Family, value: fn(&LoadedModel) -> Option<f64>| {
            out.extend(
                family,
                models
                    .iter()
                    .filter_map(|(labels, m)| Some((labels.clone(), value(m)?))),
            );
        };
        each(&OLLAMA_SIZE, |m| Some(m.size_bytes as f64));
        each(&OLLAMA_VRAM, |m| Some(m.vram_bytes as f64));
        each(&OLLAMA_EXPIRY, |m| m.expires_at);
        Ok(())
    }
}

/// Prometheus HTTP service discovery: one target per endpoint with metrics, labelled with
/// its process's labels (container ones included) and `__metrics_path__`.
pub fn sd_targets(endpoints: &[Endpoint]) -> Vec<SdTarget> {
    endpoints
        .iter()
        .filter(|e| e.answer == Answer::Metrics)
        .map(|e| {
            let l = &e.labels;
            let labels: BTreeMap<String, String> = [
                ("__metrics_path__", e.path),
                ("pid", l.pid.as_str()),
                ("framework", l.framework.as_str()),
                ("model_name", l.model_name.as_str()),
                ("container_id", l.container.container_id.as_str()),
                ("container", l.container.container.as_str()),
                ("pod", l.container.pod.as_str()),
                ("namespace", l.container.namespace.as_str()),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            SdTarget {
                targets: vec![e.target.clone()],
                labels,
            }
        })
        .collect()
}
