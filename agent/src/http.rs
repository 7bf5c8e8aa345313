//! The HTTP surface, shared by the agent and windows-fallback: `/metrics` (Prometheus text or
//! OpenMetrics by content negotiation), `/healthz`, `/api/processes` (JSON) and a landing page.
//!
//! A client cannot stall it: headers must arrive within [`HEADER_READ_TIMEOUT`] (an idle
//! keep-alive connection is closed after it too), a request is answered within
//! [`REQUEST_TIMEOUT`], at most [`MAX_CONCURRENT_REQUESTS`] are served at once (the excess
//! gets 503 at once), headers are limited to [`MAX_HEADER_BYTES`], and at most
//! [`MAX_CONNECTIONS`] connections are open (more are closed as they are accepted).
//!
//! With `--web.config.file` ([`crate::web_config`]) it serves TLS and asks for basic
//! authentication; the TLS handshake must finish within [`HEADER_READ_TIMEOUT`] too.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::metrics::exposition::{render, Format};
use crate::metrics::{BuildInfo, Families, ProcessSample};
use crate::web_config::{BasicAuth, Loaded, WebConfig};

/// What the HTTP surface serves. `gather` runs the collectors (they read published views,
/// but a view may be large); it runs on a blocking thread, never on the async runtime.
pub trait MetricsSource: Send + Sync + 'static {
    fn gather(&self) -> Families;
    /// The processes `/api/processes` lists, as published: no collector runs.
    fn processes(&self) -> Vec<ProcessSample>;
    fn build_info(&self) -> BuildInfo;
    /// `Err(reason)` when the agent cannot do its job (e.g. its event reader stopped).
    fn health(&self) -> Result<(), String>;
    /// The node's snapshot for `/api/v1/processes` ([`crate::api`]): by default the processes
    /// alone; the agent adds its GPUs, CUDA and request totals.
    fn node(&self) -> crate::api::Node {
        crate::api::Node::new(crate::api::Parts {
            build: self.build_info(),
            samples: &self.processes(),
            nvml: None,
            cuda: &Default::default(),
            requests: &Default::default(),
        })
    }
    /// Inference servers' metrics endpoints, for Prometheus HTTP service discovery.
    fn service_discovery(&self) -> Vec<SdTarget> {
        Vec::new()
    }
}

/// One entry of Prometheus's `http_sd_configs` format.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SdTarget {
    pub targets: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

type Source = Arc<dyn MetricsSource>;

/// Time a client has to send a request's headers, and an idle keep-alive connection to send
/// its next request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a request may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once (more than Prometheus HA pairs and dashboards ever send); more get
/// 503 at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 256;
/// Connections open at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 1024;
/// Largest request head read (hyper's minimum buffer).
pub const MAX_HEADER_BYTES: usize = 8192;

pub fn router(source: Source, auth: Option<Arc<BasicAuth>>) -> Router {
    let requests = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));
    let mut protected = Router::new()
        .route("/", get(landing))
        .route("/metrics", get(metrics))
        .route("/api/processes", get(processes))
        .route(crate::api::PATH, get(node))
        .route("/api/sd", get(service_discovery));
    if let Some(auth) = auth {
        protected = protected.layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let auth = auth.clone();
                async move { authenticated(auth, req, next).await }
            },
        ));
    }
    protected
        .route("/healthz", get(healthz))
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let requests = requests.clone();
                async move { limited(requests, req, next).await }
            },
        ))
        .with_state(source)
}

/// At most MAX_CONCURRENT_REQUESTS at once, each within REQUEST_TIMEOUT.
async fn limited(requests: Arc<tokio::sync::Semaphore>, req: Request, next: Next) -> Response {
    let Ok(_permit) = requests.try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent requests\n",
        )
            .into_response();
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
    }
}

/// Only a request with a user's credentials passes; the others get 401 and a challenge.
async fn authenticated(auth: Arc<BasicAuth>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth.check(header).await {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"llmscope\"")],
        "unauthorized\n",
    )
        .into_response()
}

/// Serves until `shutdown` completes, then stops accepting and finishes in-flight requests
/// (the caller bounds how long it waits).
pub async fn serve(
    listener: TcpListener,
    source: Source,
    web: Option<Arc<WebConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The router of the configuration in use (its auth layer is part of it), rebuilt when
    // the configuration is reloaded.
    let mut cached: Option<(Option<Arc<Loaded>>, Router)> = None;
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut open = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: keep serving what is open.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let loaded = web.as_ref().map(|w| w.current());
        let in_use = |c: &Option<Arc<Loaded>>| match (c, &loaded) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let router = match &cached {
            Some((config, router)) if in_use(config) => router.clone(),
            _ => {
                let auth = loaded.as_ref().and_then(|l| l.auth.clone());
                let router = router(source.clone(), auth);
                cached = Some((loaded.clone(), router.clone()));
                router
            }
        };
        let tls = loaded.and_then(|l| l.tls.clone());
        let stopped = stopped.clone();
        open.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, router, stopped).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, router, stopped).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
        while open.try_join_next().is_some() {}
    }
    let _ = stop.send(true);
    while open.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection (plain or TLS) until it closes or the server stops.
async fn connection<I>(io: I, router: Router, mut stopped: tokio::sync::watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn gather(source: &Source) -> Result<Families, Response> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || source.gather())
        .await
        .map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("gathering failed: {e}\n"),
            )
                .into_response()
        })
}

async fn metrics(State(source): State<Source>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let families = match gather(&source).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let body = render(families, format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

async fn processes(State(source): State<Source>) -> Response {
    Json(source.processes()).into_response()
}

async fn node(State(source): State<Source>) -> Response {
    Json(source.node()).into_response()
}

async fn service_discovery(State(source): State<Source>) -> Response {
    Json(source.service_discovery()).into_response()
}

async fn healthz(State(source): State<Source>) -> Response {
    match source.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}\n"),
        )
            .into_response(),
    }
}

async fn landing(State(source): State<Source>) -> Html<String> {
    let build = source.build_info();
    Html(format!(
        "<!doctype html><html><head><title>llmscope</title></head><body>\
         <h1>llmscope {} ({})</h1><ul>\
         <li><a href=\"/metrics\">/metrics</a> — Prometheus metrics</li>\
         <li><a href=\"/api/processes\">/api/processes</a> — LLM processes (JSON)</li>\
         <li><a href=\"/api/v1/processes\">/api/v1/processes</a> — the node: GPUs, and processes with their GPU, CUDA and request totals (JSON, versioned)</li>\
         <li><a href=\"/healthz\">/healthz</a> — health</li>\
         </ul></body></html>",
        build.version, build.mode
    ))
}
