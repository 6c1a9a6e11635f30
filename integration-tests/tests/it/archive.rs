//! The segmented archive: rotation by size and time, compression, the
//! manifest and its completeness mark, several file-sink instances sharing
//! a topic, retention, and a topic recreated under a checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tidemark_common::archive::{Archive, ReadOptions};
use tidemark_common::config::ConnectorConfig;
use tidemark_common::kafka::{ensure_topic, TopicSpec};

use crate::support::*;

/// A topic of `partitions` partitions of the test's own.
pub async fn topic(partitions: i32) -> String {
    tidemark_common::telemetry::init_for_tests();
    let topic = unique("t.archive.");
    ensure_topic(
        &kafka().admin().unwrap(),
        &topic,
        &TopicSpec {
            partitions,
            replication_factor: -1,
            configs: Vec::new(),
        },
    )
    .await
    .unwrap();
    topic
}

/// One change event in envelope v2's shape: event `order` of unit `co`
/// (its events `1..=n`), committed at `ms` (ms since the epoch).
pub fn event_at(co: i64, order: i64, n: i64, key: i64, snapshot: &str, ms: i64) -> String {
    let count = if order == n {
        n.to_string()
    } else {
        "null".to_owned()
    };
    format!(
        r#"{{"before":null,"after":{{"id":{key},"co":{co},"o":{order}}},"source":{{"version":"test","connector":"tidemark","name":"t","ts_ms":{ms},"ts_us":{us},"snapshot":"{snapshot}","db":"d","sequence":null,"schema":"public","table":"t","txId":null,"lsn":null,"xmin":null}},"transaction":{{"id":"{co}","total_order":{order},"data_collection_order":{order},"commit_order":{co},"event_count":{count}}},"op":"c","ts_ms":{ms}}}"#,
        us = ms * 1000,
    )
}

/// Produces units `units` (each of `per_unit` events, keys spread over the
/// partitions) in commit order, as one producer does; returns the lines.
pub async fn produce_units(
    producer: &FutureProducer,
    topic: &str,
    units: std::ops::Range<i64>,
    per_unit: i64,
    snapshot: impl Fn(i64, i64) -> &'static str,
) -> Vec<String> {
    produce_units_at(producer, topic, units, per_unit, snapshot, |co| {
        1_700_000_000_000 + co * 1000
    })
    .await
}

/// Like [`produce_units`], unit `co` committed at `at(co)` ms.
pub async fn produce_units_at(
    producer: &FutureProducer,
    topic: &str,
    units: std::ops::Range<i64>,
    per_unit: i64,
    snapshot: impl Fn(i64, i64) -> &'static str,
    at: impl Fn(i64) -> i64,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut pending = Vec::new();
    for co in units {
        for order in 1..=per_unit {
            let key = co * per_unit + order;
            let line = event_at(co, order, per_unit, key, snapshot(co, order), at(co));
            let k = format!("{{\"id\":{key}}}");
            let delivery = producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(k.as_bytes())
                        .payload(line.as_bytes()),
                )
                .map_err(|(e, _)| e)
                .unwrap();
            pending.push(delivery);
            lines.push(line);
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    lines
}

/// An idempotent producer, so each partition keeps the order sent.
pub fn producer() -> FutureProducer {
    kafka()
        .client_config(&[("enable.idempotence", "true"), ("linger.ms", "5")])
        .create()
        .unwrap()
}

/// A sink config for `topic` writing the archive `dir` with `keys`.
pub fn archive_sink(
    name: &str,
    topic: &str,
    dir: &Path,
    keys: &[(&str, &str)],
) -> file_sink::Config {
    let mut config = serde_json::Map::new();
    config.insert("topics".into(), topic.into());
    config.insert("file".into(), dir.display().to_string().into());
    for (k, v) in keys {
        config.insert((*k).into(), (*v).into());
    }
    let c = ConnectorConfig::from_json(
        &serde_json::json!({"name": name, "config": config}).to_string(),
    )
    .unwrap();
    file_sink::Config::from_connector(&c, kafka()).unwrap().0
}

/// Every record line of the archive at `dir`, read back in commit order,
/// after checking every sealed segment against the manifest.
pub fn archive_lines(dir: &Path) -> Vec<String> {
    let archive = Archive::open(dir).unwrap();
    if let Archive::Segmented { partitions, .. } = &archive {
        for p in partitions {
            p.verify()
                .unwrap_or_else(|e| panic!("the manifest disagrees with the segments: {e}"));
        }
    }
    archive
        .records(&ReadOptions::default())
        .map(|r| r.unwrap().line)
        .collect()
}

/// Waits until the archive holds `n` records, and returns them.
pub async fn wait_for_archive(dir: &Path, n: usize, timeout: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let lines = if dir.join("tidemark-archive.json").exists() {
            let d = dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(|| archive_lines(&d)).unwrap_or_default()
            })
            .await
            .unwrap()
        } else {
            Vec::new()
        };
        if lines.len() >= n {
            return lines;
        }
        assert!(
            start.elapsed() < timeout,
            "waited {timeout:?} for {n} records in {}, found {}",
            dir.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every line once, and in commit order (commit_order, then total_order).
pub fn assert_exactly_once_in_order(got: &[String], want: &[String]) {
    let mut counts: BTreeMap<&str, i32> = BTreeMap::new();
    for l in got {
        *counts.entry(l.as_str()).or_default() += 1;
    }
    let twice = counts.values().filter(|n| **n > 1).count();
    let missing = want
        .iter()
        .filter(|l| !counts.contains_key(l.as_str()))
        .count();
    let unexpected = got.len() as i64 - (want.len() - missing) as i64 - twice as i64;
    assert_eq!(
        (missing, twice, unexpected),
        (0, 0, 0),
        "lost, duplicated, unexpected"
    );
    let order: Vec<(i64, i64)> = got
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["transaction"]["commit_order"].as_i64().unwrap(),
                v["transaction"]["total_order"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "not in commit order");
}

fn files(dir: &Path, ending: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(dir).unwrap().flatten() {
        if !t.path().is_dir() {
            continue;
        }
        for p in std::fs::read_dir(t.path()).unwrap().flatten() {
            if !p.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(p.path()).unwrap().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(ending) {
                    out.push(f.path().display().to_string());
                }
            }
        }
    }
    out.sort();
    out
}

/// Rotation by size and time with zstd on three partitions: every record
/// once in commit order, every sealed segment a complete zstd stream that
/// agrees with its manifest line, names carrying topic, partition and
/// first offset, the last segment sealed by time with no record arriving,
/// and the completeness mark past the last unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_rotate_by_size_and_time_compress_and_agree_with_the_manifest() {
    let topic = topic(3).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let producer = producer();
    let want = produce_units(&producer, &topic, 1..101, 3, |_, _| "false").await;
    let cfg = archive_sink(
        &unique("arch"),
        &topic,
        &root,
        &[
            ("file.rotate.bytes", "4000"),
            ("file.rotate.interval.ms", "1500"),
            ("file.compression", "zstd"),
        ],
    );
    let sink = Running::start(|t| file_sink::run(cfg, t));
    let got = wait_for_archive(&root, want.len(), Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&got, &want);
    // No record arrives now; time alone seals what is open.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files(&root, ".jsonl.open").is_empty() {
        assert!(
            Instant::now() < deadline,
            "open segments left: {:?}",
            files(&root, ".jsonl.open")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sealed = files(&root, ".jsonl.zst");
    assert!(sealed.len() >= 6, "segments sealed by size: {sealed:?}");
    for f in &sealed {
        let name = Path::new(f)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let (t, rest) = name.split_once('+').unwrap();
        let (p, off) = rest.split_once('+').unwrap();
        assert_eq!(t, topic);
        assert!(p.parse::<i32>().unwrap() < 3);
        assert_eq!(off.len(), "00000000000000000000.jsonl.zst".len(), "{name}");
        if let Ok(out) = std::process::Command::new("zstd")
            .args(["-t", "-q", f])
            .output()
        {
            assert!(
                out.status.success(),
                "zstd -t {f}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let all_sealed: Vec<String> = Archive::open(&root)
        .unwrap()
        .records(&ReadOptions {
            sealed_only: true,
            ..Default::default()
        })
        .map(|r| r.unwrap().line)
        .collect();
    assert_eq!(all_sealed, got, "everything is sealed, in the same order");
    // Every unit ends on some partition and each partition read to its
    // end: the archive is complete past the last unit.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mark = loop {
        let m = Archive::open(&root).unwrap().complete_before(false);
        if m.and_then(|m| m.commit_order) == Some(101) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(mark.and_then(|m| m.commit_order), Some(101), "{mark:?}");
    sink.stop().await.unwrap();
    producer.flush(Duration::from_secs(5)).unwrap();
}

/// Waits until `held` says at least `n` partitions are held.
async fn wait_held(held: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: holds {} partitions, not {n}",
            held.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three instances with one name on a six-partition topic: they join one
/// by one (each gets its share), one leaves, one is killed, one comes
/// back, all while records arrive. Every record is in the archive once, in
/// commit order, and the manifests agree with the segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_a_topic_exactly_once_through_rebalances_and_kills() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;
    let topic = topic(6).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let name = unique("group");
    let keys = [
        ("file.rotate.bytes", "20000"),
        ("file.rotate.interval.ms", "700"),
        ("file.compression", "zstd"),
    ];
    let start = || {
        let cfg = archive_sink(&name, &topic, &root, &keys);
        let held: Arc<AtomicUsize> = cfg.held.clone();
        (Running::start(|t| file_sink::run(cfg, t)), held)
    };
    let producer = producer();
    let mut want = Vec::new();
    let mut units = 1i64;
    let mut more = |n: i64| {
        let r = units..units + n;
        units += n;
        r
    };
    let (a, a_held) = start();
    want.extend(produce_units(&producer, &topic, more(100), 4, |_, _| "false").await);
    wait_held(&a_held, 6, "the first instance").await;
    let (b, b_held) = start();
    want.extend(produce_units(&producer, &topic, more(100), 4, |_, _| "false").await);
    wait_held(&b_held, 1, "the second instance").await;
    let (c, c_held) = start();
    want.extend(produce_units(&producer, &topic, more(100), 4, |_, _| "false").await);
    wait_held(&c_held, 1, "the third instance").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while a_held.load(Relaxed) + b_held.load(Relaxed) + c_held.load(Relaxed) != 6 {
        assert!(
            Instant::now() < deadline,
            "the three never settled on six partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a_held.load(Relaxed) > 0 && b_held.load(Relaxed) > 0,
        "each has a share"
    );
    // One leaves cleanly, one is killed in the middle of whatever it does.
    b.stop().await.unwrap();
    want.extend(produce_units(&producer, &topic, more(100), 4, |_, _| "false").await);
    a.kill().await;
    want.extend(produce_units(&producer, &topic, more(100), 4, |_, _| "false").await);
    // The killed one's partitions move on once the group notices.
    wait_held(&c_held, 6, "the last instance standing").await;
    let (a, a_held) = start();
    want.extend(produce_units(&producer, &topic, more(100), 4, |_, _| "false").await);
    wait_held(&a_held, 1, "the restarted instance").await;
    let got = wait_for_archive(&root, want.len(), Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.assert_running();
    c.assert_running();
    a.stop().await.unwrap();
    c.stop().await.unwrap();
    let got_after = archive_lines(&root);
    assert_eq!(
        got_after.len(),
        got.len(),
        "nothing more arrived after the wait"
    );
    assert_exactly_once_in_order(&got_after, &want);
}

/// Deletes `topic` and creates it again with `partitions` partitions, as
/// `docker compose down -v` and `up` do to pg-source's topics.
pub async fn recreate(topic: &str, partitions: i32) {
    use rdkafka::admin::AdminOptions;
    let admin = kafka().admin().unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    admin.delete_topics(&[topic], &opts).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ensure_topic(
            &admin,
            topic,
            &TopicSpec {
                partitions,
                replication_factor: -1,
                configs: Vec::new(),
            },
        )
        .await;
        if matches!(r, Ok(true)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cannot create {topic} again: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn aside(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.contains(".before-reset-")
        })
        .collect();
    v.sort();
    v
}

/// A topic deleted and created again under the single file's checkpoint
/// (fewer records than before, then more and other ones): each time the
/// file, its checkpoint and dead letters are kept aside unchanged under a
/// name that says so, and a new file holds the new topic from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_sets_the_single_file_aside_and_starts_a_new_one() {
    let topic = topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.txt");
    let name = unique("reset");
    let producer = producer();
    let run_until = |want: Vec<String>| {
        let cfg = archive_sink(&name, &topic, &file, &[]);
        let file = file.clone();
        async move {
            let sink = Running::start(|t| file_sink::run(cfg, t));
            let deadline = Instant::now() + Duration::from_secs(60);
            while lines_of(&file) != want {
                assert!(
                    Instant::now() < deadline,
                    "{} lines of {}",
                    lines_of(&file).len(),
                    want.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sink.stop().await.unwrap();
        }
    };
    let first = produce_units(&producer, &topic, 1..11, 1, |_, _| "false").await;
    run_until(first.clone()).await;
    let before = std::fs::read(&file).unwrap();
    assert_eq!(lines_of(&file), first);

    // Created again with fewer records than the file holds.
    recreate(&topic, 1).await;
    let second = produce_units(&producer, &topic, 100..105, 1, |_, _| "false").await;
    run_until(second.clone()).await;
    let moved = aside(dir.path(), "out.txt");
    assert_eq!(moved.len(), 2, "the file and its checkpoint: {moved:?}");
    let old = moved
        .iter()
        .find(|p| !p.to_string_lossy().ends_with("checkpoint"))
        .unwrap();
    assert_eq!(
        std::fs::read(old).unwrap(),
        before,
        "the old file is kept unchanged"
    );
    assert!(moved
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".tidemark-checkpoint")));
    assert_eq!(lines_of(&file), second);

    // Created again with more records, other ones, than the file holds.
    let before = std::fs::read(&file).unwrap();
    recreate(&topic, 1).await;
    let third = produce_units(&producer, &topic, 200..220, 1, |_, _| "false").await;
    run_until(third.clone()).await;
    assert_eq!(lines_of(&file), third);
    let kept: Vec<Vec<u8>> = aside(dir.path(), "out.txt")
        .iter()
        .filter(|p| {
            !p.to_string_lossy().ends_with("checkpoint")
                && !p.to_string_lossy().ends_with("dead-letter")
        })
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(kept.contains(&before), "the second file is kept too");
}

/// The same in a segmented archive: each partition whose topic was
/// recreated is set aside as a folder `<partition>.before-reset-<time>`
/// with its segments and manifest unchanged, and the new topic is archived
/// from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_sets_the_archived_partitions_aside() {
    let topic = topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let name = unique("reset");
    let keys = [("file.rotate.bytes", "3000"), ("file.compression", "gzip")];
    let producer = producer();
    let first = produce_units(&producer, &topic, 1..41, 1, |_, _| "false").await;
    let cfg = archive_sink(&name, &topic, &root, &keys);
    let sink = Running::start(|t| file_sink::run(cfg, t));
    assert_exactly_once_in_order(
        &wait_for_archive(&root, 40, Duration::from_secs(60)).await,
        &first,
    );
    sink.stop().await.unwrap();
    let manifests: Vec<Vec<u8>> = (0..2)
        .map(|p| {
            std::fs::read(root.join(&topic).join(p.to_string()).join("manifest.jsonl"))
                .unwrap_or_default()
        })
        .collect();

    recreate(&topic, 2).await;
    let second = produce_units(&producer, &topic, 100..104, 1, |_, _| "false").await;
    let cfg = archive_sink(&name, &topic, &root, &keys);
    let sink = Running::start(|t| file_sink::run(cfg, t));
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = tokio::select! {
            got = wait_for_archive(&root, 4, Duration::from_secs(60)) => got,
            _ = async { while !sink.finished() { tokio::time::sleep(Duration::from_millis(100)).await } } => {
                panic!("file-sink ended by itself: {:?}", sink.stop().await.map(|_| ()));
            }
        };
        if got.len() == 4 || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    sink.stop().await.unwrap();
    assert_exactly_once_in_order(&got, &second);
    for (p, manifest) in manifests.iter().enumerate() {
        let moved = aside(&root.join(&topic), &p.to_string());
        assert_eq!(moved.len(), 1, "partition {p}: {moved:?}");
        assert_eq!(
            &std::fs::read(moved[0].join("manifest.jsonl")).unwrap_or_default(),
            manifest
        );
    }
}

/// Retention keeps every time of its window restorable. With only the
/// initial snapshot (unit 0) nothing goes: every restore starts from it.
/// Once a later base snapshot is older than the window's start, the sealed
/// segments wholly before it are deleted (a `retired` manifest line, then
/// the file), and everything from it on stays, readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_what_no_restore_in_the_window_needs() {
    let topic = topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let day = 86_400_000i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let producer = producer();
    // The initial snapshot, ten days ago (unit 0: first .. last), then
    // changes over the following days.
    let snap = |co: i64, per: i64| {
        move |c: i64, o: i64| -> &'static str {
            match (c == co, o) {
                (true, 1) => "first",
                (true, o) if o == per => "last",
                (true, _) => "true",
                _ => "false",
            }
        }
    };
    let mut want =
        produce_units_at(&producer, &topic, 0..1, 6, snap(0, 6), |_| now - 10 * day).await;
    want.extend(
        produce_units_at(
            &producer,
            &topic,
            1..21,
            2,
            |_, _| "false",
            |co| now - 10 * day + co * 3_600_000,
        )
        .await,
    );
    let cfg = archive_sink(
        &unique("keep"),
        &topic,
        &root,
        &[
            ("file.rotate.bytes", "2500"),
            ("file.rotate.interval.ms", "500"),
            ("file.compression", "zstd"),
            ("file.retention.window.ms", &(2 * day).to_string()),
        ],
    );
    let sink = Running::start(|t| file_sink::run(cfg, t));
    wait_for_archive(&root, want.len(), Duration::from_secs(60)).await;
    let retired = |root: &Path| -> Vec<String> {
        let mut v = Vec::new();
        for p in 0..2 {
            let m = std::fs::read_to_string(
                root.join(&topic).join(p.to_string()).join("manifest.jsonl"),
            )
            .unwrap_or_default();
            v.extend(
                m.lines()
                    .filter(|l| l.contains("\"kind\":\"retired\""))
                    .map(str::to_owned),
            );
        }
        v
    };
    // Long enough for the policy to have run (every 10 s) with only the
    // initial snapshot as a base.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        retired(&root),
        Vec::<String>::new(),
        "only the initial snapshot: nothing goes"
    );
    assert_exactly_once_in_order(&archive_lines(&root), &want);

    // A base snapshot five days ago (unit 21), then changes up to now.
    let later_part =
        produce_units_at(&producer, &topic, 21..22, 6, snap(21, 6), |_| now - 5 * day).await;
    let after = produce_units_at(
        &producer,
        &topic,
        22..42,
        2,
        |_, _| "false",
        |co| now - 5 * day + (co - 21) * 3_600_000 * 5,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while retired(&root).is_empty() {
        assert!(Instant::now() < deadline, "nothing retired");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    sink.stop().await.unwrap();
    let archive = Archive::open(&root).unwrap();
    let Archive::Segmented { partitions, .. } = &archive else {
        unreachable!()
    };
    for p in partitions {
        p.verify().unwrap();
        for s in &p.segments {
            assert!(
                s.stats.last.commit_order.unwrap() >= 21,
                "a segment wholly before the base is kept: {}",
                s.segment
            );
        }
    }
    for line in retired(&root) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let seg = v["segment"].as_str().unwrap();
        assert!(files(&root, seg).is_empty(), "{seg} is still on disk");
    }
    let left = archive_lines(&root);
    for l in later_part.iter().chain(&after) {
        assert!(left.contains(l), "a record the restore needs is gone: {l}");
    }
    assert!(
        left.len() < want.len() + later_part.len() + after.len(),
        "something was deleted"
    );
}

/// A file-sink as a real process, logging to `log`.
struct Proc(std::process::Child);

impl Proc {
    fn start(config: &Path, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Self(
            std::process::Command::new(env!("CARGO_BIN_EXE_it-file-sink"))
                .arg("--connector-config")
                .arg(config)
                .args(["--bootstrap-servers", &bootstrap(), "--http-addr", "off"])
                .env("TIDEMARK_LOG", "info,librdkafka=warn")
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        )
    }

    fn signal(&self, sig: &str) {
        std::process::Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A former owner that is alive but stalled (SIGSTOP) keeps its
/// partitions' locks: the group gives them to another instance, which
/// waits and says so, and writes nothing of them meanwhile. Once the
/// stalled one runs again it learns it lost them and lets go; the other
/// takes over where it stopped. Every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_former_owner_is_waited_for_and_never_written_beside() {
    let topic = topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let config = dir.path().join("sink.json");
    std::fs::write(
        &config,
        serde_json::json!({"name": unique("stall"), "config": {
            "topics": topic, "file": root, "file.rotate.bytes": "4000", "file.compression": "zstd"}})
        .to_string(),
    )
    .unwrap();
    let producer = producer();
    let mut want = produce_units(&producer, &topic, 1..51, 2, |_, _| "false").await;
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let a = Proc::start(&config, &log_a);
    wait_for_archive(&root, want.len(), Duration::from_secs(60)).await;
    a.signal("-STOP");
    want.extend(produce_units(&producer, &topic, 51..101, 2, |_, _| "false").await);
    let b = Proc::start(&config, &log_b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log_b)
        .unwrap()
        .contains("still holds it")
    {
        assert!(
            Instant::now() < deadline,
            "b never waited for the stalled owner:\n{}",
            std::fs::read_to_string(&log_b).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = |root: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v = Vec::new();
        for p in 0..2 {
            let d = root.join(&topic).join(p.to_string());
            for f in std::fs::read_dir(&d).unwrap().flatten() {
                v.push((
                    f.path().display().to_string(),
                    std::fs::read(f.path()).unwrap(),
                ));
            }
        }
        v.sort();
        v
    };
    let frozen = state(&root);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        state(&root) == frozen,
        "something wrote the stalled owner's partitions"
    );
    a.signal("-CONT");
    let got = wait_for_archive(&root, want.len(), Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly_once_in_order(&archive_lines(&root), &want);
    assert_eq!(got.len(), want.len());
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(log.contains("partition taken"), "{log}");
    drop((a, b));
}

/// Readers following each partition of an archive file-sink is writing
/// (rotation by size and time, zstd) read every record once, in offset
/// order, through rotations and seals, the open segment sealed by time
/// while they read it included; a reader started again from the position
/// of the last line it read (every 37 lines) goes on from exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_follows_the_archive_through_rotations_and_seals_and_resumes_from_its_position() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tidemark_common::archive::{partition_dir, PartitionArchive, PartitionTail, SegmentPos};
    let topic = topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let keys = [
        ("file.rotate.bytes", "4000"),
        ("file.rotate.interval.ms", "700"),
        ("file.compression", "zstd"),
    ];
    let cfg = archive_sink(&unique("tail"), &topic, &root, &keys);
    let sink = Running::start(|t| file_sink::run(cfg, t));
    let (stop, read) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let followers: Vec<_> = (0..2)
        .map(|p| {
            let pdir = partition_dir(&root, &topic, p);
            let (stop, read) = (stop.clone(), read.clone());
            tokio::task::spawn_blocking(move || {
                let mut tail = PartitionTail::new(&pdir, SegmentPos::START, ReadOptions::default());
                let mut got: Vec<String> = Vec::new();
                let mut resumes = 0;
                loop {
                    match tail.next_record().unwrap() {
                        Some(r) => {
                            assert_eq!(r.at.lines + 1, r.next.lines.max(1));
                            got.push(String::from_utf8(r.line).unwrap());
                            read.fetch_add(1, Ordering::Relaxed);
                            if got.len().is_multiple_of(37) {
                                tail = PartitionTail::new(&pdir, r.next, ReadOptions::default());
                                resumes += 1;
                            }
                        }
                        None if stop.load(Ordering::Relaxed) => return (got, resumes),
                        None => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        })
        .collect();
    let producer = producer();
    let mut want = Vec::new();
    for wave in 0..4 {
        want.extend(
            produce_units(
                &producer,
                &topic,
                wave * 40 + 1..wave * 40 + 41,
                2,
                |_, _| "false",
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    // Every record read, and time has sealed every segment.
    let deadline = Instant::now() + Duration::from_secs(60);
    while read.load(Ordering::Relaxed) < want.len() || !files(&root, ".jsonl.open").is_empty() {
        assert!(
            Instant::now() < deadline,
            "read {} of {}; open: {:?}",
            read.load(Ordering::Relaxed),
            want.len(),
            files(&root, ".jsonl.open")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Time to read anything twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    sink.stop().await.unwrap();
    let mut all = Vec::new();
    for (p, f) in followers.into_iter().enumerate() {
        let (got, resumes) = f.await.unwrap();
        let pdir = partition_dir(&root, &topic, p as i32);
        let reference: Vec<String> = PartitionArchive::open(&pdir, &topic, p as i32)
            .unwrap()
            .records(&ReadOptions::default())
            .map(|r| r.unwrap().line)
            .collect();
        assert!(
            got == reference,
            "partition {p}: the tail read other lines than the archive holds, or in another order"
        );
        assert!(resumes >= 2, "partition {p}: {resumes} resumes");
        all.extend(got);
    }
    let key = |l: &String| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        (
            v["transaction"]["commit_order"].as_i64().unwrap(),
            v["transaction"]["total_order"].as_i64().unwrap(),
        )
    };
    all.sort_by_key(key);
    assert_exactly_once_in_order(&all, &want);
    assert!(
        files(&root, ".jsonl.zst").len() > 8,
        "rotations: {:?}",
        files(&root, ".jsonl.zst")
    );
}

/// A segmented archive's instance sizes its fetch at start from where its
/// partitions resume: on a backlog another producer wrote without
/// compression it takes the largest, and archives every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_on_an_uncompressed_backlog_takes_larger_fetches() {
    use rdkafka::producer::FutureRecord;
    use std::sync::atomic::Ordering;
    let topic = topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let producer = producer();
    let pad = "x".repeat(1000);
    let mut want = Vec::new();
    let mut pending = Vec::new();
    for i in 0..12000 {
        let line = format!(r#"{{"id":{i},"pad":"{pad}"}}"#);
        pending.push(
            producer
                .send_result(
                    FutureRecord::to(&topic)
                        .key(&format!("{i}"))
                        .payload(line.as_bytes()),
                )
                .map_err(|(e, _)| e)
                .unwrap(),
        );
        want.push(line);
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    let keys = [
        ("file.rotate.bytes", "4000000"),
        ("file.compression", "zstd"),
    ];
    let cfg = archive_sink(&unique("probe"), &topic, &root, &keys);
    let fetch = cfg.fetch_bytes.clone();
    let sink = Running::start(|t| file_sink::run(cfg, t));
    let mut got = wait_for_archive(&root, want.len(), Duration::from_secs(120)).await;
    sink.stop().await.unwrap();
    let admin = kafka().admin().unwrap();
    let _ = admin
        .delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new())
        .await;
    assert_eq!(got.len(), want.len(), "records in the archive");
    got.sort();
    want.sort();
    assert!(
        got == want,
        "the archive holds other records than the topic"
    );
    assert_eq!(
        fetch.load(Ordering::Relaxed),
        file_sink::consumer::FETCH_MAX,
        "the fetch is the largest"
    );
}
