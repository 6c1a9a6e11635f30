//! Exclusive ownership of an output: an advisory lock (`flock`) on a lock
//! file beside it, held for as long as the owner writes.
//!
//! Two file-sinks writing one file (or one partition of an archive) would
//! interleave their lines and cut each other's tails off on restart, so the
//! second is refused. The kernel releases the lock when its holder exits,
//! killed or not, so a crash never leaves a stale lock behind. The lock file
//! holds a line saying who holds it (connector, pid, host, since when), for
//! the error the next one gets; the lock itself, not that line, is what
//! counts.
//!
//! A lock file is never deleted or renamed while in use: a holder and a
//! newcomer that opened two different files of the same name would both
//! believe they hold it. [`Lock::try_acquire`] checks after locking that
//! the path still names the file it locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Takes the lock at `path` (creating the file) for `owner` (the
    /// connector name), or returns who holds it.
    ///
    /// Fails when the lock file cannot be created or written (no such
    /// folder, no permission).
    pub fn try_acquire(path: &Path, owner: &str) -> anyhow::Result<Result<Lock, String>> {
        loop {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open the lock file {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Ok(Err(describe_holder(text.trim())));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
            // The file may have been replaced between open and lock (a
            // folder set aside by a reset): then the lock guards nothing.
            let locked = file.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => {}
                _ => continue,
            }
            let holder = serde_json::json!({
                "connector": owner,
                "pid": std::process::id(),
                "host": hostname(),
                "since": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            });
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| writeln!(file, "{holder}"))
                .with_context(|| format!("cannot write the lock file {}", path.display()))?;
            return Ok(Ok(Lock {
                file,
                path: path.to_path_buf(),
            }));
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock file at the path is still the one this lock holds
    /// (a reset may have moved the folder it is in).
    pub fn still_at_path(&self) -> bool {
        match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }
}

/// Who holds a lock, from the line its holder wrote.
fn describe_holder(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return "another file-sink (it did not say which)".to_owned();
    };
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "file-sink `{}` (pid {} on host {}, since {})",
        s("connector"),
        v["pid"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        s("host"),
        s("since")
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.lock");
        let first = Lock::try_acquire(&path, "one").unwrap().unwrap();
        let who = Lock::try_acquire(&path, "two").unwrap().unwrap_err();
        assert!(who.contains("file-sink `one`"), "{who}");
        assert!(
            who.contains(&format!("pid {}", std::process::id())),
            "{who}"
        );
        drop(first);
        let again = Lock::try_acquire(&path, "two").unwrap().unwrap();
        assert!(again.still_at_path());
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        assert!(!again.still_at_path());
    }
}
