//! The HTTP side of the server: `/healthz`, `/readyz`, `/metrics`, and the `/api/v1/`
//! admin and help-desk API (`api`), with the caller's identity (`caller`) and errors
//! (`error`). Handlers ask `store` for rows and `restore` for snapshot contents; no SQL
//! here.

pub mod api;
pub mod caller;
pub mod error;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;

/// How long each dependency may take to answer a readiness check.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The API listener's routes; `/metrics` among them unless it has a listener of its own.
pub fn router(app: Arc<App>, with_metrics: bool) -> Router {
    let mut r = Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz));
    if with_metrics {
        r = r.route("/metrics", get(metrics));
    }
    r.merge(api::router())
        .merge(crate::console::router())
        .layer(axum::middleware::from_fn_with_state(app.clone(), record_latency))
        .with_state(app)
}

/// The routes of a metrics listener of its own (`--metrics-listen`): `/metrics` and
/// `/healthz`, nothing of the API.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(app)
}

/// Alive: the process answers. Says nothing about dependencies (that is `/readyz`).
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: PostgreSQL and storage both answer. 503 with the failing dependency otherwise.
async fn readyz(State(s): State<Arc<App>>) -> Response {
    let (db, storage) =
        tokio::join!(crate::platform::db::ping(&s.db, READY_TIMEOUT), crate::objects::ping(&s.storage, READY_TIMEOUT));
    s.metrics.ready.with_label_values(&["database"]).set(i64::from(db.is_ok()));
    s.metrics.ready.with_label_values(&["storage"]).set(i64::from(storage.is_ok()));
    let status = if db.is_ok() && storage.is_ok() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    (status, Json(json!({"ready": status == StatusCode::OK, "database": show(&db), "storage": show(&storage)})))
        .into_response()
}

async fn metrics(State(s): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn record_latency(State(s): State<Arc<App>>, req: Request, next: Next) -> Response {
    // The route template, not the raw path: label values stay bounded.
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let class = format!("{}xx", resp.status().as_u16() / 100);
    s.metrics.http_request_duration.with_label_values(&[&route, &class]).observe(start.elapsed().as_secs_f64());
    resp
}
