//! `lifeboat-agent run`: the long-running service. It watches usbmuxd for iPhones coming
//! and going, and keeps one worker per iPhone it has seen. A worker backs its iPhone up
//! whenever it is attached and due under the server's policy (its last successful backup
//! is older than the policy's interval), at most `max_concurrent` devices at once, and
//! retries a failed backup with exponential backoff. An unplugged iPhone's failed backup
//! is not retried until it is attached again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use idevice::usbmuxd::{UsbmuxdAddr, UsbmuxdListenEvent};
use lifeboat_shared::ids::{RestoreJobId, SnapshotId, Udid};
use lifeboat_shared::wire::{ErrorCode, Request, Response, RestoreEnd};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::device::{self, DeviceError, Provider};
use crate::job::{self, Agent, JobError};
use crate::progress::Progress;

/// The policy when the server does not say (an older server): once a day.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How often an attached device that is not due yet is looked at again: for a restore
/// job the help desk queued, a backup made elsewhere, a changed policy.
const RECHECK: Duration = Duration::from_secs(15);
/// How often an iPhone that does not trust this computer yet is tried again.
const TRUST_RETRY: Duration = Duration::from_secs(3);
/// How soon after a broken connection usbmuxd must report an unplugged iPhone gone.
const GONE_WITHIN: Duration = Duration::from_secs(3);
/// How long to wait before listening to usbmuxd again after it went away.
const USBMUXD_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Device backups at once on this workstation.
    pub max_concurrent: usize,
    /// The first retry's delay; each further failure doubles it, up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How often the service reports in with no iPhone attached.
    pub heartbeat: Duration,
}

impl ServiceConfig {
    /// The delay before retry number `failures` (1 = the first).
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.retry_initial.saturating_mul(factor).min(self.retry_max)
    }
}

enum Event {
    Attached(Provider),
    Detached(u32),
}

/// Runs until `shutdown` resolves. Backups in progress then stop where they are; their
/// runs are resumed by the next start.
pub async fn run(
    agent: Arc<Agent>,
    addr: UsbmuxdAddr,
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::channel(64);
    // idevice's listen stream is not `Send`: it gets a thread and a runtime of its own.
    // The thread ends when it next finds the service gone.
    std::thread::Builder::new().name("usbmuxd-watch".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(watch_usbmuxd(addr, events_tx)),
            Err(e) => tracing::error!(error = %e, "cannot start the usbmuxd watcher"),
        }
    })?;
    let slots = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
    // udid → (usbmuxd device id while attached, the worker's view of it).
    let mut devices: HashMap<String, (Option<u32>, watch::Sender<Option<Provider>>)> = HashMap::new();
    let mut workers = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    tracing::info!(agent.id = %agent.state.agent, server = %agent.state.server, "agent running; waiting for iPhones");
    let heartbeat = tokio::spawn(heartbeat(agent.clone(), config.heartbeat));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(r) = workers.join_next(), if !workers.is_empty() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "a device worker stopped");
                }
            }
            event = events.recv() => match event {
                Some(Event::Attached(provider)) => {
                    let udid = provider.udid.clone();
                    tracing::info!(device.udid = %udid, "iPhone attached");
                    match devices.get_mut(&udid) {
                        Some((id, tx)) => {
                            *id = Some(provider.device_id());
                            tx.send_replace(Some(provider));
                        }
                        None => {
                            let (tx, rx) = watch::channel(Some(provider.clone()));
                            devices.insert(udid.clone(), (Some(provider.device_id()), tx));
                            workers.spawn(worker(agent.clone(), udid, rx, slots.clone(), config.clone()));
                        }
                    }
                }
                Some(Event::Detached(device_id)) => {
                    for (udid, (id, tx)) in &mut devices {
                        if *id == Some(device_id) {
                            tracing::info!(device.udid = %udid, "iPhone detached");
                            *id = None;
                            tx.send_replace(None);
                        }
                    }
                }
                None => anyhow::bail!("the usbmuxd watcher stopped"),
            },
        }
    }
    heartbeat.abort();
    workers.shutdown().await;
    Ok(())
}

/// Reports in every `every` (a connection, which the server records as the agent's last
/// sighting, and the backup policy), phone or not, until aborted.
async fn heartbeat(agent: Arc<Agent>, every: Duration) {
    loop {
        let seen = async {
            let client = agent.connect().await?;
            let r = client.request(&Request::GetPolicy).await;
            client.close().await;
            r.map_err(JobError::from)
        }
        .await;
        if let Err(e) = seen {
            tracing::warn!(error = %e, "could not report in to the server");
        }
        tokio::time::sleep(every).await;
    }
}

/// Forwards usbmuxd's attach and detach events, listening again whenever usbmuxd goes
/// away (each new listen starts by announcing every attached device).
async fn watch_usbmuxd(addr: UsbmuxdAddr, events: mpsc::Sender<Event>) {
    let mut complained = false;
    loop {
        let result = async {
            let mut conn = device::mux(&addr)
                .await
                .map_err(|cause| DeviceError::Usbmuxd { addr: device::describe(&addr), cause })?;
            let mut stream =
                conn.listen().await.map_err(|cause| DeviceError::Usbmuxd { addr: device::describe(&addr), cause })?;
            complained = false;
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(UsbmuxdListenEvent::Connected(d)) => {
                        Event::Attached(Provider::new(addr.clone(), d.device_id, d.udid))
                    }
                    Ok(UsbmuxdListenEvent::Disconnected(id)) => Event::Detached(id),
                    Err(cause) => return Err(DeviceError::Usbmuxd { addr: device::describe(&addr), cause }),
                };
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
            Err(DeviceError::Failed("usbmuxd closed the connection".into()))
        }
        .await;
        match result {
            Ok(()) => return,
            Err(_) if events.is_closed() => return,
            Err(e) if !complained => {
                tracing::warn!(error = %e, "cannot watch usbmuxd; trying again");
                complained = true;
            }
            Err(e) => tracing::debug!(error = %e, "cannot watch usbmuxd"),
        }
        // Devices seen before are gone as far as we can tell: the next listen re-announces.
        tokio::time::sleep(USBMUXD_RETRY).await;
    }
}

/// Waits until the device is attached; `None` when the service is stopping.
async fn attached(rx: &mut watch::Receiver<Option<Provider>>) -> Option<Provider> {
    rx.wait_for(Option::is_some).await.ok().and_then(|p| p.clone())
}

/// Sleeps for `d`, or until the device goes or comes back; true if it slept the whole time.
async fn sleep_unless_changed(d: Duration, rx: &mut watch::Receiver<Option<Provider>>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        r = rx.changed() => r.is_err(),
    }
}

async fn worker(
    agent: Arc<Agent>,
    udid: String,
    mut rx: watch::Receiver<Option<Provider>>,
    slots: Arc<Semaphore>,
    config: ServiceConfig,
) {
    let mut failures = 0u32;
    let mut untrusted = false;
    loop {
        let Some(provider) = attached(&mut rx).await else { return };
        rx.mark_unchanged();
        // Nothing can happen to an iPhone that does not trust this computer: say so once,
        // and look again shortly (the user may tap Trust any moment).
        match provider.values().await {
            Ok(_) => untrusted = false,
            Err(DeviceError::NotTrusted) => {
                if !std::mem::replace(&mut untrusted, true) {
                    job::report_needs_trust(&agent, &provider).await;
                }
                sleep_unless_changed(TRUST_RETRY, &mut rx).await;
                continue;
            }
            Err(e) => {
                if !wait_if_gone(&mut rx, &provider).await {
                    failures += 1;
                    let delay = config.backoff(failures);
                    tracing::warn!(device.udid = %udid, error = %e, retry_in_s = delay.as_secs(), "cannot read the iPhone");
                    sleep_unless_changed(delay, &mut rx).await;
                }
                continue;
            }
        }
        // A restore that ended but whose end the server never heard of is reported first:
        // asked again, the server would hand this agent the same job back.
        if let Some(pending) = RestoreOutcome::load(&agent.state_dir, &udid) {
            if let Err(e) = pending.deliver(&agent).await {
                failures += 1;
                let delay = config.backoff(failures);
                tracing::warn!(device.udid = %udid, restore.id = %pending.job, error = %e, retry_in_s = delay.as_secs(), "cannot report how a restore ended");
                sleep_unless_changed(delay, &mut rx).await;
                continue;
            }
            RestoreOutcome::remove(&agent.state_dir, &udid);
        }
        let check = match check(&agent, &udid).await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                let delay = config.backoff(failures);
                tracing::warn!(device.udid = %udid, error = %e, retry_in_s = delay.as_secs(), "cannot ask the server about the device");
                sleep_unless_changed(delay, &mut rx).await;
                continue;
            }
        };
        // A restore the help desk asked for comes first: a replacement phone gets its
        // data before anything else happens to it.
        if let Some((job, snapshot)) = check.restore {
            let permit = match slots.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return,
            };
            let say = |line: &str| tracing::info!(device.udid = %udid, restore.id = %job, "{line}");
            // The job's lease (an hour) is renewed while the restore runs, however long.
            let result = tokio::select! {
                r = job::restore(&agent, &provider, snapshot, true, &say) => r,
                never = renew_restore_lease(&agent, &udid, job) => match never {},
            };
            drop(permit);
            let end = match &result {
                Ok(_) => RestoreEnd::Succeeded,
                Err(e) => RestoreEnd::Failed { reason: e.restore_reason().into(), message: e.to_string() },
            };
            if let Err(e) = &result {
                tracing::warn!(device.udid = %udid, restore.id = %job, error = %e, "restore failed");
            }
            // Kept until the server has it (a killed agent or a lost report included): the
            // loop's next turn reports it before asking for work again.
            let outcome = RestoreOutcome { job, end };
            outcome.save(&agent.state_dir, &udid);
            if outcome.deliver(&agent).await.is_ok() {
                RestoreOutcome::remove(&agent.state_dir, &udid);
            }
            continue;
        }
        let due_in = check.due_in;
        if !due_in.is_zero() {
            tracing::debug!(device.udid = %udid, due_in_s = due_in.as_secs(), "not due yet");
            sleep_unless_changed(due_in.min(RECHECK), &mut rx).await;
            continue;
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = rx.changed() => continue,
        };
        let progress = Arc::new(Progress::new());
        let result = job::backup(&agent, &provider, progress).await;
        drop(permit);
        match result {
            Ok(_) => failures = 0,
            Err(JobError::Device(DeviceError::NotTrusted)) => {
                // Not a failure: the iPhone asks its user; look again shortly.
                untrusted = true;
                sleep_unless_changed(TRUST_RETRY, &mut rx).await;
            }
            Err(JobError::Device(DeviceError::Disconnected(_) | DeviceError::NotAttached(_)))
                if wait_if_gone(&mut rx, &provider).await =>
            {
                // Unplugged: the next attach backs it up (it is still due).
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                let delay = config.backoff(failures);
                tracing::warn!(device.udid = %udid, error = %e, failures, retry_in_s = delay.as_secs(), "backup failed; will retry");
                sleep_unless_changed(delay, &mut rx).await;
            }
        }
    }
}

/// After a broken connection: whether the device really went (usbmuxd says detached, or
/// it came back under a new device id) within a few seconds. A connection that broke
/// while the iPhone stayed is a failure like any other.
async fn wait_if_gone(rx: &mut watch::Receiver<Option<Provider>>, provider: &Provider) -> bool {
    let id = provider.device_id();
    let changed = rx.wait_for(|p| p.as_ref().map(Provider::device_id) != Some(id));
    matches!(tokio::time::timeout(GONE_WITHIN, changed).await, Ok(Ok(_)))
}

/// How often a running restore renews its job's lease (one hour on the server).
const RESTORE_RENEW: Duration = Duration::from_secs(10 * 60);

/// Renews the lease of restore job `job` every [`RESTORE_RENEW`] — asking `NextRestore`
/// again answers the same job and extends it — until dropped.
pub(crate) async fn renew_restore_lease(agent: &Agent, udid: &str, job: RestoreJobId) -> std::convert::Infallible {
    let Ok(parsed) = udid.parse::<Udid>() else { return std::future::pending().await };
    loop {
        tokio::time::sleep(RESTORE_RENEW).await;
        let renewed = async {
            let client = agent.connect().await?;
            let r = client.request(&Request::NextRestore { udid: parsed.clone() }).await;
            client.close().await;
            r.map_err(JobError::from)
        }
        .await;
        match renewed {
            Ok(Response::RestoreJob { job: j, .. }) if j == job => {}
            Ok(other) => tracing::warn!(restore.id = %job, answer = ?other, "the restore job's lease was not renewed"),
            Err(e) => tracing::warn!(restore.id = %job, error = %e, "renewing the restore job's lease"),
        }
    }
}

/// How a restore job ended, until the server has heard it:
/// `<state>/devices/<udid>.restore`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RestoreOutcome {
    job: RestoreJobId,
    end: RestoreEnd,
}

impl RestoreOutcome {
    fn path(state_dir: &std::path::Path, udid: &str) -> std::path::PathBuf {
        state_dir.join("devices").join(format!("{udid}.restore"))
    }

    fn load(state_dir: &std::path::Path, udid: &str) -> Option<Self> {
        let path = Self::path(state_dir, udid);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "an unreadable restore outcome is dropped");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn save(&self, state_dir: &std::path::Path, udid: &str) {
        let path = Self::path(state_dir, udid);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("restore-tmp");
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not record how the restore ended");
        }
    }

    fn remove(state_dir: &std::path::Path, udid: &str) {
        let _ = std::fs::remove_file(Self::path(state_dir, udid));
    }

    /// Tells the server, a few times if need be. A job the server no longer counts as this
    /// agent's (`NotFound`: another agent took it over, or the help desk replaced it) is
    /// reported as far as it can be.
    async fn deliver(&self, agent: &Agent) -> Result<(), JobError> {
        let mut last = None;
        for attempt in 1..=3 {
            let result = async {
                let client = agent.connect().await?;
                let r = client.request(&Request::EndRestore { job: self.job, end: self.end.clone() }).await;
                client.close().await;
                r.map(|_| ())
            }
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                    tracing::warn!(restore.id = %self.job, error = %e, "the server no longer holds this restore job for this agent");
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            if attempt < 3 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Err(last.map_or_else(|| JobError::Other("reporting the restore's end".into()), JobError::from))
    }
}

/// What the server says about an attached device.
struct Check {
    /// A restore job for it, now claimed by this agent.
    restore: Option<(RestoreJobId, SnapshotId)>,
    /// How long until it is due under the server's policy (zero: now).
    due_in: Duration,
}

async fn check(agent: &Agent, udid: &str) -> Result<Check, JobError> {
    let parsed: Udid = udid.parse().map_err(|e| JobError::Other(format!("{udid} is not a UDID: {e}")))?;
    let client = agent.connect().await?;
    let result = async {
        let restore = match client.request(&Request::NextRestore { udid: parsed.clone() }).await {
            Ok(Response::RestoreJob { job, snapshot }) => Some((job, snapshot)),
            Ok(Response::Ok) => None,
            Ok(other) => return Err(JobError::Other(format!("unexpected answer {other:?}"))),
            Err(e) => return Err(e.into()),
        };
        if restore.is_some() {
            return Ok(Check { restore, due_in: Duration::ZERO });
        }
        let interval = policy_interval(&client).await?;
        let last = match client.request(&Request::LatestSnapshot { udid: parsed }).await {
            Ok(Response::Snapshot { created_unix_ms, .. }) => Some(created_unix_ms),
            Ok(other) => return Err(JobError::Other(format!("unexpected answer {other:?}"))),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        let due_in = match last {
            None => Duration::ZERO,
            Some(last) => {
                let age =
                    Duration::from_millis(crate::pipeline::transfer::now_unix_ms().saturating_sub(last).max(0) as u64);
                interval.saturating_sub(age)
            }
        };
        Ok(Check { restore: None, due_in })
    }
    .await;
    client.close().await;
    result
}

/// The server's backup interval.
pub async fn policy_interval(client: &crate::net::Client) -> Result<Duration, JobError> {
    match client.request(&Request::GetPolicy).await {
        Ok(Response::Policy { backup_interval_seconds }) => Ok(Duration::from_secs(backup_interval_seconds.max(1))),
        Ok(other) => Err(JobError::Other(format!("unexpected answer {other:?}"))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_outcome_is_kept_until_removed_and_damage_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let udid = "00008030-001A2B3C4D5E6F70";
        assert_eq!(RestoreOutcome::load(dir.path(), udid), None);
        let o = RestoreOutcome {
            job: RestoreJobId(uuid::Uuid::from_u128(7)),
            end: RestoreEnd::Failed { reason: "device-disconnected".into(), message: "unplugged".into() },
        };
        o.save(dir.path(), udid);
        assert_eq!(RestoreOutcome::load(dir.path(), udid), Some(o.clone()));
        RestoreOutcome::remove(dir.path(), udid);
        assert_eq!(RestoreOutcome::load(dir.path(), udid), None);
        std::fs::write(RestoreOutcome::path(dir.path(), udid), b"{not json").unwrap();
        assert_eq!(RestoreOutcome::load(dir.path(), udid), None);
        assert!(!RestoreOutcome::path(dir.path(), udid).exists(), "a damaged outcome is removed");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = ServiceConfig {
            max_concurrent: 1,
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(300),
        };
        let delays: Vec<u64> = (1..=9).map(|n| c.backoff(n).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(c.backoff(u32::MAX).as_secs(), 3600);
    }
}
