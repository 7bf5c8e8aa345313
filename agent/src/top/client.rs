//! Fetching one agent's `/api/v1/processes`: plain HTTP, or TLS with the CA the user names
//! (or the certificate of the agent's own `--web.config.file`), with basic authentication.
//! The agent's own bounded HTTP client reads the answer.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::api::Node;
use crate::http_client::{get, Conn, Limits, Request};

/// How long one fetch may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer read (a node of 8,192 processes is ~5 MiB of JSON).
const MAX_BYTES: usize = 16 << 20;

/// Where the agent is and how to talk to it.
pub struct Client {
    /// As the user gave it, for messages.
    pub url: String,
    host: String,
    port: u16,
    base: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    authorization: Option<String>,
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Conn for TlsStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.sock.set_timeouts(timeout)
    }
}

impl Client {
    /// `url`: `http://host:port` or `https://host:port` (a path after it is the agent's
    /// prefix). `ca`: the PEM certificates to trust for https. `credentials`: user, password.
    pub fn new(
        url: &str,
        ca: Option<&Path>,
        credentials: Option<(String, String)>,
    ) -> Result<Client, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("--url {url:?}: give http://HOST:PORT or https://HOST:PORT"))?;
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let https = match scheme {
            "http" => false,
            "https" => true,
            _ => return Err(format!("--url {url:?}: the scheme is http or https")),
        };
        let (host, port) = split_authority(authority, if https { 443 } else { 80 })
            .ok_or_else(|| format!("--url {url:?}: not HOST:PORT"))?;
        let tls = if https {
            Some(Arc::new(tls_config(ca)?))
        } else {
            if ca.is_some() {
                return Err(format!(
                    "--url {url:?}: a CA is given but the URL is not https"
                ));
            }
            None
        };
        let authorization = credentials.map(|(user, password)| {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        Ok(Client {
            url: url.to_owned(),
            host,
            port,
            base: base.to_owned(),
            tls,
            authorization,
        })
    }

    /// One snapshot of the node.
    pub fn fetch(&self) -> Result<Node, String> {
        let addr = self.resolve()?;
        let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{e}"))?;
        let path = format!("{}{}", self.base, crate::api::PATH);
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = Request {
            host: &host,
            path: &path,
            accept: "application/json",
            authorization: self.authorization.as_deref(),
        };
        let limits = Limits {
            timeout: TIMEOUT,
            max_bytes: MAX_BYTES,
        };
        let answer = match &self.tls {
            None => get(tcp, &request, limits, |_| false),
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{}: {e}", self.host))?;
                let session = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| format!("TLS: {e}"))?;
                get(TlsStream::new(session, tcp), &request, limits, |_| false)
            }
        }
        .map_err(|e| e.to_string())?;
        match answer.status {
            200 if answer.complete => serde_json::from_slice(&answer.body)
                .map_err(|e| format!("{path}: not the agent's API ({e})")),
            200 => Err(format!("{path}: the answer is larger than {MAX_BYTES} bytes")),
            401 => Err("401: the agent wants credentials (--user, and the password in LLMSCOPE_TOP_PASSWORD or --password-file)".to_owned()),
            404 => Err(format!("404 on {path}: the agent is older than this llmscope top")),
            code => Err(format!("{path}: HTTP {code}")),
        }
    }

    fn resolve(&self) -> Result<SocketAddr, String> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.host))
    }
}

/// `host:port`, `[v6]:port`, or a host alone (the default port).
fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority.to_owned(), default_port)),
        None => None,
    }
}

fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let ca = ca.ok_or(
        "an https URL needs the certificate to trust: --tls.ca-file, or --web.config.file \
         (the agent's, whose certificate is then trusted)",
    )?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(Iterator::collect)
        .map_err(|e| format!("{}: {e}", ca.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", ca.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certs.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("{}: {e}", ca.display()))?;
    let verifier = Arc::new(Pinned { certs, inner });
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        })
        .map_err(|e| format!("TLS: {e}"))
}

/// The usual verification (a chain to one of the given certificates, for the URL's host),
/// and one more way to pass: the server presents one of the given certificates itself. An
/// exporter's self-signed certificate is often made as a CA (`openssl req -x509` does),
/// which WebPKI refuses as a server's own; trusting that very certificate (pinning it; the
/// handshake still proves the server holds its key) is what `curl --cacert` allows too.
#[derive(Debug)]
struct Pinned {
    certs: Vec<CertificateDer<'static>>,
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.certs.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The certificate file of an agent's `--web.config.file` (the CA `top` trusts by default
/// with that flag), relative paths resolved against the file's directory.
pub fn web_config_certificate(file: &Path) -> Result<Option<std::path::PathBuf>, String> {
    #[derive(serde::Deserialize)]
    struct WebConfig {
        tls_server_config: Option<Tls>,
    }
    #[derive(serde::Deserialize)]
    struct Tls {
        cert_file: std::path::PathBuf,
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let config: WebConfig =
        serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(config
        .tls_server_config
        .map(|t| file.parent().unwrap_or(Path::new(".")).join(t.cert_file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_authority("127.0.0.1:9101", 80),
            Some(("127.0.0.1".into(), 9101))
        );
        assert_eq!(split_authority("node-3", 443), Some(("node-3".into(), 443)));
        assert_eq!(
            split_authority("[::1]:9101", 80),
            Some(("::1".into(), 9101))
        );
        assert_eq!(split_authority("[::1]", 80), Some(("::1".into(), 80)));
        assert_eq!(split_authority(":9101", 80), None);
        assert_eq!(split_authority("host:port", 80), None);
        let c = Client::new("http://127.0.0.1:9101/llmscope/", None, None).unwrap();
        assert_eq!((c.port, c.base.as_str()), (9101, "/llmscope"));
        assert!(Client::new("ftp://x", None, None)
            .err()
            .unwrap()
            .contains("http or https"));
        assert!(Client::new("https://x:1", None, None)
            .err()
            .unwrap()
            .contains("--tls.ca-file"));
        let c = Client::new("http://x:1", None, Some(("u".into(), "p".into()))).unwrap();
        assert_eq!(c.authorization.as_deref(), Some("Basic dTpw"));
    }
}
