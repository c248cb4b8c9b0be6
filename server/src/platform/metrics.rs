//! Prometheus metrics of the server, named `lifeboat_<area>_<name>_<unit>`.
//!
//! Each metric is documented where it is registered; dashboards and alert rules in
//! `dashboards/` and `deploy/prometheus/` use these names.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

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
    /// Fleet state read from the database (see `jobs::gauges`).
    pub fleet: FleetMetrics,
    /// Restore tests run by this process, by result (passed, failed).
    pub restore_tests: IntCounterVec,
    /// How long restore tests took.
    pub restore_test_duration: Histogram,
    /// Unix time each background job (`jobs`) last finished a pass without error.
    pub job_last_success: GaugeVec,
    /// Passes of each background job that failed or panicked.
    pub job_failures: IntCounterVec,
    /// Agent requests for data the agent may not read (a snapshot, chunks or a backup
    /// password outside its jobs and leases), answered as if it did not exist, by request.
    pub reads_refused: IntCounterVec,
}

/// Gauges refreshed from PostgreSQL by the fleet task, so every replica exports the
/// same numbers (aggregate them with `max`). Per-device and per-agent series exist only
/// because alerts need them; snapshot ids never appear in labels.
#[derive(Debug, Clone)]
pub struct FleetMetrics {
    /// Devices by status: protected, stale, needs-action, failing.
    pub devices: IntGaugeVec,
    /// Unix time of each device's newest committed snapshot (absent: never backed up).
    pub device_last_success: GaugeVec,
    /// Failed runs of each device since its last successful one.
    pub device_failed_runs: IntGaugeVec,
    /// Unix time since which a device has waited for a person (trust, passcode, backup
    /// password), kept across its agent's retries; 0 if not.
    pub device_needs_action_since: GaugeVec,
    /// Unix time an agent first registered the device (stale is measured from it for a
    /// device that never backed up).
    pub device_first_seen: GaugeVec,
    /// Unix time each (not revoked) agent was last seen.
    pub agent_last_seen: GaugeVec,
    /// Unix time of the newest passing restore test, per tenant.
    pub restore_test_last_success: GaugeVec,
    /// Snapshots whose latest restore test failed, per tenant.
    pub restore_tests_failing: IntGaugeVec,
    /// Devices whose newest snapshot failed its latest restore test, per tenant.
    pub latest_unrestorable: IntGaugeVec,
    /// The server's `[monitoring] stale_after_hours`, in seconds, for the alert rules.
    pub stale_after: Gauge,
    /// The server's `[monitoring] needs_action_after_hours`, in seconds.
    pub needs_action_after: Gauge,
    /// 1 while per-device and per-agent series are exported, 0 when they are off.
    pub per_device_series: IntGauge,
    /// Share of devices with a passing restore test within the coverage window, per tenant.
    pub restore_test_coverage: GaugeVec,
    /// Bytes in packs, per tenant.
    pub storage_bytes: IntGaugeVec,
    /// Committed snapshots, per tenant.
    pub snapshots: IntGaugeVec,
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

        let int_gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let plain_gauge = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let fleet = FleetMetrics {
            devices: int_gauge(
                "lifeboat_devices",
                "Devices by status: protected (backed up within the stale window), stale, needs-action (trust, passcode or backup password), failing.",
                &["tenant", "status"],
            )?,
            device_last_success: gauge(
                "lifeboat_device_last_success_timestamp_seconds",
                "Unix time of the device's newest committed snapshot.",
                &["tenant", "udid"],
            )?,
            device_failed_runs: int_gauge(
                "lifeboat_device_failed_runs_since_success",
                "Failed backup runs of the device since its last successful one.",
                &["tenant", "udid"],
            )?,
            device_needs_action_since: gauge(
                "lifeboat_device_needs_action_since_timestamp_seconds",
                "Unix time since which the device has waited for a person (trust, passcode, backup password), kept across retries; 0 when it is not waiting.",
                &["tenant", "udid"],
            )?,
            device_first_seen: gauge(
                "lifeboat_device_first_seen_timestamp_seconds",
                "Unix time an agent first registered the device.",
                &["tenant", "udid"],
            )?,
            agent_last_seen: gauge(
                "lifeboat_agent_last_seen_timestamp_seconds",
                "Unix time the agent last connected.",
                &["tenant", "agent"],
            )?,
            restore_test_last_success: gauge(
                "lifeboat_restore_test_last_success_timestamp_seconds",
                "Unix time of the newest passing restore test of the tenant.",
                &["tenant"],
            )?,
            restore_tests_failing: int_gauge(
                "lifeboat_restore_tests_failing",
                "Snapshots whose latest restore test failed.",
                &["tenant"],
            )?,
            latest_unrestorable: int_gauge(
                "lifeboat_devices_latest_snapshot_unrestorable",
                "Devices whose newest snapshot failed its latest restore test.",
                &["tenant"],
            )?,
            stale_after: plain_gauge(
                "lifeboat_stale_after_seconds",
                "A device without a successful backup for this long is stale ([monitoring] stale_after_hours).",
            )?,
            per_device_series: {
                let g = IntGauge::new(
                    "lifeboat_per_device_series",
                    "1 while per-device and per-agent series are exported ([monitoring] per_device_series), 0 when off.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            needs_action_after: plain_gauge(
                "lifeboat_needs_action_after_seconds",
                "A device waiting for a person this long raises LifeboatDeviceNeedsAction ([monitoring] needs_action_after_hours).",
            )?,
            restore_test_coverage: gauge(
                "lifeboat_restore_test_coverage_ratio",
                "Share of the tenant's devices with a passing restore test within the coverage window.",
                &["tenant"],
            )?,
            storage_bytes: int_gauge("lifeboat_storage_bytes", "Bytes of packs in storage.", &["tenant"])?,
            snapshots: int_gauge("lifeboat_snapshots", "Committed snapshots.", &["tenant"])?,
        };
        let restore_tests = IntCounterVec::new(
            Opts::new("lifeboat_restore_tests_total", "Restore tests run by this server, by result (passed, failed)."),
            &["result"],
        )?;
        registry.register(Box::new(restore_tests.clone()))?;
        let restore_test_duration = Histogram::with_opts(
            HistogramOpts::new("lifeboat_restore_test_duration_seconds", "How long one restore test took.")
                .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
        )?;
        registry.register(Box::new(restore_test_duration.clone()))?;
        // `job` is the job's name. Prometheus keeps a scraped `job` label as
        // `exported_job` unless the scrape sets honor_labels (the alert rule uses that).
        let job_last_success = GaugeVec::new(
            Opts::new(
                "lifeboat_job_last_success_timestamp_seconds",
                "Unix time this server last finished a pass of the background job without error.",
            ),
            &["job"],
        )?;
        registry.register(Box::new(job_last_success.clone()))?;
        let job_failures = IntCounterVec::new(
            Opts::new("lifeboat_job_failures_total", "Passes of the background job that failed or panicked."),
            &["job"],
        )?;
        registry.register(Box::new(job_failures.clone()))?;
        let reads_refused = IntCounterVec::new(
            Opts::new(
                "lifeboat_agent_reads_refused_total",
                "Agent requests for data outside the agent's jobs and leases, answered NotFound.",
            ),
            &["request"],
        )?;
        for r in ["GetManifest", "GetChunks", "GetBackupPassword", "PutBackupPassword", "ReportKeybag"] {
            reads_refused.with_label_values(&[r]);
        }
        registry.register(Box::new(reads_refused.clone()))?;

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
            fleet,
            restore_tests,
            restore_test_duration,
            job_last_success,
            job_failures,
            reads_refused,
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
