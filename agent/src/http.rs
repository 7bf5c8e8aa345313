//! The HTTP surface, shared by the agent and windows-fallback: `/metrics` (Prometheus text or
//! OpenMetrics by content negotiation), `/healthz`, `/api/processes` (JSON) and a landing page.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::metrics::exposition::{render, Format};
use crate::metrics::{BuildInfo, Snapshot};

/// What the HTTP surface serves. `gather` may block (it reads /proc or polls); it runs on a
/// blocking thread, never on the async runtime.
pub trait MetricsSource: Send + Sync + 'static {
    fn gather(&self) -> Snapshot;
    fn build_info(&self) -> BuildInfo;
    /// `Err(reason)` when the agent cannot do its job (e.g. its event reader stopped).
    fn health(&self) -> Result<(), String>;
}

type Source = Arc<dyn MetricsSource>;

pub fn router(source: Source) -> Router {
    Router::new()
        .route("/", get(landing))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/processes", get(processes))
        .with_state(source)
}

/// Serves until `shutdown` completes, then stops accepting and finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    source: Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(source))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn gather(source: &Source) -> Result<Snapshot, Response> {
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
    let snapshot = match gather(&source).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let body = render(snapshot, source.build_info(), format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

async fn processes(State(source): State<Source>) -> Response {
    match gather(&source).await {
        Ok(s) => Json(s.processes).into_response(),
        Err(r) => r,
    }
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
         <li><a href=\"/healthz\">/healthz</a> — health</li>\
         </ul></body></html>",
        build.version, build.mode
    ))
}
