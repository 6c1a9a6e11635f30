//! `file-sink --check`: everything that would stop or weaken a run, looked
//! at without changing anything (no file, folder or checkpoint is created,
//! no offset committed): the output's folder, the file and its checkpoint
//! (or each partition's checkpoint of a segmented archive), whether a sink
//! writes it now, Kafka, each topic, and for each partition whether the
//! records after the checkpoint are still in Kafka and the topic is the one
//! the checkpoint was taken from.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use tidemark_common::archive::{partition_dir, Fingerprint, PartitionCheckpoint, LOCK};
use tidemark_common::check::{dir_writable, Report};
use tidemark_common::offset::SinkCheckpoint;

use crate::identity::{self, Verdict};
use crate::output::lock_path;
use crate::Config;

/// Where each partition's reading would start.
enum Starts {
    /// A single file's checkpoint, and the file.
    File(SinkCheckpoint, PathBuf),
    /// A segmented archive's folder.
    Archive(PathBuf),
    /// Nothing stored: every partition from its beginning.
    Fresh,
}

impl Starts {
    fn of(&self, topic: &str, partition: i32) -> (Option<i64>, Option<Fingerprint>) {
        match self {
            Starts::File(cp, _) => (
                cp.next_offset(topic, partition),
                cp.fingerprint(topic, partition).cloned(),
            ),
            Starts::Archive(root) => {
                match PartitionCheckpoint::load(&partition_dir(root, topic, partition)) {
                    // As a run takes it: a partition that never got a
                    // record starts from its beginning.
                    Ok(Some(cp)) if cp.next_offset == 0 && cp.fingerprint.is_none() => (None, None),
                    Ok(Some(cp)) => (Some(cp.next_offset), cp.fingerprint),
                    _ => (None, None),
                }
            }
            Starts::Fresh => (None, None),
        }
    }
}

/// Runs every check of `cfg` and returns the findings.
pub async fn check(cfg: &Config) -> Report {
    let mut r = Report::new();
    r.ok(format!(
        "configuration: connector {}, topics {}, {} {}",
        cfg.name,
        cfg.topics.join(", "),
        if cfg.segments.is_some() {
            "segmented archive in"
        } else {
            "file"
        },
        cfg.file.display()
    ));
    let starts = match &cfg.segments {
        None => single_file(&cfg.file, &mut r),
        Some(seg) => archive(&seg.root, &mut r),
    };
    let kafka = cfg.kafka.clone();
    let topics = cfg.topics.clone();
    let findings = tokio::task::spawn_blocking(move || {
        let mut r = Report::new();
        topics_and_partitions(&kafka, &topics, starts.as_ref(), &mut r);
        r
    })
    .await;
    match findings {
        Ok(more) => r.findings.extend(more.findings),
        Err(e) => r.fail(format!("checking Kafka: {e}"), ""),
    }
    r
}

/// The folder, the file, its checkpoint and its lock.
fn single_file(file: &Path, r: &mut Report) -> Option<Starts> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        r.fail(
            format!("the output folder {} does not exist", dir.display()),
            "create it, or change `file` to a path in an existing folder",
        );
        return None;
    }
    if !dir_writable(&dir) {
        r.fail(
            format!(
                "the output folder {} is not writable by this user",
                dir.display()
            ),
            "give this user write permission on it, or change `file`",
        );
        return None;
    }
    r.ok(format!(
        "output folder {} exists and is writable",
        dir.display()
    ));
    held(
        &lock_path(file),
        &format!("the output file {}", file.display()),
        r,
    );
    let len = match std::fs::metadata(file) {
        Ok(m) if m.is_file() => Some(m.len()),
        Ok(_) => {
            r.fail(
                format!("{} is not a regular file", file.display()),
                "point `file` at a file (a folder is a segmented archive: set file.rotate.bytes)",
            );
            return None;
        }
        Err(_) => None,
    };
    let cp_path = SinkCheckpoint::path_for(file);
    let cp = match SinkCheckpoint::load(&cp_path) {
        Ok(cp) => cp,
        Err(e) => {
            r.error(&format!("checkpoint {}", cp_path.display()), &e);
            return None;
        }
    };
    match (len, cp) {
        (None | Some(0), None) => {
            r.ok(format!(
                "no file and no checkpoint yet: the first start writes {} from the topics' beginning",
                file.display()
            ));
            Some(Starts::Fresh)
        }
        (Some(len), None) => {
            r.fail(
                format!("{} holds {len} bytes but has no checkpoint {}, so no one can tell which records it covers", file.display(), cp_path.display()),
                "move the file away (or delete it) to write it anew",
            );
            None
        }
        (len, Some(cp)) => {
            let len = len.unwrap_or(0);
            if len < cp.file_len {
                r.fail(
                    format!("{} has {len} bytes, fewer than the {} its checkpoint covers: it was truncated or replaced", file.display(), cp.file_len),
                    format!("put the original file back, or move both the file and {} away to start anew", cp_path.display()),
                );
                return None;
            }
            let extra = len - cp.file_len;
            r.ok(format!(
                "{}: {len} bytes, checkpoint covers {}{}",
                file.display(),
                cp.file_len,
                if extra > 0 {
                    format!("; a start cuts back the {extra} bytes after it (written before a crash, read again)")
                } else {
                    String::new()
                }
            ));
            Some(Starts::File(cp, file.to_path_buf()))
        }
    }
}

/// A segmented archive's folder and lock.
fn archive(root: &Path, r: &mut Report) -> Option<Starts> {
    if root.is_file() {
        r.fail(
            format!("`file` {} is a single output file, but rotation or compression writes a segmented archive, which is a folder", root.display()),
            "point `file` at a new folder, or remove the file.rotate.* and file.compression keys",
        );
        return None;
    }
    if root.is_dir() {
        if !dir_writable(root) {
            r.fail(
                format!(
                    "the archive folder {} is not writable by this user",
                    root.display()
                ),
                "give this user write permission on it",
            );
            return None;
        }
        r.ok(format!(
            "archive folder {} exists and is writable",
            root.display()
        ));
        return Some(Starts::Archive(root.to_path_buf()));
    }
    let parent = match root.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() || !dir_writable(&parent) {
        r.fail(
            format!(
                "the folder {} for the archive {} does not exist or is not writable",
                parent.display(),
                root.display()
            ),
            "create it (writable by this user), or change `file`",
        );
        return None;
    }
    r.ok(format!(
        "archive folder {} does not exist yet: the first start creates it",
        root.display()
    ));
    Some(Starts::Fresh)
}

/// Whether a running sink holds the lock at `path`: a shared lock taken
/// and dropped at once, on the lock file if there is one.
fn held(path: &Path, what: &str, r: &mut Report) {
    let Ok(file) = File::open(path) else {
        return;
    };
    if let Err(TryLockError::WouldBlock) = file.try_lock_shared() {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        r.warn(
            format!(
                "{what} is being written now by {}: a second sink on it is refused",
                holder.trim()
            ),
            "stop that sink first, or give this one another `file`",
        );
    }
}

/// Kafka, each topic, and each partition's start.
fn topics_and_partitions(
    kafka: &tidemark_common::kafka::KafkaSettings,
    topics: &[String],
    starts: Option<&Starts>,
    r: &mut Report,
) {
    let Some((consumer, metadata)) = tidemark_common::check::kafka_metadata(kafka, r) else {
        return;
    };
    for topic in topics {
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            r.warn(
                format!("topic {topic} does not exist: file-sink waits for it"),
                "start pg-source first, or fix `topics`",
            );
            continue;
        };
        if t.error()
            == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
        {
            r.fail(
                format!("not allowed to read topic {topic}"),
                "grant this user READ and DESCRIBE on it, and READ on group connect-<name>",
            );
            continue;
        }
        let mut lag = 0i64;
        let mut problems = 0;
        for p in t.partitions() {
            let id = p.id();
            let (low, high) = match consumer.fetch_watermarks(topic, id, Duration::from_secs(10)) {
                Ok(w) => w,
                Err(e) => {
                    r.fail(format!("topic {topic} partition {id}: {e}"), "");
                    problems += 1;
                    continue;
                }
            };
            let (next, fp) = starts.map(|s| s.of(topic, id)).unwrap_or((None, None));
            if let Some(fp) = &fp {
                match identity::check(kafka, topic, id, fp) {
                    Ok(Verdict::Recreated(why)) => {
                        r.warn(
                            format!("topic {topic} was deleted and created again since the checkpoint ({why})"),
                            "nothing to do: a start keeps the old file and checkpoint under a name that says so and writes a new one; check that this is what happened",
                        );
                        problems += 1;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        r.error(&format!("topic {topic} partition {id}"), &e);
                        problems += 1;
                        continue;
                    }
                }
            }
            let from = next.unwrap_or(0);
            match next {
                Some(n) if n < low => {
                    r.fail(
                        format!("topic {topic} partition {id}: records from offset {n} to {low} were deleted by Kafka (retention) before the archive held them"),
                        "the archive cannot be complete: raise the topic's retention.ms, then start a new archive (move this one and its checkpoint away)",
                    );
                    problems += 1;
                }
                None if low > 0 => match starts.and_then(|s| match s {
                    Starts::Archive(root) => crate::group::added_partition_cut(
                        root,
                        topic,
                        id,
                        crate::segments::topic_file(root, topic).map(|t| t.first()),
                        low,
                    ),
                    Starts::File(cp, file) => crate::added_partition_cut(
                        file,
                        topic,
                        id,
                        cp.first_partitions(topic),
                        low,
                    ),
                    Starts::Fresh => None,
                }) {
                    Some((why, fix)) => {
                        r.fail(why, fix);
                        problems += 1;
                    }
                    None => r.warn(
                    format!("topic {topic} partition {id}: Kafka already deleted its records before offset {low}; a new archive starts there"),
                    "raise the topic's retention.ms (or make it compacted) so an archive can start from the first change",
                    ),
                },
                _ => {}
            }
            if let Some(Starts::Archive(root)) = starts {
                held(
                    &partition_dir(root, topic, id).join(LOCK),
                    &format!("partition {id} of {topic} in the archive"),
                    r,
                );
            }
            lag += (high - from.max(low)).max(0);
        }
        if problems == 0 {
            r.ok(format!(
                "topic {topic}: {} partition(s), {lag} record(s) to write",
                t.partitions().len()
            ));
        }
    }
}
