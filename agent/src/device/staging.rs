//! The phone's moves out of its staging directories, a directory at a time.
//!
//! The phone puts each new file into `Snapshot/xx` and, once all are sent, asks the host
//! to move each one to `xx`: 50,000 cross-directory renames for a first backup of 50,000
//! files. The file system takes one lock for every such rename, so they run one after
//! the other (~1.2 s here, while the other core waits).
//!
//! When the destination is a directory this backup made and has put nothing into, the
//! first move swaps the two directories whole (`renameat2` with `RENAME_EXCHANGE`). The
//! destination then holds every staged file, and the staging directory is the empty one.
//! The moves that follow for those files are already done, and nothing is called for
//! them.
//!
//! Staged files the phone has not yet moved are *pending*. They sit in the destination,
//! though the phone still knows them under the staging directory. Before anything else
//! touches either directory, the pending files go back where the phone left them, one
//! rename each. That covers a read, a write, a removal, a listing, the move of another
//! name, and the end of the backup. So the phone always sees what per-file moves would
//! have left.
//!
//! Only plain files named as the phone names them (a file id: 40 lowercase hex digits,
//! kept in 20 bytes while pending, ~4 MB for 200,000 files) are swapped. If anything else
//! is in the staging directory, or anything turns up in the destination, the swap is
//! undone and each file is moved on its own; so it is where the file system cannot swap.
//!
//! A file is put back only where no file is (`RENAME_NOREPLACE`). If one cannot be, the
//! backup fails at its end ([`Exchanges::settle_all`]), even if a later try succeeded:
//! the phone may have been told something the mirror did not hold. An agent killed while
//! files are pending leaves them in the destination. A phone that resumes the backup
//! asks to move them again, and [`moved_before`] counts such a move as done, as it must
//! after any crash between a rename and its answer.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};

/// Staging directories swapped with their destination, and what is pending in each.
#[derive(Default)]
pub(crate) struct Exchanges(std::sync::Mutex<State>);

#[derive(Default)]
struct State {
    /// By staging directory.
    swapped: HashMap<PathBuf, Swap>,
    /// The file system refused a swap (it has no `RENAME_EXCHANGE`, say): no more tries.
    unsupported: bool,
    /// A staged file could not be put back when the phone looked: what it was told may
    /// not match the mirror, so the backup must not be trusted ([`Exchanges::settle_all`]).
    failed: Option<String>,
}

struct Swap {
    dest: PathBuf,
    /// The names swapped in (sorted), and whether each is still pending: the phone knows
    /// it in the staging directory, though it is in `dest`.
    names: Vec<FileId>,
    pending: Vec<bool>,
    left: usize,
}

impl Swap {
    /// `name` was pending: it is not any more.
    fn take(&mut self, name: &OsStr) -> bool {
        let Some(i) = file_id(name).and_then(|id| self.names.binary_search(&id).ok()) else { return false };
        if !std::mem::replace(&mut self.pending[i], false) {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// A file's name as the phone gives it (its file id, the SHA-1 of domain and path: 40
/// lowercase hex digits), in 20 bytes.
type FileId = [u8; 20];

fn file_id(name: &OsStr) -> Option<FileId> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let name = name.as_bytes();
    if name.len() != 40 {
        return None;
    }
    let mut id = [0u8; 20];
    for (byte, pair) in id.iter_mut().zip(name.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(id)
}

fn file_name(id: &FileId) -> OsString {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    OsString::from_vec(id.iter().flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]).collect())
}

/// How [`Exchanges::try_move`] went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Moved {
    /// Done: the file is at its destination.
    Done,
    /// Not a move this can do: the caller renames the file itself, after
    /// [`Exchanges::settle_touching`] for both paths.
    NotHere,
}

impl Exchanges {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves `from` to `to` if a swap has done it already, or swaps `from`'s directory
    /// with `to`'s when `empty_dest` says that one is a directory this backup made and has
    /// put nothing into (and `made_staging` that `from`'s is one it made). Returns the names now
    /// in the destination, so the caller can record them.
    pub(crate) fn try_move(
        &self,
        from: &Path,
        to: &Path,
        made_staging: impl FnOnce(&Path) -> bool,
        empty_dest: impl FnOnce(&Path) -> bool,
    ) -> std::io::Result<(Moved, Vec<OsString>)> {
        let not_here = Ok((Moved::NotHere, Vec::new()));
        let (Some(staging), Some(dest), Some(name)) = (from.parent(), to.parent(), from.file_name()) else {
            return not_here;
        };
        if to.file_name() != Some(name) || staging.starts_with(dest) || dest.starts_with(staging) {
            return not_here;
        }
        let mut state = self.lock();
        if let Some(swap) = state.swapped.get_mut(staging) {
            if swap.dest == dest && swap.take(name) {
                if swap.left == 0 {
                    state.swapped.remove(staging);
                }
                return Ok((Moved::Done, Vec::new()));
            }
            return not_here;
        }
        let in_use = |d: &Path| state.swapped.contains_key(d) || state.swapped.values().any(|s| s.dest == d);
        if state.unsupported || in_use(dest) || in_use(staging) || !made_staging(staging) || !empty_dest(dest) {
            return not_here;
        }
        // Only a plain file's move (no directory trees swapped back and forth).
        if !std::fs::symlink_metadata(from).is_ok_and(|m| m.is_file()) {
            return not_here;
        }
        // A swap that fails changes nothing: the files are then moved one by one.
        if let Err(e) = swap(staging, dest) {
            tracing::debug!(error = %e, "the mirror's file system did not swap directories; moving files one by one");
            state.unsupported = true;
            return not_here;
        }
        // What was the destination is the staging directory now: it must be empty, and
        // everything swapped in must be a plain file with a file id's name, the one being
        // moved among them.
        let swapped_in = || -> std::io::Result<Option<Vec<OsString>>> {
            if std::fs::read_dir(staging)?.next().is_some() {
                return Ok(None);
            }
            let mut names = Vec::new();
            for entry in std::fs::read_dir(dest)? {
                let entry = entry?;
                if !entry.file_type()?.is_file() || file_id(&entry.file_name()).is_none() {
                    return Ok(None);
                }
                names.push(entry.file_name());
            }
            Ok(names.iter().any(|n| n == name).then_some(names))
        };
        // Otherwise undone, and the caller's rename does the move (or reports what is
        // wrong with the directories).
        let Ok(Some(names)) = swapped_in() else {
            if let Err(e) = swap(staging, dest) {
                let failed = format!(
                    "{} and {} are swapped and could not be swapped back: {e}",
                    staging.display(),
                    dest.display()
                );
                tracing::error!(error = %e, staging = %staging.display(), dest = %dest.display(), "a directory swap could not be undone");
                state.failed = Some(failed);
                return Err(e);
            }
            return not_here;
        };
        let mut ids: Vec<FileId> = names.iter().filter_map(|n| file_id(n)).collect();
        ids.sort_unstable();
        let mut swap = Swap { dest: dest.to_path_buf(), pending: vec![true; ids.len()], left: ids.len(), names: ids };
        swap.take(name);
        if swap.left > 0 {
            state.swapped.insert(staging.to_path_buf(), swap);
        }
        Ok((Moved::Done, names))
    }

    /// Puts back the pending files of every swap that `path` touches: `path` is either
    /// directory, anything below one, or a directory above one.
    pub(crate) fn settle_touching(&self, path: &Path) -> std::io::Result<()> {
        let mut state = self.lock();
        if state.swapped.is_empty() {
            return Ok(());
        }
        let touched: Vec<PathBuf> = state
            .swapped
            .iter()
            .filter(|(staging, swap)| {
                let near = |dir: &Path| dir.starts_with(path) || path.starts_with(dir);
                near(staging) || near(&swap.dest)
            })
            .map(|(staging, _)| staging.clone())
            .collect();
        for staging in touched {
            settle(&mut state, &staging)?;
        }
        Ok(())
    }

    /// Puts back every pending file (the backup is over). An error if any file could not
    /// be put back, now or when the phone looked earlier (reported once: the delegate's
    /// `Drop` calls this again after the backup has failed with it).
    pub(crate) fn settle_all(&self) -> std::io::Result<()> {
        let mut state = self.lock();
        let all: Vec<PathBuf> = state.swapped.keys().cloned().collect();
        for staging in all {
            settle(&mut state, &staging)?;
        }
        match state.failed.take() {
            Some(failed) => Err(std::io::Error::other(failed)),
            None => Ok(()),
        }
    }
}

/// A move that failed because its file is no longer at its source, but a file is at its
/// destination, was done before: the phone asks again for moves it did not hear were
/// done (a backup it resumes after the agent was killed between a rename, or a swap,
/// and its answer).
pub(crate) fn moved_before(from: &Path, to: &Path, error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::NotFound
        && std::fs::symlink_metadata(from).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        && std::fs::symlink_metadata(to).is_ok_and(|m| m.is_file())
}

/// Moves a swap's pending files back into its staging directory, never over a file. A
/// file that fails to move stays pending, with those not yet tried, for the next attempt,
/// and the failure is kept.
fn settle(state: &mut State, staging: &Path) -> std::io::Result<()> {
    let Some(swap) = state.swapped.get_mut(staging) else { return Ok(()) };
    for i in 0..swap.names.len() {
        if !swap.pending[i] {
            continue;
        }
        let name = file_name(&swap.names[i]);
        let (from, to) = (swap.dest.join(&name), staging.join(&name));
        if let Err(e) = put_back(&from, &to) {
            state.failed = Some(format!("{} could not be put back at {}: {e}", from.display(), to.display()));
            return Err(e);
        }
        swap.take(&name);
    }
    state.swapped.remove(staging);
    Ok(())
}

/// Exchanges two directories atomically.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn swap(a: &Path, b: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE).map_err(std::io::Error::from)
}

/// Renames a file, but never over another.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn put_back(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(std::io::Error::from)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn swap(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Never called: without swaps nothing is pending.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn put_back(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staging directory with `names` in it and an empty destination, as a first backup
    /// leaves them before its moves.
    fn staged(root: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
        let (staging, dest) = (root.join("T/Snapshot/ab"), root.join("T/ab"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        for n in names {
            std::fs::write(staging.join(id(n)), n.as_bytes()).unwrap();
        }
        (staging, dest)
    }

    /// A file id's name for a short label (its bytes in hex, zeros in front).
    fn id(label: &str) -> String {
        let hex: String = label.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{hex:0>40}")
    }

    /// The labels of what is in `dir` (names that are not file ids as they are).
    fn names(dir: &Path) -> Vec<String> {
        let label = |name: String| match file_id(OsStr::new(&name)) {
            Some(id) => String::from_utf8(id.iter().copied().filter(|b| *b != 0).collect()).unwrap(),
            None => name,
        };
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| label(e.unwrap().file_name().into_string().unwrap())).collect();
        v.sort();
        v
    }

    fn ino(p: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
    }

    fn try_move(ex: &Exchanges, from: &Path, to: &Path) -> Moved {
        ex.try_move(from, to, |_| true, |_| true).unwrap().0
    }

    #[test]
    fn file_ids_round_trip_and_nothing_else_is_one() {
        let name = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(file_name(&file_id(OsStr::new(name)).unwrap()), name);
        for other in ["0123456789ABCDEF0123456789abcdef01234567", "0123", "Manifest.db", &format!("{name}0")] {
            assert_eq!(file_id(OsStr::new(other)), None, "{other}");
        }
    }

    #[test]
    fn moving_every_staged_file_swaps_the_directories_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, dest) = staged(tmp.path(), &["a1", "a2", "a3"]);
        let staged_ino = ino(&staging);
        let ex = Exchanges::default();
        let (moved, names_in) = ex.try_move(&staging.join(id("a2")), &dest.join(id("a2")), |_| true, |_| true).unwrap();
        assert_eq!(moved, Moved::Done);
        assert_eq!(names_in.len(), 3);
        // The staging directory's inode is the destination now: one swap, not a rename a file.
        assert_eq!(ino(&dest), staged_ino);
        for n in ["a1", "a3"] {
            assert_eq!(try_move(&ex, &staging.join(id(n)), &dest.join(id(n))), Moved::Done);
        }
        assert!(ex.lock().swapped.is_empty());
        assert_eq!(names(&dest), ["a1", "a2", "a3"]);
        assert!(names(&staging).is_empty());
        assert_eq!(std::fs::read(dest.join(id("a3"))).unwrap(), b"a3");
    }

    #[test]
    fn files_not_moved_go_back_before_the_phone_looks_or_the_backup_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, dest) = staged(tmp.path(), &["a1", "a2", "a3"]);
        let ex = Exchanges::default();
        assert_eq!(try_move(&ex, &staging.join(id("a1")), &dest.join(id("a1"))), Moved::Done);
        // Untouched paths (a sibling, the backup's own files) settle nothing.
        ex.settle_touching(&tmp.path().join("T/Status.plist")).unwrap();
        ex.settle_touching(&tmp.path().join("T/cd/x")).unwrap();
        assert_eq!(names(&dest), ["a1", "a2", "a3"]);
        // A staged name the phone reads: the pending files are where it left them.
        ex.settle_touching(&staging.join(id("a2"))).unwrap();
        assert_eq!(names(&dest), ["a1"]);
        assert_eq!(names(&staging), ["a2", "a3"]);
        // Moved on its own from now on.
        assert_eq!(try_move(&ex, &staging.join(id("a2")), &dest.join(id("a2"))), Moved::NotHere);

        // The end of the backup, or the removal of the directory above: the same.
        for settle in [
            Box::new(|ex: &Exchanges, root: &Path| ex.settle_touching(&root.join("T/Snapshot")))
                as Box<dyn Fn(&Exchanges, &Path) -> std::io::Result<()>>,
            Box::new(|ex: &Exchanges, _: &Path| ex.settle_all()),
            Box::new(|ex: &Exchanges, root: &Path| ex.settle_touching(&root.join("T/ab/new"))),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let (staging, dest) = staged(tmp.path(), &["b1", "b2"]);
            assert_eq!(try_move(&ex, &staging.join(id("b2")), &dest.join(id("b2"))), Moved::Done);
            settle(&ex, tmp.path()).unwrap();
            assert_eq!(names(&dest), ["b2"]);
            assert_eq!(names(&staging), ["b1"]);
            assert!(ex.lock().swapped.is_empty());
        }
    }

    #[test]
    fn a_file_that_cannot_be_put_back_fails_the_backup_and_nothing_is_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, dest) = staged(tmp.path(), &["a1", "a2"]);
        let ex = Exchanges::default();
        assert_eq!(try_move(&ex, &staging.join(id("a1")), &dest.join(id("a1"))), Moved::Done);
        // Put where a2 goes back, behind the backup's back.
        std::fs::write(staging.join(id("a2")), b"other").unwrap();
        // Anything below either directory settles, however deep.
        let err = ex.settle_touching(&dest.join(id("a2")).join("deeper")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(staging.join(id("a2"))).unwrap(), b"other");
        assert_eq!(std::fs::read(dest.join(id("a2"))).unwrap(), b"a2");
        // Once the way is clear it goes back, but the backup still fails.
        std::fs::remove_file(staging.join(id("a2"))).unwrap();
        let err = ex.settle_all().unwrap_err().to_string();
        assert!(err.contains("could not be put back"), "{err}");
        assert_eq!(std::fs::read(staging.join(id("a2"))).unwrap(), b"a2");
        assert_eq!(names(&dest), ["a1"]);
    }

    #[test]
    fn a_move_asked_again_after_a_cut_short_backup_is_done_only_if_its_file_is_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, dest) = staged(tmp.path(), &["a1", "a2"]);
        let ex = Exchanges::default();
        assert_eq!(try_move(&ex, &staging.join(id("a1")), &dest.join(id("a1"))), Moved::Done);
        // The agent is killed here: a2 is in the destination, the phone thinks it staged.
        drop(ex);
        let again = |name: &str| {
            let (from, to) = (staging.join(id(name)), dest.join(id(name)));
            let err = std::fs::rename(&from, &to).unwrap_err();
            moved_before(&from, &to, &err)
        };
        assert!(again("a2"));
        assert_eq!(std::fs::read(dest.join(id("a2"))).unwrap(), b"a2");
        // Nowhere, or still at its source (another error): not done.
        assert!(!again("a3"));
        std::fs::write(staging.join(id("a4")), b"x").unwrap();
        std::fs::create_dir(dest.join(id("a4"))).unwrap();
        std::fs::write(dest.join(id("a4")).join("in"), b"x").unwrap();
        assert!(!again("a4"));
    }

    #[test]
    fn a_destination_that_is_not_empty_or_a_staging_directory_with_more_than_file_ids_is_not_swapped() {
        for (dir, file, in_dest) in
            [(None, None, Some("x9")), (Some("sub"), None, None), (None, Some("Manifest.db"), None)]
        {
            let tmp = tempfile::tempdir().unwrap();
            let (staging, dest) = staged(tmp.path(), &["a1", "a2"]);
            if let Some(d) = dir {
                std::fs::create_dir(staging.join(d)).unwrap();
            }
            if let Some(f) = file {
                std::fs::write(staging.join(f), b"db").unwrap();
            }
            // Put there behind the backup's back: the caller thinks it empty.
            if let Some(f) = in_dest {
                std::fs::write(dest.join(f), b"keep").unwrap();
            }
            let ex = Exchanges::default();
            assert_eq!(try_move(&ex, &staging.join(id("a1")), &dest.join(id("a1"))), Moved::NotHere);
            // Undone: both directories hold what they held.
            let mut want_staging = vec!["a1", "a2"];
            want_staging.extend(dir.or(file));
            want_staging.sort();
            assert_eq!(names(&staging), want_staging);
            assert_eq!(names(&dest), in_dest.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn only_a_move_between_two_made_directories_of_one_name_swaps() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, dest) = staged(tmp.path(), &["a1"]);
        let ex = Exchanges::default();
        // The caller says the destination has something in it, or the staging directory
        // was there before this backup.
        assert_eq!(
            ex.try_move(&staging.join(id("a1")), &dest.join(id("a1")), |_| true, |_| false).unwrap().0,
            Moved::NotHere
        );
        assert_eq!(
            ex.try_move(&staging.join(id("a1")), &dest.join(id("a1")), |_| false, |_| true).unwrap().0,
            Moved::NotHere
        );
        // Another name, or into a directory below.
        assert_eq!(try_move(&ex, &staging.join(id("a1")), &dest.join(id("b1"))), Moved::NotHere);
        assert_eq!(try_move(&ex, &staging.join(id("a1")), &staging.join("sub").join(id("a1"))), Moved::NotHere);
        // A file that is not there: not swapped (the caller's rename reports it).
        assert_eq!(try_move(&ex, &staging.join(id("zz")), &dest.join(id("zz"))), Moved::NotHere);
        assert_eq!(names(&staging), ["a1"]);
        assert!(names(&dest).is_empty());
    }
}
