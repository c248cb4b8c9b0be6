//! Devices and runs: registering a device, its state, opening a run under a lease (or
//! resuming one), renewing it with every request, ending it.

use lifeboat_shared::ids::{RunId, Udid};
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{self, DeviceState, ErrorCode, Response, RunEnd};

use super::Ingest;
use crate::app::lock;
use crate::session::{Rejection, Reply, Session, valid_reason};
use crate::store::{self, runs::Opened};

/// A run this session may use.
pub(super) struct RunRow {
    pub udid: String,
    pub snapshot: lifeboat_shared::ids::SnapshotId,
}

impl Ingest {
    pub async fn register_device(&self, s: Session, d: &DeviceInfo, serial: Option<String>) -> Reply {
        let client = self.app.db.get().await?;
        store::devices::register(&client, s.tenant, s.agent, d, serial.as_deref()).await?;
        Ok(())
    }

    pub async fn report_state(&self, s: Session, udid: &Udid, state: DeviceState, message: Option<String>) -> Reply {
        let client = self.app.db.get().await?;
        if !store::devices::set_state(&client, s.tenant, s.agent, udid, state.as_str()).await? {
            return Err(Rejection::new(ErrorCode::NotFound, format!("device {udid} is not registered")));
        }
        if let Some(m) = message {
            tracing::info!(device.udid = %udid, device.state = state.as_str(), message = %m, "device state");
        }
        Ok(())
    }

    pub async fn open_run(&self, s: Session, udid: &Udid, resume: Option<RunId>) -> Result<Response, Rejection> {
        let lease_seconds = self.lease.as_secs() as u32;
        let mut client = self.app.db.get().await?;
        if let Some(run) = resume {
            let row = self.check_run(&client, s, run).await?;
            if row.udid != udid.as_str() {
                return Err(Rejection::new(ErrorCode::Forbidden, format!("run {run} is not for device {udid}")));
            }
            return Ok(Response::RunOpened { run, snapshot: row.snapshot, lease_seconds });
        }
        let opened = store::runs::open(&mut client, s.tenant, s.agent, udid, self.lease).await?;
        drop(client);
        match opened {
            Opened::Run { run, snapshot, replaced } => {
                if let Some((old, reason)) = replaced {
                    self.app.metrics.backup_runs.with_label_values(&["failed", wire::metric_reason(reason)]).inc();
                    // After the transaction: flushing writes packs to storage.
                    self.discard_buffer(old).await;
                }
                Ok(Response::RunOpened { run, snapshot, lease_seconds })
            }
            Opened::Held(run) => Err(Rejection::new(
                ErrorCode::LeaseHeld,
                match run {
                    Some(run) => format!("device {udid} is being backed up by another agent (run {run})"),
                    None => format!("device {udid} is being backed up: another run was opened at the same moment"),
                },
            )),
            Opened::NoDevice => Err(Rejection::new(ErrorCode::NotFound, format!("device {udid} is not registered"))),
        }
    }

    /// The run, if it is this agent's, of this tenant, and still running; renews its lease.
    pub(super) async fn check_run(
        &self,
        client: &tokio_postgres::Client,
        s: Session,
        run: RunId,
    ) -> Result<RunRow, Rejection> {
        let lease = store::runs::renew(client, s.tenant, s.agent, run, self.lease)
            .await?
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("no run {run}")))?;
        if lease.agent != s.agent {
            return Err(Rejection::new(ErrorCode::Forbidden, format!("run {run} belongs to another agent")));
        }
        if lease.status != "running" {
            return Err(Rejection::new(ErrorCode::LeaseLost, format!("run {run} is {}", lease.status)));
        }
        Ok(RunRow { udid: lease.udid, snapshot: lease.snapshot })
    }

    pub async fn end_run(&self, s: Session, run: RunId, end: RunEnd) -> Reply {
        let (status, reason, message) = match &end {
            RunEnd::Failed { reason, message } => ("failed", reason.as_str(), message.as_str()),
            RunEnd::Cancelled { reason } => ("cancelled", reason.as_str(), ""),
        };
        if !valid_reason(reason) || message.len() > 4096 {
            return Err(Rejection::new(ErrorCode::Malformed, "reason must be a code like device-disconnected"));
        }
        {
            let client = self.app.db.get().await?;
            self.check_run(&client, s, run).await?;
        }
        // Chunks this run already verified stay useful for the next run of the device.
        let buf = lock(&self.runs).remove(&run);
        if let Some(buf) = buf {
            self.flush(&buf).await?;
        }
        let client = self.app.db.get().await?;
        store::runs::end(&client, s.tenant, s.agent, run, status, reason, message).await?;
        self.app.metrics.backup_runs.with_label_values(&[status, wire::metric_reason(reason)]).inc();
        tracing::info!(agent.id = %s.agent, run.id = %run, run.status = status, run.reason = reason, "run ended");
        Ok(())
    }
}
