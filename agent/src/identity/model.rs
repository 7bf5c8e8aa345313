//! The model a process serves: from its flags, positional arguments, weight-file paths and
//! a few environment variables, normalised to a short, safe label value.

use super::entry::{basename, Entry};
use super::sanitize::{looks_like_secret, sanitize_label, without_url_secrets};
use super::{Framework, ProcessFacts, MODEL_ENV_VARS};

/// Flags that name the model, most specific first.
const MODEL_FLAGS: &[&str] = &[
    "--model",
    "--model-path",
    "--model_path",
    "--model-id",
    "--model_id",
    "--model_name_or_path",
    "--model-name",
    "--model_name",
    "--hf-repo",
    "-hf",
    "-hfr",
    "-m",
    "--model_base_path",
];

/// Flags that name the model only when nothing better does.
const FALLBACK_FLAGS: &[&str] = &["--served-model-name", "--tokenizer", "--tokenizer-name"];

/// File extensions of model weights and engines.
const WEIGHT_EXTENSIONS: &[&str] = &[
    ".gguf",
    ".safetensors",
    ".onnx",
    ".engine",
    ".plan",
    ".ggml",
];

pub(super) fn extract(framework: Framework, entry: &Entry, facts: &ProcessFacts) -> Option<String> {
    from_flags(MODEL_FLAGS, entry.args)
        .or_else(|| from_positional(framework, entry))
        .or_else(|| from_weight_paths(entry.args))
        .or_else(|| from_flags(FALLBACK_FLAGS, entry.args))
        .or_else(|| from_env(&facts.env))
        .and_then(|raw| normalise(&raw))
}

fn from_flags(flags: &[&str], args: &[String]) -> Option<String> {
    for flag in flags {
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if arg == *flag {
                if let Some(v) = it.next().filter(|v| !v.starts_with('-') || v.len() == 1) {
                    return Some(v.clone());
                }
            } else if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                return Some(v.to_owned());
            }
        }
    }
    None
}

/// `vllm serve <model>`, `lmdeploy serve api_server <model>`, `trtllm-serve <model>`, …
fn from_positional(framework: Framework, entry: &Entry) -> Option<String> {
    let positionals: Vec<&str> = positional_args(entry.args).collect();
    let index = match (framework, entry.name.as_str(), positionals.first().copied()) {
        (Framework::Vllm, _, Some("serve")) => 1,
        (Framework::Tgi, _, Some("serve")) => 1,
        (Framework::Lmdeploy, _, Some("serve")) => 2,
        (Framework::Lmdeploy, _, Some("chat")) => 1,
        (Framework::MlcLlm, _, Some("serve" | "chat" | "bench")) => 1,
        (Framework::Transformers, _, Some("serve" | "chat" | "run")) => 1,
        (Framework::TensorrtLlm, "trtllm-serve", Some("serve")) => 1,
        (Framework::TensorrtLlm, "trtllm-serve", Some(_)) => 0,
        (Framework::Koboldcpp, _, Some(_)) => 0,
        _ => return None,
    };
    positionals.get(index).map(|s| (*s).to_owned())
}

/// Arguments that are not options nor the value of an option (`--port 8000`).
fn positional_args(args: &[String]) -> impl Iterator<Item = &str> {
    let mut skip_next = false;
    args.iter().map(String::as_str).filter(move |a| {
        if skip_next {
            skip_next = false;
            return false;
        }
        if a.starts_with('-') {
            // `--flag value` consumes the next argument unless it is `--flag=value` or a
            // boolean switch followed by another option.
            skip_next = !a.contains('=');
            return false;
        }
        true
    })
}

fn from_weight_paths(args: &[String]) -> Option<String> {
    args.iter()
        .map(|a| a.split_once('=').map_or(a.as_str(), |(_, v)| v))
        .find(|a| {
            let lower = a.to_ascii_lowercase();
            WEIGHT_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
        })
        .map(str::to_owned)
}

fn from_env(env: &[(String, String)]) -> Option<String> {
    MODEL_ENV_VARS.iter().find_map(|name| {
        env.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    })
}

/// Turns a raw model argument into a label value:
/// - Hugging Face ids keep `org/name`;
/// - a Hugging Face cache path (`…/models--org--name/snapshots/<hash>`) becomes `org/name`;
/// - an Ollama blob (`…/blobs/sha256-<hex>`) becomes `sha256-<12 hex>`;
/// - other paths become the stem of the file or the directory name (a generic file name
///   such as `model.safetensors` is replaced by its directory's name);
/// - URLs lose their user-info, query string and fragment; anything that looks like a secret
///   is dropped.
pub fn normalise(raw: &str) -> Option<String> {
    // A signed URL's query string is a credential, not part of a model name: it goes first.
    let stripped = without_url_secrets(raw.trim().trim_matches(['"', '\'']));
    if stripped.is_empty() || looks_like_secret(&stripped) {
        return None;
    }
    let raw = std::borrow::Cow::Borrowed(strip_hf_scheme(&stripped));
    let value = if let Some(hf) = hf_cache_id(&raw) {
        hf
    } else if is_path(&raw) {
        stem_of_path(&raw)?
    } else {
        raw.into_owned()
    };
    let label = sanitize_label(&value);
    (!label.is_empty() && !looks_like_secret(&label)).then_some(label)
}

/// `HF://org/name` (MLC) is a Hugging Face id.
fn strip_hf_scheme(raw: &str) -> &str {
    match raw.get(..5) {
        Some(scheme) if scheme.eq_ignore_ascii_case("hf://") => &raw[5..],
        _ => raw,
    }
}

fn is_path(raw: &str) -> bool {
    raw.starts_with('/')
        || raw.starts_with("./")
        || raw.starts_with("../")
        || raw.starts_with('~')
        || raw.contains('\\')
        || raw.matches('/').count() > 1
        || WEIGHT_EXTENSIONS
            .iter()
            .any(|ext| raw.to_ascii_lowercase().ends_with(ext))
}

fn hf_cache_id(raw: &str) -> Option<String> {
    let component = raw.split(['/', '\\']).find(|c| c.starts_with("models--"))?;
    let mut parts = component.trim_start_matches("models--").splitn(2, "--");
    let org = parts.next().filter(|s| !s.is_empty())?;
    match parts.next() {
        Some(name) if !name.is_empty() => Some(format!("{org}/{name}")),
        _ => Some(org.to_owned()),
    }
}

fn stem_of_path(raw: &str) -> Option<String> {
    let normalised = raw.replace('\\', "/");
    let mut components = normalised
        .trim_end_matches('/')
        .rsplit('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..");
    let last = components.next()?;
    if let Some(hex) = last
        .strip_prefix("sha256-")
        .or_else(|| last.strip_prefix("sha256:"))
    {
        return Some(format!("sha256-{}", &hex[..hex.len().min(12)]));
    }
    let lower = last.to_ascii_lowercase();
    let stem = WEIGHT_EXTENSIONS
        .iter()
        .find(|ext| lower.ends_with(*ext))
        .map_or(last, |ext| &last[..last.len() - ext.len()]);
    let generic = matches!(
        stem.to_ascii_lowercase().as_str(),
        "model" | "pytorch_model" | "weights" | "rank0" | "consolidated" | "1" | "current"
    ) || stem.starts_with("model-000")
        // `rank0.engine`, `rank3_tp4.engine` (TensorRT-LLM), not `ranker-v3`.
        || stem
            .strip_prefix("rank")
            .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()));
    if generic {
        if let Some(dir) = components.next() {
            return Some(basename(dir).to_owned());
        }
    }
    Some(stem.to_owned())
}

/// Model family from a model name: `llama`, `qwen`, `mistral`, … or `unknown`.
pub fn model_family(model_name: &str) -> &'static str {
    const FAMILIES: &[(&str, &str)] = &[
        ("mixtral", "mistral"),
        ("mistral", "mistral"),
        ("ministral", "mistral"),
        ("codestral", "mistral"),
        ("qwen", "qwen"),
        ("qwq", "qwen"),
        ("llama", "llama"),
        ("vicuna", "llama"),
        ("gemma", "gemma"),
        ("deepseek", "deepseek"),
        ("phi-", "phi"),
        ("phi3", "phi"),
        ("phi4", "phi"),
        ("phi2", "phi"),
        ("gpt-oss", "gpt"),
        ("gpt2", "gpt"),
        ("gpt-j", "gpt"),
        ("gpt-neo", "gpt"),
        ("falcon", "falcon"),
        ("starcoder", "starcoder"),
        ("granite", "granite"),
        ("command-r", "command-r"),
        ("olmo", "olmo"),
        ("yi-", "yi"),
        ("glm", "glm"),
        ("internlm", "internlm"),
        ("baichuan", "baichuan"),
        ("bloom", "bloom"),
        ("opt-", "opt"),
        ("t5", "t5"),
        ("bert", "bert"),
        ("whisper", "whisper"),
        ("stable-diffusion", "diffusion"),
        ("sdxl", "diffusion"),
        ("flux", "diffusion"),
        ("bge-", "embedding"),
        ("e5-", "embedding"),
        ("minilm", "embedding"),
    ];
    let lower = model_name.to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or(&lower);
    FAMILIES
        .iter()
        .find(|(needle, _)| name.contains(needle))
        .map_or(super::UNKNOWN, |(_, family)| family)
}
