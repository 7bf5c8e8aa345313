//! Kubernetes names from the OCI bundle the runtime wrote for a container: containerd's CRI
//! plugin and CRI-O copy the kubelet's pod name, namespace and container name into the
//! bundle's `config.json` annotations. Reading that file answers what the CRI would, with
//! no gRPC client and no socket: containerd keeps bundles in
//! `<state>/io.containerd.runtime.v2.task/<namespace>/<id>/config.json`, CRI-O in
//! `<storage>/overlay-containers/<id>/userdata/config.json`.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest config.json read (they are tens of KiB).
const MAX_CONFIG: u64 = 1024 * 1024;

/// What a bundle's annotations say, as raw values (sanitised by the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubernetesNames {
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

/// Where the runtimes keep bundles.
#[derive(Debug, Clone, Default)]
pub struct Bundles {
    /// containerd's state directory (`/run/containerd`).
    pub containerd: Option<PathBuf>,
    /// CRI-O's storage run directory (`/run/containers/storage`).
    pub crio: Option<PathBuf>,
}

impl Bundles {
    /// The Kubernetes names of container `id` (64 hex digits), if a runtime has its bundle
    /// and the bundle carries them.
    pub fn names(&self, id: &str) -> Option<KubernetesNames> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut candidates = Vec::new();
        if let Some(state) = &self.containerd {
            let tasks = state.join("io.containerd.runtime.v2.task");
            if let Ok(namespaces) = std::fs::read_dir(&tasks) {
                for ns in namespaces.flatten() {
                    candidates.push(ns.path().join(id).join("config.json"));
                }
            }
        }
        if let Some(storage) = &self.crio {
            candidates.push(
                storage
                    .join("overlay-containers")
                    .join(id)
                    .join("userdata/config.json"),
            );
        }
        candidates.iter().find_map(|p| read_names(p))
    }
}

fn read_names(path: &Path) -> Option<KubernetesNames> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = Vec::new();
    file.take(MAX_CONFIG).read_to_end(&mut text).ok()?;
    parse_annotations(&text)
}

/// containerd CRI: `io.kubernetes.cri.*`; CRI-O (and cri-dockerd's labels): `io.kubernetes.*`.
pub(crate) fn parse_annotations(config: &[u8]) -> Option<KubernetesNames> {
    let config: serde_json::Value = serde_json::from_slice(config).ok()?;
    let a = config.get("annotations")?;
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| a.get(*k)?.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let names = KubernetesNames {
        pod: get(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
        namespace: get(&[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ]),
        container: get(&[
            "io.kubernetes.cri.container-name",
            "io.kubernetes.container.name",
        ]),
    };
    (!names.pod.is_empty()).then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_of_both_runtimes() {
        let containerd = br#"{"ociVersion":"1.1.0","annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.container-name":"vllm","io.kubernetes.cri.sandbox-name":"qwen-7b-0","io.kubernetes.cri.sandbox-namespace":"inference"}}"#;
        let crio = br#"{"annotations":{"io.kubernetes.pod.name":"tgi-1","io.kubernetes.pod.namespace":"serving","io.kubernetes.container.name":"server"}}"#;
        assert_eq!(
            parse_annotations(containerd),
            Some(KubernetesNames {
                pod: "qwen-7b-0".into(),
                namespace: "inference".into(),
                container: "vllm".into(),
            })
        );
        assert_eq!(parse_annotations(crio).unwrap().pod, "tgi-1");
        // Not started by the kubelet, or not a bundle at all.
        assert_eq!(
            parse_annotations(br#"{"annotations":{"org.opencontainers.image.ref.name":"x"}}"#),
            None
        );
        assert_eq!(parse_annotations(br#"{"process":{}}"#), None);
        assert_eq!(parse_annotations(b"\xff not json"), None);
    }
}
