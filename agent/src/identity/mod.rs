//! Who a process is: framework, model, model family and role — from facts alone.
//!
//! `classify` is a pure function of [`ProcessFacts`] (no /proc, no clock), so every rule is
//! table-tested on real command lines (`tests.rs`). The agent (eBPF exec events and /proc
//! scans) and windows-fallback (polling) both feed it.

mod container;
#[cfg(target_os = "linux")]
pub mod docker;
mod entry;
mod model;
pub mod oci;
pub mod rules;
mod sanitize;
#[cfg(test)]
mod tests;

pub use container::{from_cgroup as container_from_cgroup, ContainerRef};
pub use entry::FRAMEWORK_LIBRARY_PREFIXES;
pub use model::model_family;
pub use rules::{Rules, RulesError, RulesFile, Verdict};
pub use sanitize::{looks_like_secret, sanitize_label, MAX_LABEL_LEN};

use serde::Serialize;

/// Environment variables that may name the model. Only these are ever read from a process's
/// environment; nothing else (tokens, keys) is kept.
pub const MODEL_ENV_VARS: &[&str] = &[
    "MODEL_NAME",
    "SERVED_MODEL_NAME",
    "HF_MODEL_ID",
    "MODEL_ID",
    "MODEL",
    "MODEL_PATH",
    "LLM_MODEL",
];

/// What the agent knows about a process when it classifies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: u32,
    pub ppid: u32,
    /// Kernel `comm` (at most 15 bytes).
    pub comm: String,
    /// Path of the executed file (execve's filename, or the target of /proc/<pid>/exe).
    pub exe: String,
    /// Arguments, lossily decoded; may be a bounded prefix of a huge command line.
    pub argv: Vec<String>,
    /// Only the variables named in [`MODEL_ENV_VARS`].
    pub env: Vec<(String, String)>,
    /// Paths of shared objects the process maps (empty when not read yet).
    pub libraries: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Framework {
    Vllm,
    Sglang,
    Tgi,
    LlamaCpp,
    Ollama,
    Transformers,
    TensorrtLlm,
    Triton,
    Onnxruntime,
    Pytorch,
    Tensorflow,
    Lmdeploy,
    MlcLlm,
    Exllamav2,
    Koboldcpp,
    Localai,
    /// A process seen using the GPU that no rule recognises (CUDA probes, NVML).
    Unknown,
    /// A name a user rule gives (`--classify.rules`): an in-house server.
    Custom(CustomName),
}

impl Framework {
    /// Every framework the built-in rules know.
    pub const BUILT_IN: [Framework; 17] = [
        Framework::Vllm,
        Framework::Sglang,
        Framework::Tgi,
        Framework::LlamaCpp,
        Framework::Ollama,
        Framework::Transformers,
        Framework::TensorrtLlm,
        Framework::Triton,
        Framework::Onnxruntime,
        Framework::Pytorch,
        Framework::Tensorflow,
        Framework::Lmdeploy,
        Framework::MlcLlm,
        Framework::Exllamav2,
        Framework::Koboldcpp,
        Framework::Localai,
        Framework::Unknown,
    ];

    /// The framework a label value names: a built-in one (which keeps what llmscope knows of
    /// it: its metrics path, its API) or a custom name. None: not a valid name.
    pub fn named(name: &str) -> Option<Framework> {
        Framework::BUILT_IN
            .into_iter()
            .find(|f| f.as_str() == name)
            .or_else(|| CustomName::new(name).map(Framework::Custom))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Framework::Vllm => "vllm",
            Framework::Sglang => "sglang",
            Framework::Tgi => "tgi",
            Framework::LlamaCpp => "llama.cpp",
            Framework::Ollama => "ollama",
            Framework::Transformers => "transformers",
            Framework::TensorrtLlm => "tensorrt-llm",
            Framework::Triton => "triton",
            Framework::Onnxruntime => "onnxruntime",
            Framework::Pytorch => "pytorch",
            Framework::Tensorflow => "tensorflow",
            Framework::Lmdeploy => "lmdeploy",
            Framework::MlcLlm => "mlc-llm",
            Framework::Exllamav2 => "exllamav2",
            Framework::Koboldcpp => "koboldcpp",
            Framework::Localai => "localai",
            Framework::Unknown => "unknown",
            Framework::Custom(name) => name.as_str(),
        }
    }
}

impl Serialize for Framework {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A custom framework name: 1 to [`CustomName::MAX_LEN`] bytes of `[a-z0-9._-]`, starting
/// with a letter or digit. Stored inline so that [`Framework`] stays `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomName {
    len: u8,
    bytes: [u8; CustomName::MAX_LEN],
}

impl CustomName {
    pub const MAX_LEN: usize = 31;

    pub fn new(name: &str) -> Option<CustomName> {
        let ok = (1..=Self::MAX_LEN).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if !ok {
            return None;
        }
        let mut bytes = [0; Self::MAX_LEN];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Some(CustomName {
            len: name.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `new`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves requests (vllm serve, llama-server, ollama serve, tritonserver, …).
    Server,
    /// A child doing a server's work (engine core, tensor-parallel worker, ollama runner, shard).
    Worker,
    /// A one-shot program or script (llama-cli, a Python script using transformers, torchrun).
    Script,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Worker => "worker",
            Role::Script => "script",
        }
    }
}

/// The classified identity of an LLM process. Every string is sanitised and length-bounded:
/// it is safe to put in a label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    pub framework: Framework,
    /// `org/name` for Hugging Face ids, a file or directory stem for local weights,
    /// `unknown` when nothing names it.
    pub model_name: String,
    /// Model family derived from the model name (`llama`, `qwen`, …) or `unknown`.
    pub llm_type: String,
    pub role: Role,
}

impl Identity {
    pub fn new(framework: Framework, role: Role, model_name: Option<String>) -> Self {
        let model_name = model_name.unwrap_or_else(|| UNKNOWN.to_owned());
        Identity {
            framework,
            llm_type: model_family(&model_name).to_owned(),
            model_name,
            role,
        }
    }
}

pub const UNKNOWN: &str = "unknown";

/// Classifies a process from its own facts. `None`: not an LLM / inference process, as far
/// as its command line, environment and mapped libraries tell.
pub fn classify(facts: &ProcessFacts) -> Option<Identity> {
    let entry = entry::Entry::parse(facts)?;
    let (framework, role) = entry
        .framework_and_role()
        .or_else(|| entry::from_libraries(&entry, &facts.libraries))?;
    let model = model::extract(framework, &entry, facts);
    Some(Identity::new(framework, role, model))
}

/// The identity of `child` given its parent's: a child inherits (as a worker) when it is the
/// same program re-executed (Python `multiprocessing` spawn, forked workers), or when its
/// parent is a server and the child is not a common utility (a shell, a compiler, nvidia-smi)
/// that servers run in passing. A child that classifies on its own keeps its own framework.
pub fn derive(
    child: &ProcessFacts,
    parent: Option<(&ProcessFacts, &Identity)>,
) -> Option<Identity> {
    let own = classify(child);
    let Some((parent_facts, parent_id)) = parent else {
        return own;
    };
    let inherits = !entry::is_utility(child)
        && (entry::is_same_program(child, parent_facts)
            || entry::is_multiprocessing_child(child)
            || parent_id.role != Role::Script);
    match own {
        Some(own) if own.framework != parent_id.framework || !inherits => Some(own),
        _ if inherits => Some(Identity {
            role: Role::Worker,
            ..parent_id.clone()
        }),
        own => own,
    }
}

/// True when a process is worth re-examining later: an interpreter running something no rule
/// recognised yet (its imports, visible as mapped libraries, may say more once loaded).
pub fn worth_rechecking(facts: &ProcessFacts) -> bool {
    entry::Entry::parse(facts)
        .is_some_and(|e| e.is_unresolved_interpreter() && e.framework_and_role().is_none())
}
