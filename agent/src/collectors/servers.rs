//! Inference servers' own endpoints, as the discovery thread last found them
//! (`agent::servers`): `llm_server_metrics_endpoint`, the models Ollama servers have loaded,
//! the probe counts, and the targets of `GET /api/sd`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::http::SdTarget;
use crate::metrics::{CollectError, Collector, Snapshot};
use crate::servers::Answer;
use crate::state::{Endpoint, Published, ServersView};

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

    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let view = self.servers.get();
        snapshot.server_endpoints = view
            .endpoints
            .iter()
            .map(|e| (e.labels.clone(), e.target.clone(), e.answer.state()))
            .collect();
        // One series per (process, model), however many sockets answered for it.
        let mut seen = std::collections::HashSet::new();
        snapshot.ollama_models = view
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
                    (labels, m.clone())
                })
            })
            .filter(|(labels, _)| seen.insert((labels.pid.clone(), labels.model_name.clone())))
            .collect();
        snapshot.agent.server_probes = view.probes.clone();
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
