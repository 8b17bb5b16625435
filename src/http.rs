//! `/healthz`, `/readyz` and `/metrics` on a loopback socket. Ready means: the store writes,
//! NATS is connected, and every MQTT listener is bound. `POST /dead-letters/replay` runs
//! `dead-letters replay` for the CLI ([`crate::replay`]), for loopback peers only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
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

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "HTTP metrics listen on a non-loopback address; anyone on that network can read them");
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    replay: replay::Service,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let metrics = metrics.clone();
                let replay = replay.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let metrics = metrics.clone();
                        let replay = replay.clone();
                        async move {
                            if req.uri().path() == replay::PATH {
                                return Ok::<_, Infallible>(replay_route(req, peer, &replay).await);
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
            let store = metrics.store_healthy();
            let nats = metrics.nats_is_connected();
            let listeners = metrics.listeners_bound();
            let bound = listeners.iter().all(|(_, b)| *b);
            let status = if store && nats && bound {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let link = match (nats, metrics.nats_problem()) {
                (true, _) => "connected".to_string(),
                (false, Some(problem)) => format!("disconnected ({problem})"),
                (false, None) => "disconnected".to_string(),
            };
            let mut body = format!(
                "store: {}\nnats: {}\nstream: {}\n",
                if store { "ok" } else { "failing" },
                link,
                if metrics.stream_found() {
                    "found"
                } else {
                    "not found"
                },
            );
            // A serial port that is down is reported but does not make the gateway unready:
            // one unplugged sensor must not take the buffer and the other inputs out of service.
            for (port, state) in metrics.serial_states() {
                match state {
                    Ok(()) => body.push_str(&format!("serial {port}: up\n")),
                    Err(why) => body.push_str(&format!("serial {port}: down ({why})\n")),
                }
            }
            for (name, bound) in listeners {
                let state = if bound { "listening" } else { "not bound" };
                body.push_str(&format!("listener {name}: {state}\n"));
            }
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
            "not found: try /healthz, /readyz or /metrics\n".into(),
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
    let json = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json {
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
        Ok(report) => {
            let mut r = text(
                StatusCode::OK,
                serde_json::to_string(&report).unwrap_or_default(),
            );
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
