//! Prometheus metrics of the server, named `lifeboat_<area>_<name>_<unit>`.
//!
//! Each metric is documented where it is registered; dashboards and alert rules in
//! `dashboards/` and `deploy/prometheus/` use these names.

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// HTTP request latency by route template (bounded: one label value per route) and status class.
    pub http_request_duration: HistogramVec,
    /// Whether each dependency answered the last readiness check (1) or not (0).
    pub ready: IntGaugeVec,
    /// Backup runs that ended, by result (succeeded, failed, cancelled) and reason code.
    pub backup_runs: IntCounterVec,
    /// Blob bytes received from agents (after their compression and encryption).
    pub ingest_received_bytes: IntCounter,
    /// Bytes written to storage as packs and manifests.
    pub ingest_stored_bytes: IntCounter,
    /// Plaintext bytes of committed snapshots that did not have to be uploaded (deduplicated).
    pub ingest_deduplicated_bytes: IntCounter,
    /// Chunks refused because their content did not match their id.
    pub ingest_rejected_chunks: IntCounter,
    /// Open agent connections.
    pub quic_connections: IntGauge,
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

        let backup_runs = IntCounterVec::new(
            Opts::new("lifeboat_backup_runs_total", "Backup runs that ended, by result and reason code."),
            &["result", "reason"],
        )?;
        registry.register(Box::new(backup_runs.clone()))?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let ingest_received_bytes = counter(
            "lifeboat_ingest_received_bytes_total",
            "Blob bytes received from agents (compressed and encrypted by the agent).",
        )?;
        let ingest_stored_bytes =
            counter("lifeboat_ingest_stored_bytes_total", "Bytes written to storage as packs and manifests.")?;
        let ingest_deduplicated_bytes = counter(
            "lifeboat_ingest_deduplicated_bytes_total",
            "Plaintext bytes of committed snapshots that were already stored and not uploaded again.",
        )?;
        let ingest_rejected_chunks = counter(
            "lifeboat_ingest_rejected_chunks_total",
            "Chunks refused because their content did not match their id (nothing of them is stored).",
        )?;
        let quic_connections = IntGauge::new("lifeboat_quic_connections", "Open agent connections.")?;
        registry.register(Box::new(quic_connections.clone()))?;

        Ok(Self {
            registry,
            http_request_duration,
            ready,
            backup_runs,
            ingest_received_bytes,
            ingest_stored_bytes,
            ingest_deduplicated_bytes,
            ingest_rejected_chunks,
            quic_connections,
        })
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
