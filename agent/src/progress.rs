//! What a backup is doing, shared between the parts doing it (the device delegate, the
//! upload pipeline) and whoever shows it (the `backup` command's progress bar, the
//! service's logs). Counters only: reading them never slows the backup down.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

/// The phases of a backup, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    /// iOS 16.1 and later: the phone waits for its passcode before it sends anything.
    WaitingForPasscode = 1,
    /// The phone sends its files; finished files are uploaded meanwhile.
    Receiving = 2,
    /// The phone is done; the rest of the files are chunked and uploaded.
    Uploading = 3,
    Committing = 4,
    Done = 5,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::WaitingForPasscode => "waiting for passcode",
            Self::Receiving => "receiving",
            Self::Uploading => "uploading",
            Self::Committing => "committing",
            Self::Done => "done",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::WaitingForPasscode,
            2 => Self::Receiving,
            3 => Self::Uploading,
            4 => Self::Committing,
            5 => Self::Done,
            _ => Self::Connecting,
        }
    }
}

/// Live counters of one backup.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    /// Files and bytes the phone has sent.
    pub files_received: AtomicU64,
    pub bytes_received: AtomicU64,
    /// What the phone says the whole backup will send (0 while unknown).
    pub bytes_expected: AtomicU64,
    /// The phone's own percentage, times 100 (`u64::MAX` while unknown).
    pub device_percent_x100: AtomicU64,
    /// Files and plaintext bytes chunked (read back and hashed) by the pipeline.
    pub files_chunked: AtomicU64,
    pub bytes_chunked: AtomicU64,
    /// Sealed bytes sent to the server (chunks the server lacked).
    pub bytes_uploaded: AtomicU64,
    /// Moves the phone asked for, and those a swap of whole directories did (see
    /// `staging`): no rename of their own.
    pub files_moved: AtomicU64,
    pub files_moved_by_swap: AtomicU64,
    /// Set once the phone was found waiting for its passcode (stays set), so whoever
    /// shows progress says so even if the passcode came before it looked.
    pub passcode_asked: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn new() -> Self {
        let p = Self::default();
        p.device_percent_x100.store(u64::MAX, Relaxed);
        p
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Relaxed))
    }

    /// Moves to `phase`; returns whether it changed.
    pub fn set_phase(&self, phase: Phase) -> bool {
        self.phase.swap(phase as u8, Relaxed) != phase as u8
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
