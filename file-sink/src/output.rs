//! The output file and the checkpoint that says what it covers.
//!
//! The sink owns its position: after each batch the data file (and the
//! dead-letter file) is written and fsynced, and only then is the checkpoint
//! "file length L covers offsets O" replaced atomically. On start the file is
//! cut back to L, dropping any tail written after the last checkpoint (a torn
//! line included), and reading resumes at O. So a crash at any instant loses
//! no line and writes none twice.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tidemark_common::offset::{sync_dir, SinkCheckpoint};

/// The output file, its dead-letter file and its checkpoint.
pub struct Output {
    path: PathBuf,
    file: File,
    dead_letter_path: PathBuf,
    dead_letter: Option<File>,
    checkpoint_path: PathBuf,
    /// What is durably written.
    pub checkpoint: SinkCheckpoint,
}

/// One batch to make durable.
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
}

impl Batch {
    /// Records that everything before `next` in a partition is handled.
    pub fn reach(&mut self, topic: &str, partition: i32, next: i64) {
        match self
            .reached
            .iter_mut()
            .find(|(t, p, _)| t == topic && *p == partition)
        {
            Some(slot) => slot.2 = slot.2.max(next),
            None => self.reached.push((topic.to_owned(), partition, next)),
        }
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.reached.is_empty()
    }
}

/// Where the dead-letter file of `file` lives.
pub fn dead_letter_path(file: &Path) -> PathBuf {
    let mut name = file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".dead-letter");
    file.with_file_name(name)
}

impl Output {
    /// Opens the output, recovering from a crash: cuts the file back to what
    /// the checkpoint covers.
    ///
    /// Fails when the folder is missing or not writable, when the file holds
    /// lines no checkpoint accounts for, or when it is shorter than its
    /// checkpoint (it was truncated or replaced).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
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
            Some(cp) => {
                cut_back(&file, path, len, cp.file_len)?;
                if dead_len > cp.dead_letter_len {
                    let dl = OpenOptions::new().write(true).open(&dead_letter_path)?;
                    cut_back(&dl, &dead_letter_path, dead_len, cp.dead_letter_len)?;
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
            checkpoint,
        })
    }

    /// Writes a batch, fsyncs it, then saves the checkpoint. When this
    /// returns `Ok` the batch survives a crash; when it fails, the checkpoint
    /// is unchanged, so the batch is written again after a restart.
    ///
    /// Fails on any write or sync error (a full disk, a revoked permission).
    pub fn commit(&mut self, batch: &Batch) -> anyhow::Result<()> {
        if !batch.lines.is_empty() {
            self.file
                .write_all(&batch.lines)
                .and_then(|_| self.file.sync_data())
                .with_context(|| {
                    format!("cannot write to the output file {}", self.path.display())
                })?;
        }
        if !batch.dead.is_empty() {
            if self.dead_letter.is_none() {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.dead_letter_path)
                    .with_context(|| {
                        format!(
                            "cannot open the dead-letter file {}",
                            self.dead_letter_path.display()
                        )
                    })?;
                sync_dir(&self.dead_letter_path)?;
                self.dead_letter = Some(f);
            }
            let f = self.dead_letter.as_mut().expect("opened above");
            f.write_all(&batch.dead)
                .and_then(|_| f.sync_data())
                .with_context(|| {
                    format!(
                        "cannot write to the dead-letter file {}",
                        self.dead_letter_path.display()
                    )
                })?;
        }
        let mut next = self.checkpoint.clone();
        next.file_len += batch.lines.len() as u64;
        next.dead_letter_len += batch.dead.len() as u64;
        for (topic, partition, offset) in &batch.reached {
            next.advance(topic, *partition, *offset);
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
        let mut out = Output::open(&path).unwrap();
        out.commit(&batch("{\"a\":1}\n", "t", 1)).unwrap();
        drop(out);
        // A crash after writing half a line, before the checkpoint.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"a\":2").unwrap();
        drop(f);
        let out = Output::open(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        assert_eq!(out.checkpoint.next_offset("t", 0), Some(1));
    }

    #[test]
    fn a_crash_between_fsync_and_rename_keeps_the_old_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path).unwrap();
        out.commit(&batch("{\"a\":1}\n", "t", 1)).unwrap();
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
        let out = Output::open(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        assert_eq!(out.checkpoint.next_offset("t", 0), Some(1));
    }

    #[test]
    fn a_missing_folder_and_an_unknown_file_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Output::open(&dir.path().join("nope/out.txt"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let path = dir.path().join("old.txt");
        std::fs::write(&path, "something\n").unwrap();
        let err = Output::open(&path).err().unwrap().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
    }

    #[test]
    fn a_shortened_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let mut out = Output::open(&path).unwrap();
        out.commit(&batch("{\"a\":1}\n", "t", 1)).unwrap();
        drop(out);
        std::fs::write(&path, "").unwrap();
        let err = Output::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated or replaced"), "{err}");
    }
}
