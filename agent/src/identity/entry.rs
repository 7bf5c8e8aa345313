//! The entry point of a process: which program, module or script it runs, and its arguments.
//! Rules match on this, never on a substring of the whole command line, so `grep llama log`,
//! `pip install vllm` and `vim model.gguf` are not LLM processes.

use super::{Framework, ProcessFacts, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A native program, or a console script run through its interpreter by a shebang.
    Program,
    /// `python -m <module>`.
    Module,
    /// `python path/to/script.py`.
    Script,
    /// An interpreter with nothing recognisable to run (`python -c …`, a REPL).
    Interpreter,
}

#[derive(Debug, Clone)]
pub(super) struct Entry<'a> {
    pub kind: Kind,
    /// Program basename without `.py`/`.exe`, module name, or script basename without `.py`.
    pub name: String,
    /// The script's full path (for `Kind::Script`), else empty.
    pub path: &'a str,
    /// Arguments after the entry.
    pub args: &'a [String],
    interpreter: bool,
}

impl<'a> Entry<'a> {
    pub fn parse(facts: &'a ProcessFacts) -> Option<Entry<'a>> {
        let argv0 = facts.argv.first().map(String::as_str).unwrap_or("");
        let program = if argv0.is_empty() {
            basename(&facts.exe)
        } else {
            basename(argv0)
        };
        let program = if program.is_empty() {
            facts.comm.as_str()
        } else {
            program
        };
        if program.is_empty() {
            return None;
        }
        let rest = facts.argv.get(1..).unwrap_or(&[]);
        if !is_python(program) && !is_python(basename(&facts.exe)) {
            return Some(Entry {
                kind: Kind::Program,
                name: strip_suffixes(program).to_owned(),
                path: "",
                args: rest,
                interpreter: false,
            });
        }
        Some(parse_python(rest))
    }

    fn arg(&self, i: usize) -> Option<&str> {
        self.args.get(i).map(String::as_str)
    }

    /// The framework and role named by the entry itself.
    pub fn framework_and_role(&self) -> Option<(Framework, Role)> {
        use Framework::*;
        use Role::*;
        let name = self.name.as_str();
        let sub = self.first_positional();
        if self.kind == Kind::Module {
            return module_rule(name, sub);
        }
        if self.kind == Kind::Script && self.path.contains("/exllamav2/") {
            return Some((Exllamav2, Script));
        }
        let found = match name {
            "vllm" => match sub? {
                "serve" => (Vllm, Server),
                "run-batch" => (Vllm, Script),
                "bench" if matches!(self.arg(1), Some("latency" | "throughput")) => (Vllm, Script),
                _ => return None,
            },
            "llama-server" => (LlamaCpp, Server),
            "llama-cli" | "llama-run" | "llama-simple" | "llama-bench" | "llama-embedding"
            | "llama-mtmd-cli" | "llama-perplexity" | "llama-batched" => (LlamaCpp, Script),
            "ollama" => match sub? {
                "serve" | "start" => (Ollama, Server),
                "runner" => (Ollama, Worker),
                _ => return None,
            },
            "ollama_llama_server" => (Ollama, Worker),
            "text-generation-launcher" => (Tgi, Server),
            "text-generation-router" => (Tgi, Worker),
            "text-generation-server" => match sub? {
                "serve" => (Tgi, Worker),
                _ => return None,
            },
            "trtllm-serve" => (TensorrtLlm, Server),
            "trtllm-build" | "trtllm-bench" | "trtllm-llmapi-launch" => (TensorrtLlm, Script),
            "tritonserver" => (Triton, Server),
            "triton_python_backend_stub" => (Triton, Worker),
            "tensorflow_model_server" => (Tensorflow, Server),
            "torchrun" => (Pytorch, Script),
            "torchserve" => (Pytorch, Server),
            "onnxruntime_perf_test" => (Onnxruntime, Script),
            "transformers" | "transformers-cli" => match sub? {
                "serve" => (Transformers, Server),
                "chat" | "run" => (Transformers, Script),
                _ => return None,
            },
            "lmdeploy" => lmdeploy_rule(sub?)?,
            "mlc_llm" => mlc_rule(sub?)?,
            "sglang" => match sub? {
                "serve" => (Sglang, Server),
                _ => return None,
            },
            "local-ai" | "localai" => match sub {
                None | Some("run") => (Localai, Server),
                _ => return None,
            },
            n if n.starts_with("koboldcpp") => (Koboldcpp, Server),
            _ => return None,
        };
        Some(found)
    }

    /// The first argument that is not an option (a subcommand, usually).
    pub fn first_positional(&self) -> Option<&str> {
        self.args
            .iter()
            .map(String::as_str)
            .find(|a| !a.starts_with('-'))
    }
}

fn module_rule(module: &str, sub: Option<&str>) -> Option<(Framework, Role)> {
    use Framework::*;
    use Role::*;
    let top = module.split('.').next().unwrap_or(module);
    Some(match top {
        "vllm" if module.starts_with("vllm.entrypoints.cli") => match sub? {
            "serve" => (Vllm, Server),
            "run-batch" => (Vllm, Script),
            _ => return None,
        },
        "vllm" if module.starts_with("vllm.entrypoints") => (Vllm, Server),
        "sglang" if module == "sglang.launch_server" => (Sglang, Server),
        "sglang"
            if module.starts_with("sglang.bench_one_batch")
                || module.starts_with("sglang.bench_offline") =>
        {
            (Sglang, Script)
        }
        "llama_cpp" if module.starts_with("llama_cpp.server") => (LlamaCpp, Server),
        "text_generation_server" => (Tgi, Worker),
        "tensorrt_llm" if module.contains("serve") => (TensorrtLlm, Server),
        "tensorrt_llm" => (TensorrtLlm, Script),
        "torch" if module == "torch.distributed.run" || module == "torch.distributed.launch" => {
            (Pytorch, Script)
        }
        "lmdeploy" => lmdeploy_rule(sub?)?,
        "mlc_llm" => mlc_rule(sub?)?,
        "exllamav2" => (Exllamav2, Script),
        "transformers" if module.contains("serve") => (Transformers, Server),
        "onnxruntime" if module.starts_with("onnxruntime.transformers") => (Onnxruntime, Script),
        _ => return None,
    })
}

fn lmdeploy_rule(sub: &str) -> Option<(Framework, Role)> {
    match sub {
        "serve" => Some((Framework::Lmdeploy, Role::Server)),
        "chat" | "lite" => Some((Framework::Lmdeploy, Role::Script)),
        _ => None,
    }
}

fn mlc_rule(sub: &str) -> Option<(Framework, Role)> {
    match sub {
        "serve" => Some((Framework::MlcLlm, Role::Server)),
        "chat" | "bench" => Some((Framework::MlcLlm, Role::Script)),
        _ => None,
    }
}

/// Shared objects whose presence in a Python process's maps says what it runs, most specific
/// first (a vLLM script maps torch and tokenizers too).
const LIBRARY_RULES: &[(&str, Framework)] = &[
    ("/vllm/", Framework::Vllm),
    ("/sglang/", Framework::Sglang),
    ("/sgl_kernel/", Framework::Sglang),
    ("libllama.so", Framework::LlamaCpp),
    ("/llama_cpp/", Framework::LlamaCpp),
    ("libtensorrt_llm", Framework::TensorrtLlm),
    ("/lmdeploy/", Framework::Lmdeploy),
    ("/mlc_llm/", Framework::MlcLlm),
    ("exllamav2_ext", Framework::Exllamav2),
    ("libonnxruntime", Framework::Onnxruntime),
    ("onnxruntime_pybind11_state", Framework::Onnxruntime),
    ("libtensorflow_framework", Framework::Tensorflow),
    ("_pywrap_tensorflow_internal", Framework::Tensorflow),
    ("/tokenizers/tokenizers.", Framework::Transformers),
    ("/safetensors/_safetensors_rust", Framework::Transformers),
    ("libtorch_cpu.so", Framework::Pytorch),
    ("libtorch_python.so", Framework::Pytorch),
];

/// How the file names of the libraries [`LIBRARY_RULES`] look for begin: the kernel reports an
/// executable mapping of a file named so by any process (agent-ebpf/src/library.rs), and an
/// interpreter no rule knows yet is classified the moment it maps one. Each prefix is at most
/// `agent_common::LIB_PREFIX_LEN - 1` bytes.
pub const FRAMEWORK_LIBRARY_PREFIXES: &[&str] = &[
    // vLLM's extensions (vllm/_C.abi3.so, _moe_C.abi3.so); torch's _C.cpython-*.so too.
    "_C.",
    "_moe_C",
    // sgl_kernel/common_ops.*.so
    "common_ops",
    "libllama",
    "libggml",
    "libtensorrt_llm",
    // lmdeploy/lib/_turbomind.*.so
    "_turbomind",
    "libmlc_llm",
    "exllamav2_ext",
    "libonnxruntime",
    "onnxruntime_pybind11_state",
    "libtensorflow_framework",
    "_pywrap_tensorflow_internal",
    "tokenizers.",
    "_safetensors_rust",
    "libtorch_cpu",
    "libtorch_python",
];

/// Python tools that are never a workload, whatever they import (pip imports torch's
/// metadata, pytest imports whatever it tests).
const NOT_WORKLOADS: &[&str] = &[
    "pip",
    "pip3",
    "pipx",
    "ensurepip",
    "venv",
    "virtualenv",
    "poetry",
    "pdm",
    "uv",
    "pytest",
    "py.test",
    "mypy",
    "black",
    "ruff",
    "flake8",
    "pylint",
    "isort",
    "pre-commit",
    "tox",
    "nox",
    "twine",
    "build",
    "setup",
    "http.server",
    "json.tool",
    "unattended-upgrade",
    "apt-listchanges",
    "networkd-dispatcher",
];

impl Entry<'_> {
    /// An interpreter running something no rule names yet, that is not a known tool.
    pub fn is_unresolved_interpreter(&self) -> bool {
        self.interpreter && !NOT_WORKLOADS.contains(&self.name.as_str())
    }
}

/// Classification of an interpreter from the libraries it has loaded.
pub(super) fn from_libraries(entry: &Entry, libraries: &[String]) -> Option<(Framework, Role)> {
    if !entry.is_unresolved_interpreter() {
        return None;
    }
    LIBRARY_RULES.iter().find_map(|(needle, framework)| {
        libraries
            .iter()
            .any(|lib| lib.contains(needle))
            .then_some((*framework, Role::Script))
    })
}

fn parse_python(rest: &[String]) -> Entry<'_> {
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].as_str();
        match a {
            "-m" => {
                return Entry {
                    kind: Kind::Module,
                    name: rest.get(i + 1).cloned().unwrap_or_default(),
                    path: "",
                    args: rest.get(i + 2..).unwrap_or(&[]),
                    interpreter: true,
                }
            }
            "-c" => break,
            "-W" | "-X" | "--check-hash-based-pycs" => i += 2,
            _ if a.starts_with("-m") && a.len() > 2 => {
                return Entry {
                    kind: Kind::Module,
                    name: a[2..].to_owned(),
                    path: "",
                    args: &rest[i + 1..],
                    interpreter: true,
                }
            }
            _ if a.starts_with("-c") => break,
            _ if a.starts_with('-') => i += 1,
            script => {
                let base = basename(script);
                // A console script (`/usr/local/bin/vllm serve …` run via its shebang) is the
                // program it names; a `.py` file is a script.
                let kind = if base.ends_with(".py") {
                    Kind::Script
                } else {
                    Kind::Program
                };
                return Entry {
                    kind,
                    name: strip_suffixes(base).to_owned(),
                    path: script,
                    args: &rest[i + 1..],
                    interpreter: true,
                };
            }
        }
    }
    Entry {
        kind: Kind::Interpreter,
        name: String::new(),
        path: "",
        args: &[],
        interpreter: true,
    }
}

/// The last component of a Unix or Windows path.
pub(super) fn basename(path: &str) -> &str {
    path.trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(path)
}

fn strip_suffixes(name: &str) -> &str {
    name.strip_suffix(".py")
        .or_else(|| name.strip_suffix(".exe"))
        .unwrap_or(name)
}

/// `python`, `python3`, `python3.11`, `python3.13t`, `pythonw`, `python3.11-dbg`.
fn is_python(name: &str) -> bool {
    let name = strip_suffixes(name);
    name.strip_prefix("python").is_some_and(|v| {
        v.chars().all(|c| {
            c.is_ascii_digit() || matches!(c, '.' | 't' | 'm' | 'w' | 'd' | '-' | 'b' | 'g')
        })
    })
}

pub(super) fn is_same_program(child: &ProcessFacts, parent: &ProcessFacts) -> bool {
    !child.exe.is_empty() && child.exe == parent.exe
}

/// Python `multiprocessing` spawn / forkserver children:
/// `python -c 'from multiprocessing.spawn import spawn_main; …' --multiprocessing-fork`.
pub(super) fn is_multiprocessing_child(child: &ProcessFacts) -> bool {
    child.argv.iter().any(|a| {
        a == "--multiprocessing-fork"
            || a.contains("spawn_main")
            || a.contains("multiprocessing.forkserver")
    })
}

/// Programs that servers run in passing, and Python's multiprocessing resource tracker:
/// never counted as one of their workers.
pub(super) fn is_utility(child: &ProcessFacts) -> bool {
    if child
        .argv
        .iter()
        .any(|a| a.contains("multiprocessing.resource_tracker"))
    {
        return true;
    }
    const UTILITIES: &[&str] = &[
        "sh",
        "bash",
        "dash",
        "zsh",
        "env",
        "cc",
        "gcc",
        "g++",
        "c++",
        "clang",
        "clang++",
        "ld",
        "ld.gold",
        "ld.lld",
        "as",
        "collect2",
        "cc1",
        "cc1plus",
        "ninja",
        "make",
        "cmake",
        "nvcc",
        "ptxas",
        "cicc",
        "fatbinary",
        "nvlink",
        "git",
        "nvidia-smi",
        "ldconfig",
        "ldconfig.real",
        "uname",
        "lsb_release",
        "cat",
        "ls",
        "grep",
        "sed",
        "awk",
        "ps",
        "which",
        "nproc",
        "lscpu",
        "sleep",
        "true",
        "false",
        "id",
        "hostname",
        "curl",
        "wget",
        "tar",
        "rm",
        "mkdir",
        "cp",
        "mv",
        "chmod",
        "df",
        "du",
        "free",
        "ip",
        "ss",
        "ping",
        "tail",
        "head",
        "sort",
    ];
    let name = basename(child.argv.first().map(String::as_str).unwrap_or(&child.exe));
    let exe = basename(&child.exe);
    UTILITIES.contains(&name) || UTILITIES.contains(&exe)
}
