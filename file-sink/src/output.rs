//! The output file and the checkpoint that says what it covers.
//!
//! The sink owns its position: the data file (and the dead-letter file) is
//! written and fsynced, and only then is the checkpoint "file length L covers
//! offsets O" replaced atomically. On start the file is cut back to L,
//! dropping any tail written after the last checkpoint (a torn line
//! included), and reading resumes at O. So a crash at any instant loses no
//! line and writes none twice.
//!
//! Writing ([`Output::write`]) and making durable ([`Syncer::commit`]) are
//! separate steps so that they can run on two threads: the next lines are
//! copied into the file while the disk flushes the previous ones. A sync
//! covers every write that returned before it started, so a checkpoint never
//! claims bytes the disk may not hold.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tidemark_common::archive::Fingerprint;
use tidemark_common::offset::{sync_dir, SinkCheckpoint};

use crate::lock::Lock;

/// The output file and its dead-letter file, for appending; see [`Syncer`]
/// for making what was appended durable.
pub struct Output {
    path: PathBuf,
    file: File,
    dead_letter_path: PathBuf,
    dead_letter: Option<File>,
    checkpoint_path: PathBuf,
    /// Held for the output's life: a second sink on the same file is
    /// refused instead of interleaving lines and cutting ours back.
    _lock: Lock,
    /// Bytes of the output file written so far, synced or not.
    file_len: u64,
    /// Bytes of the dead-letter file written so far, synced or not.
    dead_letter_len: u64,
    /// What is durably written, as found on open (or as advanced by
    /// [`Output::commit`]).
    pub checkpoint: SinkCheckpoint,
}

/// One batch of records, ready to append.
#[derive(Default)]
pub struct Batch {
    /// Lines for the output file, each ending in `\n`.
    pub lines: Vec<u8>,
    /// Lines for the dead-letter file.
    pub dead: Vec<u8>,
    /// `(topic, partition, next offset)` the batch reaches.
    pub reached: Vec<(String, i32, i64)>,
    /// Records in the batch that were written as lines.
    pub written: u64,
    /// Records sent to the dead-letter file.
    pub dead_count: u64,
    /// Tombstones skipped.
    pub skipped: u64,
    /// The last record of each partition in the batch.
    pub fingerprints: Vec<(String, i32, Fingerprint)>,
    /// `(topic, partitions)`: topics first taken, with the partitions each
    /// had then (see [`SinkCheckpoint::first_partitions`]). A batch may
    /// carry only these, so that the count is durable before any record of
    /// the topic is read.
    pub noted: Vec<(String, i32)>,
}

impl Batch {
    /// Records that everything before `next` in a partition is handled.
    pub fn reach(&mut self, topic: &str, partition: i32, next: i64) {
        reach(&mut self.reached, topic, partition, next);
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.reached.is_empty()
    }

    /// Records handled by the batch: lines, dead letters and tombstones.
    pub fn records(&self) -> u64 {
        self.written + self.dead_count + self.skipped
    }
}

fn reach(reached: &mut Vec<(String, i32, i64)>, topic: &str, partition: i32, next: i64) {
    match reached
        .iter_mut()
        .find(|(t, p, _)| t == topic && *p == partition)
    {
        Some(slot) => slot.2 = slot.2.max(next),
        None => reached.push((topic.to_owned(), partition, next)),
    }
}

/// What a checkpoint may claim once the bytes written so far are synced:
/// the lengths of both files and the offsets the written batches reach.
/// Points of consecutive batches merge into one, so one sync can cover many
/// batches.
#[derive(Debug, Clone, Default)]
pub struct CommitPoint {
    /// Length of the output file after the batches.
    pub file_len: u64,
    /// Length of the dead-letter file after the batches.
    pub dead_letter_len: u64,
    /// `(topic, partition, next offset)` the batches reach.
    pub reached: Vec<(String, i32, i64)>,
    /// Lines the batches wrote.
    pub written: u64,
    /// Dead letters the batches wrote.
    pub dead_count: u64,
    /// Tombstones the batches skipped.
    pub skipped: u64,
    /// The last record of each partition the batches read.
    pub fingerprints: Vec<(String, i32, Fingerprint)>,
    /// Topics first taken and their partitions then; the first note of a
    /// topic wins.
    pub noted: Vec<(String, i32)>,
}

impl CommitPoint {
    /// Folds a later point into this one.
    pub fn merge(&mut self, later: CommitPoint) {
        self.file_len = later.file_len;
        self.dead_letter_len = later.dead_letter_len;
        for (topic, partition, next) in &later.reached {
            reach(&mut self.reached, topic, *partition, *next);
        }
        self.written += later.written;
        self.dead_count += later.dead_count;
        self.skipped += later.skipped;
        for (t, p, fp) in later.fingerprints {
            self.fingerprints
                .retain(|(t2, p2, _)| !(*t2 == t && *p2 == p));
            self.fingerprints.push((t, p, fp));
        }
        for (t, n) in later.noted {
            if !self.noted.iter().any(|(t2, _)| *t2 == t) {
                self.noted.push((t, n));
            }
        }
    }
}

/// How long opening waits for another holder of the lock to let go: a
/// sink restarted while its predecessor still exits waits for it; a second
/// sink on the same file is refused after this.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Where the dead-letter file of `file` lives.
pub fn dead_letter_path(file: &Path) -> PathBuf {
    beside(file, ".dead-letter")
}

/// Where the lock file of `file` lives.
pub fn lock_path(file: &Path) -> PathBuf {
    beside(file, ".tidemark-lock")
}

/// `file` with `suffix` appended to its name.
fn beside(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    file.with_file_name(name)
}

impl Output {
    /// Takes the output's lock for connector `owner`, then opens the output,
    /// recovering from a crash: cuts the file back to what the checkpoint
    /// covers.
    ///
    /// Fails when another sink holds the lock (naming it), when the folder
    /// is missing or not writable, when the file holds lines no checkpoint
    /// accounts for, or when it is shorter than its checkpoint (it was
    /// truncated or replaced).
    pub fn open(path: &Path, owner: &str) -> anyhow::Result<Self> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            bail!(
                "the output folder {} does not exist: create it, or change `file` to a path in an existing folder",
                dir.display()
            );
        }
        // Before anything is read or cut: the holder may be writing. A
        // holder that is exiting (a restart) gets a moment to finish.
        let patience = std::time::Instant::now() + LOCK_PATIENCE;
        let lock = loop {
            match Lock::try_acquire(&lock_path(path), owner)? {
                Ok(lock) => break lock,
                Err(_) if std::time::Instant::now() < patience => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(holder) => bail!(
                    "the output file {} is being written by {holder}: two sinks on one file would mix their lines; stop that one, or give this one another `file`",
                    path.display()
                ),
            }
        };
        let checkpoint_path = SinkCheckpoint::path_for(path);
        let stored = SinkCheckpoint::load(&checkpoint_path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| {
                format!("cannot open the output file {} for writing", path.display())
            })?;
        let len = file.metadata()?.len();
        let dead_letter_path = dead_letter_path(path);
        let dead_len = std::fs::metadata(&dead_letter_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let checkpoint = match stored {
            Some(mut cp) => {
                cut_back(&file, path, len, cp.file_len)?;
                if dead_len > cp.dead_letter_len {
                    let dl = OpenOptions::new().write(true).open(&dead_letter_path)?;
                    cut_back(&dl, &dead_letter_path, dead_len, cp.dead_letter_len)?;
                } else if dead_len < cp.dead_letter_len {
                    // Rotated or removed by someone: count from what is
                    // there, or a crash's unsynced tail would never be cut.
                    tracing::warn!(
                        file = %dead_letter_path.display(),
                        was = cp.dead_letter_len,
                        now = dead_len,
                        "the dead-letter file is shorter than the checkpoint says; counting from its length"
                    );
                    cp.dead_letter_len = dead_len;
                    cp.save(&checkpoint_path)?;
                }
                cp
            }
            None if len > 0 => bail!(
                "the output file {} already holds {len} bytes but has no checkpoint {}, so Tidemark cannot tell which records it covers: move the file away (or delete it) and restart to write it anew",
                path.display(),
                checkpoint_path.display()
            ),
            None => {
                let cp = SinkCheckpoint {
                    version: 1,
                    file_len: 0,
                    dead_letter_len: dead_len,
                    ..Default::default()
                };
                cp.save(&checkpoint_path).with_context(|| {
                    format!("cannot write the checkpoint next to {}; is the folder writable?", path.display())
                })?;
                cp
            }
        };
        sync_dir(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            dead_letter_path,
            dead_letter: None,
            checkpoint_path,
            _lock: lock,
            file_len: checkpoint.file_len,
            dead_letter_len: checkpoint.dead_letter_len,
            checkpoint,
        })
    }

    /// Moves the file, its checkpoint and its dead-letter file aside as
    /// `<file>.before-reset-<time>` (and `.tidemark-checkpoint`,
    /// `.dead-letter` after that), unchanged, holding the lock meanwhile;
    /// returns the new name of the file. The checkpoint goes first, so a
    /// crash halfway leaves a file without a checkpoint, which the next
    /// start refuses to touch.
    ///
    /// Fails when a rename fails.
    pub fn set_aside(self) -> anyhow::Result<PathBuf> {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace(':', "");
        let mut aside = beside(&self.path, &format!(".before-reset-{stamp}"));
        let mut n = 1;
        while aside.exists()
            || SinkCheckpoint::path_for(&aside).exists()
            || dead_letter_path(&aside).exists()
        {
            n += 1;
            aside = beside(&self.path, &format!(".before-reset-{stamp}-{n}"));
        }
        let moves = [
            (
                self.checkpoint_path.clone(),
                SinkCheckpoint::path_for(&aside),
            ),
            (self.path.clone(), aside.clone()),
            (self.dead_letter_path.clone(), dead_letter_path(&aside)),
        ];
        for (from, to) in moves {
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot move {} aside to {}", from.display(), to.display())
                    })
                }
            }
        }
        sync_dir(&self.path)?;
        Ok(aside)
    }

    /// The syncer for this output, starting from its checkpoint.
    ///
    /// Fails when the file handle cannot be duplicated (out of descriptors).
    pub fn syncer(&self) -> anyhow::Result<Syncer> {
        Ok(Syncer {
            path: self.path.clone(),
            file: self
                .file
                .try_clone()
                .with_context(|| format!("cannot reopen {}", self.path.display()))?,
            dead_letter_path: self.dead_letter_path.clone(),
            dead_letter: None,
            checkpoint_path: self.checkpoint_path.clone(),
            checkpoint: self.checkpoint.clone(),
        })
    }

    /// Appends a batch's lines and dead letters, without syncing them, and
    /// returns the point a checkpoint may claim once they are synced.
    ///
    /// Fails on any write error (a full disk, a revoked permission); what was
    /// appended is then past every checkpoint and is cut off on restart.
    pub fn write(&mut self, batch: Batch) -> anyhow::Result<CommitPoint> {
        if !batch.lines.is_empty() {
            self.file.write_all(&batch.lines).with_context(|| {
                format!("cannot write to the output file {}", self.path.display())
            })?;
            self.file_len += batch.lines.len() as u64;
        }
        if !batch.dead.is_empty() {
            if self.dead_letter.is_none() {
                self.dead_letter = Some(open_dead_letter(&self.dead_letter_path, true)?);
                sync_dir(&self.dead_letter_path)?;
            }
            let f = self.dead_letter.as_mut().expect("opened above");
            f.write_all(&batch.dead).with_context(|| {
                format!(
                    "cannot write to the dead-letter file {}",
                    self.dead_letter_path.display()
                )
            })?;
            self.dead_letter_len += batch.dead.len() as u64;
        }
        Ok(CommitPoint {
            file_len: self.file_len,
            dead_letter_len: self.dead_letter_len,
            reached: batch.reached,
            written: batch.written,
            dead_count: batch.dead_count,
            skipped: batch.skipped,
            fingerprints: batch.fingerprints,
            noted: batch.noted,
        })
    }

    /// Writes a batch, fsyncs it, then saves the checkpoint, all on the
    /// calling thread. When this returns `Ok` the batch survives a crash;
    /// when it fails, the checkpoint is unchanged, so the batch is written
    /// again after a restart.
    ///
    /// Fails on any write or sync error (a full disk, a revoked permission).
    pub fn commit(&mut self, batch: Batch) -> anyhow::Result<()> {
        let mut syncer = self.syncer()?;
        let point = self.write(batch)?;
        syncer.commit(&point)?;
        self.checkpoint = syncer.checkpoint;
        Ok(())
    }
}

/// Makes what an [`Output`] wrote durable and saves the checkpoint; it may
/// run on another thread than the writes.
pub struct Syncer {
    path: PathBuf,
    file: File,
    dead_letter_path: PathBuf,
    dead_letter: Option<File>,
    checkpoint_path: PathBuf,
    /// What is durably written.
    pub checkpoint: SinkCheckpoint,
}

impl Syncer {
    /// Fsyncs both files, then saves the checkpoint for `point`. Every write
    /// that returned before this call is covered by the fsync. When this
    /// returns `Ok` the point survives a crash; when it fails, the checkpoint
    /// is unchanged.
    ///
    /// Fails on any sync or write error (a full disk, a revoked permission).
    pub fn commit(&mut self, point: &CommitPoint) -> anyhow::Result<()> {
        if point.file_len > self.checkpoint.file_len {
            self.file.sync_data().with_context(|| {
                format!("cannot write to the output file {}", self.path.display())
            })?;
        }
        if point.dead_letter_len > self.checkpoint.dead_letter_len {
            if self.dead_letter.is_none() {
                // The writer created the file and synced its folder.
                self.dead_letter = Some(open_dead_letter(&self.dead_letter_path, false)?);
            }
            let f = self.dead_letter.as_ref().expect("opened above");
            f.sync_data().with_context(|| {
                format!(
                    "cannot write to the dead-letter file {}",
                    self.dead_letter_path.display()
                )
            })?;
        }
        let mut next = self.checkpoint.clone();
        next.file_len = point.file_len;
        next.dead_letter_len = point.dead_letter_len;
        for (topic, partition, offset) in &point.reached {
            next.advance(topic, *partition, *offset);
        }
        for (topic, partition, fp) in &point.fingerprints {
            next.fingerprints
                .entry(topic.clone())
                .or_default()
                .insert(*partition, fp.clone());
        }
        // The count a topic was first taken with is kept for good: a later
        // note (the same topic taken again) never replaces it.
        for (topic, partitions) in &point.noted {
            next.first_partitions
                .entry(topic.clone())
                .or_insert(*partitions);
        }
        next.save(&self.checkpoint_path)?;
        self.checkpoint = next;
        Ok(())
    }
}

fn cut_back(file: &File, path: &Path, len: u64, covered: u64) -> anyhow::Result<()> {
    if len < covered {
        bail!(
            "the file {} holds {len} bytes but its checkpoint covers {covered}: it was truncated or replaced; restore it, or move it and its .tidemark-checkpoint away to write it anew",
            path.display()
        );
    }
    if len > covered {
        tracing::warn!(
            file = %path.display(),
            bytes = len - covered,
            "dropping the tail written after the last checkpoint; those records are read again"
        );
        file.set_len(covered)
            .and_then(|_| file.sync_all())
            .with_context(|| format!("cannot cut {} back to its checkpoint", path.display()))?;
    }
    Ok(())
}

/// Opens the dead-letter file for appending, creating it if `create`.
fn open_dead_letter(path: &Path, create: bool) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(create)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the dead-letter file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: &str, topic: &str, next: i64) -> Batch {
        let mut b = Batch {
            lines: lines.as_bytes().to_vec(),
            ..Default::default()
        };
        b.reach(topic, 0, next);
        b
    }

    #[test]
    fn a_torn_tail_is_cut_back_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path, "test").unwrap();
        out.commit(batch("{\"a\":1}\n", "t", 1)).unwrap();
        drop(out);
        // A crash after writing half a line, before the checkpoint.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"a\":2").unwrap();
        drop(f);
        let out = Output::open(&path, "test").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        assert_eq!(out.checkpoint.next_offset("t", 0), Some(1));
    }

    #[test]
    fn a_crash_between_fsync_and_rename_keeps_the_old_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path, "test").unwrap();
        out.commit(batch("{\"a\":1}\n", "t", 1)).unwrap();
        drop(out);
        // The second batch reached the file and a temp checkpoint, not the rename.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"a\":2}\n").unwrap();
        let cp_path = SinkCheckpoint::path_for(&path);
        std::fs::write(
            cp_path.with_extension("tmp"),
            b"{\"version\":1,\"file_len\":16,\"offsets\":{\"t\":{\"0\":2}}}",
        )
        .unwrap();
        let out = Output::open(&path, "test").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        assert_eq!(out.checkpoint.next_offset("t", 0), Some(1));
    }

    #[test]
    fn a_missing_folder_and_an_unknown_file_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Output::open(&dir.path().join("nope/out.txt"), "test")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let path = dir.path().join("old.txt");
        std::fs::write(&path, "something\n").unwrap();
        let err = Output::open(&path, "test").err().unwrap().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
    }

    #[test]
    fn a_second_output_on_the_same_file_is_refused_and_cuts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path, "first").unwrap();
        out.commit(batch("{\"a\":1}\n", "t", 1)).unwrap();
        // Written but not yet checkpointed: a second sink's recovery would
        // cut this off under the first one.
        out.file.write_all(b"{\"a\":2}\n").unwrap();
        let err = format!("{:#}", Output::open(&path, "second").err().unwrap());
        assert!(err.contains("being written by file-sink `first`"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        drop(out);
        Output::open(&path, "second").unwrap();
    }

    #[test]
    fn a_topics_first_partition_count_is_kept_across_commits_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path, "test").unwrap();
        // A note alone, before any record of the topic: durable at once.
        out.commit(Batch {
            noted: vec![("t".into(), 1)],
            ..Default::default()
        })
        .unwrap();
        let stored = SinkCheckpoint::load(&SinkCheckpoint::path_for(&path))
            .unwrap()
            .unwrap();
        assert_eq!(stored.first_partitions("t"), Some(1));
        assert_eq!(stored.file_len, 0);
        out.commit(batch("{\"a\":1}\n", "t", 1)).unwrap();
        // Taken again later with more partitions: the first count stays.
        let mut b = batch("{\"a\":2}\n", "t", 2);
        b.noted = vec![("t".into(), 3), ("u".into(), 2)];
        out.commit(b).unwrap();
        drop(out);
        let out = Output::open(&path, "test").unwrap();
        assert_eq!(out.checkpoint.first_partitions("t"), Some(1));
        assert_eq!(out.checkpoint.first_partitions("u"), Some(2));
        assert_eq!(out.checkpoint.next_offset("t", 0), Some(2));
        // Merged points keep the first note of each topic too.
        let mut point = CommitPoint {
            noted: vec![("v".into(), 4)],
            ..Default::default()
        };
        point.merge(CommitPoint {
            noted: vec![("v".into(), 6), ("w".into(), 1)],
            ..Default::default()
        });
        assert_eq!(point.noted, vec![("v".into(), 4), ("w".into(), 1)]);
    }

    #[test]
    fn a_shortened_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path, "test").unwrap();
        out.commit(batch("{\"a\":1}\n", "t", 1)).unwrap();
        drop(out);
        std::fs::write(&path, "").unwrap();
        let err = Output::open(&path, "test").err().unwrap().to_string();
        assert!(err.contains("truncated or replaced"), "{err}");
    }
}
