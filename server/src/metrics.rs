//! Prometheus metrics of the server, named `lifeboat_<area>_<name>_<unit>`.
//!
//! Each metric is documented where it is registered; dashboards and alert rules in
//! `dashboards/` and `deploy/prometheus/` use these names.

use prometheus::{HistogramOpts, HistogramVec, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// HTTP request latency by route template (bounded: one label value per route) and status class.
    pub http_request_duration: HistogramVec,
    /// Whether each dependency answered the last readiness check (1) or not (0).
    pub ready: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();

        let build_info = IntGaugeVec::new(
            Opts::new("lifeboat_build_info", "Always 1; the labels say which lifeboat-server version is running."),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build_info))?;

        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "lifeboat_http_request_duration_seconds",
                "Time to answer an HTTP request, by route template and status class (2xx, 4xx, 5xx).",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            &["route", "status"],
        )?;
        registry.register(Box::new(http_request_duration.clone()))?;

        let ready = IntGaugeVec::new(
            Opts::new(
                "lifeboat_ready",
                "1 when the dependency (database, storage) answered the last readiness check, else 0.",
            ),
            &["dependency"],
        )?;
        registry.register(Box::new(ready.clone()))?;

        Ok(Self { registry, http_request_duration, ready })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}
