//! `--web.config.file`: TLS and basic authentication for the HTTP surface, in the format of
//! the Prometheus exporter-toolkit web configuration (what node_exporter reads):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/llmscope/tls.crt
//!   key_file: /etc/llmscope/tls.key
//!   # client_auth_type: RequireAndVerifyClientCert   (with client_ca_file)
//!   # min_version: TLS12 | TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! A key this reader does not implement (`cipher_suites`, `curve_preferences`,
//! `http_server_config`, ...) is refused at start-up rather than silently ignored. The files
//! are read again when one of them changes (checked once a second by a thread of its own,
//! never on the accept loop), so a rotated certificate is picked up without a restart; a
//! change that does not load keeps the last good configuration and is logged.
//!
//! `/healthz` needs no credentials (liveness probes), every other path does.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

/// One loaded configuration.
pub struct Loaded {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub auth: Option<Arc<BasicAuth>>,
}

/// The configuration file and what it names, re-read when any of them changes.
pub struct WebConfig {
    current: Arc<RwLock<Arc<Loaded>>>,
}

/// How often the files are checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

impl WebConfig {
    /// Loads the file; any problem is an error (the agent does not start half-secured).
    /// A thread then reloads it when a file changes, for as long as this lives.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let (loaded, versions) = load(path)?;
        let current = Arc::new(RwLock::new(Arc::new(loaded)));
        let watched = Arc::downgrade(&current);
        let path = path.to_owned();
        std::thread::Builder::new()
            .name("llmscope-webcfg".into())
            .spawn(move || reload_on_change(&path, versions, &watched))
            .map_err(|e| WebConfigError::Read(PathBuf::from("(reload thread)"), e))?;
        Ok(WebConfig { current })
    }

    /// The configuration to use for a new connection: a pointer copy, never a file read.
    pub fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Checks the files every [`RECHECK`] and swaps in what loads, until the configuration is
/// dropped. A change that does not load is logged and not retried until a file changes again.
fn reload_on_change(path: &Path, mut versions: Versions, current: &Weak<RwLock<Arc<Loaded>>>) {
    loop {
        std::thread::sleep(RECHECK);
        if current.strong_count() == 0 {
            return;
        }
        if versions
            .iter()
            .all(|(path, version)| file_version(path) == *version)
        {
            continue;
        }
        match load(path) {
            Ok((loaded, new_versions)) => {
                let Some(current) = current.upgrade() else {
                    return;
                };
                *current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
                versions = new_versions;
                tracing::info!(file = %path.display(), "web configuration reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "web configuration changed but does not load; keeping the last good one");
                for (p, version) in &mut versions {
                    *version = file_version(p);
                }
            }
        }
    }
}

fn file_version(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

type Versions = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn load(path: &Path) -> Result<(Loaded, Versions), WebConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| WebConfigError::Read(path.into(), e))?;
    let file = parse(&text, path)?;
    let invalid = |m: String| WebConfigError::Invalid(path.into(), m);
    // Relative paths are relative to the configuration file (as in exporter-toolkit).
    let base = path.parent().unwrap_or(Path::new("."));
    let mut versions = vec![(path.to_owned(), file_version(path))];
    let tls = match &file.tls_server_config {
        None => None,
        Some(t) => {
            let resolve = |p: &Path| base.join(p);
            let cert_file = resolve(&t.cert_file);
            let key_file = resolve(&t.key_file);
            let ca_file = t.client_ca_file.as_deref().map(resolve);
            for f in [Some(&cert_file), Some(&key_file), ca_file.as_ref()]
                .into_iter()
                .flatten()
            {
                versions.push((f.clone(), file_version(f)));
            }
            Some(tls_acceptor(t, &cert_file, &key_file, ca_file.as_deref()).map_err(invalid)?)
        }
    };
    let auth = if file.basic_auth_users.is_empty() {
        None
    } else {
        Some(Arc::new(BasicAuth::new(file.basic_auth_users)))
    };
    Ok((Loaded { tls, auth }, versions))
}

/// The file's text as a configuration, its users checked (names, hash formats); `path` only
/// names it in errors. No file is read here.
pub(crate) fn parse(text: &str, path: &Path) -> Result<File, WebConfigError> {
    let file: File = if text.trim().is_empty() {
        File::default()
    } else {
        serde_yaml_ng::from_str(text)
            .map_err(|e| WebConfigError::Parse(path.into(), e.to_string()))?
    };
    for (user, hash) in &file.basic_auth_users {
        if user.contains(':') || user.is_empty() {
            return Err(WebConfigError::Invalid(
                path.into(),
                format!("basic_auth_users: {user:?} is not a valid user name"),
            ));
        }
        // The format alone (a verify would cost a bcrypt round per user).
        hash.parse::<bcrypt::HashParts>().map_err(|e| {
            WebConfigError::Invalid(
                path.into(),
                format!("basic_auth_users: the hash of {user:?} is not a bcrypt hash: {e}"),
            )
        })?;
    }
    Ok(file)
}

/// The versions rustls implements, oldest first.
const TLS_VERSIONS: [(&str, &rustls::SupportedProtocolVersion); 2] = [
    ("TLS12", &rustls::version::TLS12),
    ("TLS13", &rustls::version::TLS13),
];

/// The index of a version in [`TLS_VERSIONS`].
fn tls_version(name: &str) -> Result<usize, String> {
    match TLS_VERSIONS.iter().position(|(n, _)| *n == name) {
        Some(i) => Ok(i),
        // rustls implements neither.
        None if name == "TLS10" || name == "TLS11" => {
            Err(format!("{name} is not supported (TLS12 and TLS13 are)"))
        }
        None => Err(format!("unknown TLS version {name:?} (TLS12 or TLS13)")),
    }
}

fn tls_acceptor(
    t: &TlsFile,
    cert_file: &Path,
    key_file: &Path,
    ca_file: Option<&Path>,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(Iterator::collect)
        .map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no certificate in it",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("key_file {}: {e}", key_file.display()))?;
    let min = tls_version(t.min_version.as_deref().unwrap_or("TLS12"))?;
    let max = tls_version(t.max_version.as_deref().unwrap_or("TLS13"))?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = TLS_VERSIONS
        .iter()
        .enumerate()
        .filter(|(i, _)| (min..=max).contains(i))
        .map(|(_, (_, v))| *v)
        .collect();
    if versions.is_empty() {
        return Err("min_version is above max_version".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let client_auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match (client_auth, ca_file) {
        ("NoClientCert", _) => builder.with_no_client_auth(),
        ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?
            {
                let cert = cert.map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if client_auth == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
        ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", None) => {
            return Err(format!("client_auth_type {client_auth} needs client_ca_file"))
        }
        (other, _) => {
            return Err(format!(
                "client_auth_type {other:?} is not supported (NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert)"
            ))
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file/key_file: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Users and their bcrypt hashes. A bcrypt check costs tens of milliseconds by design, so
/// credentials that passed are remembered (by a keyed hash, never in clear) and at most
/// [`MAX_CONCURRENT_CHECKS`] checks run at once.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    passed: Mutex<HashSet<u64>>,
    /// Checked for an unknown user, so that a wrong user name takes as long as a wrong
    /// password: the costliest user's own hash (no hash computed at load).
    dummy: String,
    hasher: std::collections::hash_map::RandomState,
    checks: tokio::sync::Semaphore,
}

/// bcrypt checks run at once; more wait (within the request timeout).
const MAX_CONCURRENT_CHECKS: usize = 2;
/// Credentials remembered as good.
const MAX_REMEMBERED: usize = 64;

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> BasicAuth {
        let dummy = users
            .values()
            .max_by_key(|h| h.parse::<bcrypt::HashParts>().map_or(0, |p| p.get_cost()))
            .cloned()
            .unwrap_or_default();
        BasicAuth {
            dummy,
            users,
            passed: Mutex::new(HashSet::new()),
            hasher: std::collections::hash_map::RandomState::new(),
            checks: tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS),
        }
    }

    /// Whether the `Authorization` header value names a user with the right password.
    pub async fn check(self: &Arc<Self>, authorization: Option<&str>) -> bool {
        use base64::Engine;
        let Some(encoded) = authorization.and_then(|v| v.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|s| s.split_once(':'))
            .map(|(u, p)| (u.to_owned(), p.to_owned()))
        else {
            return false;
        };
        let key = self.hasher.hash_one((&user, &password));
        if self
            .passed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&key)
        {
            return true;
        }
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let this = self.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let (hash, known) = match this.users.get(&user) {
                Some(h) => (h.as_str(), true),
                None => (this.dummy.as_str(), false),
            };
            bcrypt::verify(password, hash).unwrap_or(false) && known
        })
        .await
        .unwrap_or(false);
        if ok {
            let mut passed = self
                .passed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if passed.len() >= MAX_REMEMBERED {
                passed.clear();
            }
            passed.insert(key);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("llmscope-webcfg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn what_is_not_implemented_or_wrong_is_refused_at_load() {
        let d = dir("refused");
        for (yaml, says) in [
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n",
                "cipher_suites",
            ),
            (
                "http_server_config:\n  http2: false\n",
                "http_server_config",
            ),
            (
                "basic_auth_users:\n  alice: plaintext\n",
                "not a bcrypt hash",
            ),
            ("basic_auth_users: [", "web.yml"),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
                "missing.crt",
            ),
        ] {
            let p = write(&d, "web.yml", yaml);
            let err = WebConfig::load(&p).err().expect(yaml).to_string();
            assert!(err.contains(says), "{yaml}: {err}");
        }
        let p = write(&d, "web.yml", "");
        let loaded = WebConfig::load(&p).unwrap().current();
        assert!(loaded.tls.is_none() && loaded.auth.is_none());
    }

    /// Waits (bounded) until `f` holds of the current configuration.
    fn until(config: &WebConfig, f: impl Fn(&Loaded) -> bool) -> Arc<Loaded> {
        let deadline = Instant::now() + 10 * RECHECK;
        loop {
            let loaded = config.current();
            if f(&loaded) || Instant::now() > deadline {
                return loaded;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_change_keeps_the_last_good_one() {
        let d = dir("reload");
        let hash = bcrypt::hash("pw", 4).unwrap();
        let p = write(&d, "web.yml", "");
        let config = WebConfig::load(&p).unwrap();
        let first = config.current();
        assert!(first.auth.is_none());
        write(
            &d,
            "web.yml",
            &format!("basic_auth_users:\n  alice: '{hash}'\n"),
        );
        let second = until(&config, |l| l.auth.is_some());
        assert!(second.auth.is_some(), "reloaded");
        write(&d, "web.yml", "basic_auth_users: [");
        std::thread::sleep(3 * RECHECK);
        assert!(
            Arc::ptr_eq(&config.current(), &second),
            "a change that does not load keeps the last good configuration"
        );
    }

    /// A reload with many users at a real cost costs the accept loop nothing: `current()`
    /// never parses or hashes (it used to verify every hash and compute a dummy one, inline,
    /// on the connection that noticed the change: ~50 bcrypt rounds at cost 10 here).
    #[test]
    fn a_reload_with_fifty_bcrypt_users_never_blocks_a_connection() {
        let d = dir("fifty");
        let hash = bcrypt::hash("pw", 10).unwrap();
        let p = write(&d, "web.yml", "");
        let config = WebConfig::load(&p).unwrap();
        let users: String = (0..50).map(|i| format!("  user{i}: '{hash}'\n")).collect();
        write(&d, "web.yml", &format!("basic_auth_users:\n{users}"));
        let mut slowest = Duration::ZERO;
        let deadline = Instant::now() + 10 * RECHECK;
        let reloaded = loop {
            let asked = Instant::now();
            let loaded = config.current();
            slowest = slowest.max(asked.elapsed());
            if loaded.auth.is_some() || Instant::now() > deadline {
                break loaded;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(reloaded.auth.is_some(), "reloaded");
        eprintln!("slowest current() during the reload: {slowest:?}");
        assert!(
            slowest < Duration::from_millis(500),
            "a connection waited {slowest:?} for the reload"
        );
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_remembers_only_what_passed() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = Arc::new(BasicAuth::new([("alice".to_owned(), hash)].into()));
        let header = |creds: &str| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        };
        assert!(auth.check(Some(&header("alice:s3cret"))).await);
        assert!(
            auth.check(Some(&header("alice:s3cret"))).await,
            "remembered"
        );
        assert!(!auth.check(Some(&header("alice:wrong"))).await);
        assert!(!auth.check(Some(&header("bob:s3cret"))).await);
        assert!(!auth.check(Some("Basic !!!")).await);
        assert!(!auth.check(Some("Bearer x")).await);
        assert!(!auth.check(None).await);
        assert_eq!(auth.passed.lock().unwrap().len(), 1);
    }
}
