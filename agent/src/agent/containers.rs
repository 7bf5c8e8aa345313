//! The container resolver thread: names the containers tracked processes run in. The table
//! knows a process's container id from its cgroup (read when the process is tracked); this
//! thread finds the names — off the scrape path, one lookup per container, with timeouts:
//! the Kubernetes pod, namespace and container name from the OCI bundle containerd's CRI
//! plugin or CRI-O wrote, else Docker's name for it (and the kubelet's labels, for
//! cri-dockerd) from Docker's API socket. The sampler labels processes from the cache; a runtime that is slow or
//! gone only leaves `container` (and `pod`, `namespace`) out, `container_id` stays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::health::Health;
use super::table::{Changed, Life};
use crate::identity::docker::Docker;
use crate::identity::oci::Bundles;
use crate::identity::{sanitize_label, ContainerRef};
use crate::metrics::{ContainerLabels, KindCount};

/// Lookups waiting at most; more are dropped and counted (retried on the next pass).
const QUEUE: usize = 256;
/// Containers remembered at most (those of tracked processes are kept; past this the cache
/// is cleared and refilled).
const MAX_CACHED: usize = 4096;
/// A failed lookup is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

enum Entry {
    Pending,
    Known(ContainerLabels),
    /// Not found, or the runtime failed: only the id is known, until `retry_at`.
    Unknown {
        retry_at: Instant,
    },
}

/// What the sampler and the tracking path see of the resolver.
pub struct Containers {
    cache: Mutex<HashMap<String, Entry>>,
    queue: Option<SyncSender<String>>,
    /// Lookups by result: ok, not_found, error, dropped.
    results: [AtomicU64; Lookup::ALL.len()],
}

agent_common::label_enum! {
    /// How a container name lookup ended (`kind` of `llmscope_container_lookups_total`).
    enum Lookup {
        Ok = "ok",
        NotFound = "not_found",
        Error = "error",
        /// The lookup queue was full.
        Dropped = "dropped",
    }
}

impl Containers {
    /// A resolver (`enabled`: some runtime can be asked; otherwise names are never looked
    /// up), and the receiving end its thread runs on.
    pub fn new(enabled: bool) -> (Containers, Option<Receiver<String>>) {
        let (queue, jobs) = if enabled {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        (
            Containers {
                cache: Mutex::new(HashMap::new()),
                queue,
                results: Default::default(),
            },
            jobs,
        )
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks for the container's name unless it is known, pending, or failed recently (the
    /// sampler asks again for every container in use once a second).
    pub fn request(&self, id: &str) {
        let Some(queue) = &self.queue else { return };
        let mut cache = self.cache();
        let due = match cache.get(id) {
            None => true,
            Some(Entry::Unknown { retry_at }) => Instant::now() >= *retry_at,
            Some(_) => false,
        };
        if !due {
            return;
        }
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        match queue.try_send(id.to_owned()) {
            Ok(()) => {
                cache.insert(id.to_owned(), Entry::Pending);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.results[Lookup::Dropped as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The labels of a process in `container`: the id always, the rest once known.
    pub fn labels(&self, container: &ContainerRef) -> ContainerLabels {
        let known = match self.cache().get(&container.id) {
            Some(Entry::Known(labels)) => Some(labels.clone()),
            _ => None,
        };
        let mut labels = known.unwrap_or_default();
        labels.container_id = container.short_id().to_owned();
        labels
    }

    /// Whether asking about `id` is over: its names are known, or the runtime said it does
    /// not know them or failed, or no runtime can be asked.
    pub fn settled(&self, id: &str) -> bool {
        self.queue.is_none()
            || matches!(
                self.cache().get(id),
                Some(Entry::Known(_) | Entry::Unknown { .. })
            )
    }

    /// Forgets the containers no tracked process runs in.
    pub fn retain(&self, in_use: &std::collections::HashSet<&str>) {
        self.cache().retain(|id, _| in_use.contains(id.as_str()));
    }

    pub fn results(&self) -> Vec<KindCount> {
        Lookup::ALL
            .iter()
            .zip(&self.results)
            .map(|(kind, n)| KindCount {
                kind: kind.as_str(),
                value: n.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Where names are looked for.
pub struct Sources {
    pub bundles: Bundles,
    pub docker_socket: Option<PathBuf>,
}

impl Sources {
    pub fn any(&self) -> bool {
        self.bundles.containerd.is_some()
            || self.bundles.crio.is_some()
            || self.docker_socket.is_some()
    }
}

/// Looks up the containers `jobs` names, records them in `containers`, and signals
/// `changed` (the sampler relabels).
pub(super) fn spawn(
    containers: Arc<Containers>,
    changed: Arc<Changed>,
    life: Arc<Life>,
    health: &Arc<Health>,
    jobs: Receiver<String>,
    sources: Sources,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // Beats between lookups; a lookup is bounded by its timeout.
    let heartbeat = health.register("containers", Some(LOOKUP_TIMEOUT * 10));
    std::thread::Builder::new()
        .name("llmscope-containers".into())
        .spawn(move || {
            let docker = sources
                .docker_socket
                .as_deref()
                .map(|s| Docker::new(s, LOOKUP_TIMEOUT));
            let mut warned = false;
            while !life.stopping() {
                heartbeat.beat();
                let id = match jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(id) => id,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                let from_bundle = sources.bundles.names(&id).map(|k| ContainerLabels {
                    container_id: String::new(),
                    container: sanitize_label(&k.container),
                    pod: sanitize_label(&k.pod),
                    namespace: sanitize_label(&k.namespace),
                });
                let asked = match (from_bundle, &docker) {
                    (Some(labels), _) => Ok(Some(labels)),
                    (None, Some(docker)) => docker.inspect(&id).map(|found| {
                        found.map(|c| {
                            let name = if c.kubernetes_container.is_empty() {
                                c.name
                            } else {
                                c.kubernetes_container
                            };
                            ContainerLabels {
                                container_id: String::new(),
                                container: sanitize_label(&name),
                                pod: sanitize_label(&c.pod),
                                namespace: sanitize_label(&c.namespace),
                            }
                        })
                    }),
                    (None, None) => Ok(None),
                };
                let (entry, result) = match asked {
                    Ok(Some(labels)) => (Entry::Known(labels), Lookup::Ok),
                    Ok(None) => (
                        Entry::Unknown {
                            retry_at: Instant::now() + RETRY_AFTER,
                        },
                        Lookup::NotFound,
                    ),
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "cannot ask Docker for container names; container_id stays, names are left out (retrying)");
                            warned = true;
                        }
                        (
                            Entry::Unknown {
                                retry_at: Instant::now() + RETRY_AFTER,
                            },
                            Lookup::Error,
                        )
                    }
                };
                containers.results[result as usize].fetch_add(1, Ordering::Relaxed);
                let mut cache = containers.cache();
                // Forgotten meanwhile (its processes are gone): nothing to record.
                if cache.contains_key(&id) {
                    cache.insert(id, entry);
                }
                drop(cache);
                changed.signal();
            }
        })
}
