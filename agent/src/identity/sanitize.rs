//! Label values come from untrusted command lines: keep a safe alphabet, bound the length,
//! and never let something that looks like a credential through.

/// Longest label value the agent exports, in bytes.
pub const MAX_LABEL_LEN: usize = 128;

/// Drops a URL's query string and fragment (`?sig=…`, `#…`, signed download links) and its
/// user-info (`user:password@`): none of it names a model, all of it may be a credential.
/// Applied to every label value, URL or not: no model or program name contains `?` or `#`.
pub(super) fn without_url_secrets(raw: &str) -> std::borrow::Cow<'_, str> {
    let raw = &raw[..raw.find(['?', '#']).unwrap_or(raw.len())];
    if let Some((scheme, rest)) = raw.split_once("://") {
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{scheme}://{}", &rest[at + 1..]).into();
        }
    }
    raw.into()
}

/// Drops URL query strings, fragments and user-info, keeps `[A-Za-z0-9._:/@+=-]`, replaces
/// every other character with `_`, collapses runs of `_`, and cuts to [`MAX_LABEL_LEN`] bytes.
pub fn sanitize_label(raw: &str) -> String {
    let raw = without_url_secrets(raw);
    let mut out = String::with_capacity(raw.len().min(MAX_LABEL_LEN));
    for c in raw.chars() {
        if out.len() >= MAX_LABEL_LEN {
            break;
        }
        let c = if c.is_ascii_alphanumeric()
            || matches!(c, '.' | '_' | ':' | '/' | '@' | '+' | '=' | '-')
        {
            c
        } else {
            '_'
        };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    out.trim_matches('_').to_owned()
}

/// Credential shapes seen on command lines: OpenAI/Anthropic-style keys, Hugging Face,
/// GitHub, GitLab, Slack and AWS tokens, JWTs, bearer headers, and `key=value` pairs whose key
/// names a secret.
pub fn looks_like_secret(value: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "sk-",
        "sk_",
        "hf_",
        "ghp_",
        "gho_",
        "ghs_",
        "ghu_",
        "github_pat_",
        "glpat-",
        "xoxb-",
        "xoxp-",
        "AKIA",
        "ASIA",
        "eyJ",
        "Bearer ",
        "bearer ",
        "Basic ",
    ];
    const SECRET_WORDS: &[&str] = &[
        "token", "secret", "password", "passwd", "api_key", "apikey", "api-key",
    ];
    let v = value.trim();
    if PREFIXES.iter().any(|p| v.starts_with(p)) {
        return true;
    }
    let lower = v.to_ascii_lowercase();
    if let Some((key, _)) = lower.split_once('=') {
        if SECRET_WORDS.iter().any(|w| key.contains(w)) {
            return true;
        }
    }
    // A long run of token characters with no separator a model name would have.
    v.len() >= 32
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '+')
        && v.chars().any(|c| c.is_ascii_digit())
        && v.chars().any(|c| c.is_ascii_uppercase())
        && v.chars().any(|c| c.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_query_fragment_and_user_info() {
        for (raw, want) in [
            (
                "https://host/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf?sig=SECRET&se=2026",
                "https://host/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf",
            ),
            ("https://user:pa55@host/m.gguf#frag", "https://host/m.gguf"),
            ("s3://AKIAXXXX:secret@bucket/x/y", "s3://bucket/x/y"),
            ("x.gguf?X-Amz-Signature=abc", "x.gguf"),
            ("org/name", "org/name"),
            ("user@host:/models/x", "user@host:/models/x"),
        ] {
            assert_eq!(sanitize_label(raw), want, "{raw}");
        }
    }
}
