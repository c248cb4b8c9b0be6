//! Jobs a help-desk user starts at this workstation: `lifeboat-agent restore|export
//! --credential FILE`. Reading a snapshot always needs a person: the server checks the
//! user's API credential, records them as the job's creator, and serves the snapshot to
//! this agent only while the job runs (`StartJob`, protocol version 6).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use lifeboat_shared::Secret;
use lifeboat_shared::ids::{RestoreJobId, SnapshotId};
use lifeboat_shared::wire::{JobRequest, MAX_CREDENTIAL_BYTES, Request, Response, RestoreEnd, START_JOB_VERSION};

use super::{Agent, JobError, service};

/// Starts `job` on the server for the user whose credential is in `credential_file`:
/// the job is this agent's at once. Returns it and the snapshot it reads.
pub async fn start(
    agent: &Agent,
    credential_file: &Path,
    job: JobRequest,
) -> Result<(RestoreJobId, SnapshotId), JobError> {
    let text = std::fs::read_to_string(credential_file)
        .map_err(|e| JobError::Other(format!("reading the credential file {}: {e}", credential_file.display())))?;
    let credential = text.trim();
    if credential.is_empty() || credential.len() > MAX_CREDENTIAL_BYTES || credential.contains(char::is_whitespace) {
        return Err(JobError::Other(format!(
            "{} does not hold one API credential (lbu1_…, from `lifeboat-server user create`)",
            credential_file.display()
        )));
    }
    let client = agent.connect().await?;
    let version = client.accepted.version;
    if version < START_JOB_VERSION {
        client.close().await;
        return Err(JobError::Other(format!(
            "the server speaks protocol version {version}, which cannot start a job for a help-desk user: upgrade it"
        )));
    }
    let answer = client.request(&Request::StartJob { credential: Secret::new(credential.to_string()), job }).await;
    client.close().await;
    match answer? {
        Response::RestoreJob { job, snapshot } => {
            tracing::info!(restore.id = %job, snapshot.id = %snapshot, "job started for a help-desk user");
            Ok((job, snapshot))
        }
        other => Err(JobError::Other(format!("unexpected answer {other:?}"))),
    }
}

/// Runs the work of a started job and reports how it ended (`EndRestore`), after which
/// the server serves this agent nothing more of the snapshot. A restore's lease (on its
/// `target`) is renewed while it runs; an export must end within the job's lease (an hour).
pub async fn run_started<T>(
    agent: &Agent,
    job: RestoreJobId,
    target: Option<&str>,
    work: impl Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    let result = match target {
        Some(udid) => tokio::select! {
            r = work => r,
            never = service::renew_restore_lease(agent, udid, job) => match never {},
        },
        None => work.await,
    };
    let end = match &result {
        Ok(_) => RestoreEnd::Succeeded,
        Err(e) => RestoreEnd::Failed { reason: e.restore_reason().into(), message: e.to_string() },
    };
    for attempt in 1..=3 {
        let ended = async {
            let client = agent.connect().await?;
            let r = client.request(&Request::EndRestore { job, end: end.clone() }).await;
            client.close().await;
            r.map_err(JobError::from)
        }
        .await;
        match ended {
            Ok(_) => break,
            Err(e) if attempt == 3 => {
                tracing::warn!(restore.id = %job, error = %e, "could not report the job's end; its lease ends it")
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    result
}
