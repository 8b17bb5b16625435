//! `/healthz`, `/readyz`, `/metrics` and `/status` on a loopback socket. Ready means: the store
//! writes, NATS is connected, and every MQTT listener is bound. `/status` is the typed
//! [`StatusReport`] as JSON, for the `status` command. `POST /dead-letters/replay` runs
//! `dead-letters replay` for the CLI (`crate::replay`), for loopback peers only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::common::metrics::Metrics;
use crate::common::status::{self, StatusReport};
use crate::replay;
use crate::store::ReplayFilter;

/// Largest replay request body: a filter is a few fields.
const REPLAY_BODY_MAX: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for HTTP on {addr}: {source} (set [http] listen to a free loopback port)")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `[http] listen`. The binary binds before [`crate::app::run`], which takes the listener,
/// so that a test can hand it one on port 0.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "HTTP metrics listen on a non-loopback address; anyone on that network can read them");
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves until `shutdown` turns true. `store_path` is the buffer file `/status` reads the
/// dead-letters from.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    replay: replay::Service,
    store_path: Arc<Path>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let metrics = metrics.clone();
                let replay = replay.clone();
                let store_path = store_path.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let metrics = metrics.clone();
                        let replay = replay.clone();
                        let store_path = store_path.clone();
                        async move {
                            match req.uri().path() {
                                replay::PATH => {
                                    return Ok::<_, Infallible>(
                                        replay_route(req, peer, &replay).await,
                                    )
                                }
                                status::PATH => return Ok(status_route(&metrics, store_path).await),
                                _ => {}
                            }
                            Ok(route(&req, &metrics))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let report = StatusReport::from_metrics(metrics);
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = report.readiness_lines().join("\n");
            body.push('\n');
            text(status, body)
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.encode());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    }
}

/// `POST /dead-letters/replay`: a [`ReplayFilter`] as JSON in, a `ReplayReport` as JSON out.
/// It changes the buffer, so only loopback peers may ask, whatever `[http] listen` is.
async fn replay_route(
    req: Request<Incoming>,
    peer: SocketAddr,
    service: &replay::Service,
) -> Response<Full<Bytes>> {
    use http_body_util::{BodyExt, Limited};
    if !peer.ip().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "dead-letters replay is served to loopback clients only\n".into(),
        );
    }
    if req.method() != hyper::Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST a JSON filter (`sahool-gateway dead-letters replay` does)\n".into(),
        );
    }
    // A web page can make a browser on this host POST here, but not with this content type
    // (that needs a CORS preflight, which is never answered).
    let is_json = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the filter as Content-Type: application/json\n".into(),
        );
    }
    let body = match Limited::new(req.into_body(), REPLAY_BODY_MAX)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("request body: {e}\n")),
    };
    let filter: ReplayFilter = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("not a replay filter: {e}\n"),
            )
        }
    };
    match service.replay(filter).await {
        Ok(report) => json(
            StatusCode::OK,
            serde_json::to_string(&report).unwrap_or_default(),
        ),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// `GET /status`: the [`StatusReport`] as JSON; the dead-letters are read off the runtime.
async fn status_route(metrics: &Metrics, store_path: Arc<Path>) -> Response<Full<Bytes>> {
    let mut report = StatusReport::from_metrics(metrics);
    let report = tokio::task::spawn_blocking(move || {
        report.read_dead_letters(&store_path);
        report
    })
    .await;
    match report {
        Ok(report) => json(
            StatusCode::OK,
            serde_json::to_string(&report).unwrap_or_default(),
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = text(status, body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
