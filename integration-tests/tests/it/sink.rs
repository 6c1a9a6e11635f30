//! file-sink as its users meet it: one owner per file, the lag it reports,
//! and what it does when the topic under its checkpoint was recreated.

use std::time::Duration;

use crate::support::*;

/// A second file-sink (another connector name, so another consumer group)
/// pointed at a file the first one writes is refused with the first one's
/// name and pid, and the file is left exactly as it was. Without the lock
/// the second one cut the first one's unsynced tail off and wrote every
/// record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sink_on_the_same_file_is_refused_and_leaves_it_untouched() {
    let fx = Fixture::new().await;
    let source = fx.start_source();
    let first = fx.start_sink();
    wait_for_lines(&fx.file(), 1, Duration::from_secs(30)).await;
    source.stop().await.unwrap();
    // Let the first sink settle: nothing more arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = std::fs::read(fx.file()).unwrap();
    let checkpoint = tidemark_common::offset::SinkCheckpoint::path_for(&fx.file());
    let checkpoint_before = std::fs::read(&checkpoint).unwrap();

    let mut cfg = fx.sink_config();
    cfg.name = unique("other");
    let err = format!(
        "{:#}",
        Running::start(|token| file_sink::run(cfg, token))
            .exited(Duration::from_secs(30))
            .await
            .expect_err("the second sink must be refused")
    );
    assert!(
        err.contains(&format!("being written by file-sink `{}`", fx.sink_name)),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert_eq!(
        std::fs::read(fx.file()).unwrap(),
        before,
        "the file is untouched"
    );
    assert_eq!(std::fs::read(&checkpoint).unwrap(), checkpoint_before);
    first.assert_running();
    first.stop().await.unwrap();
    assert_eq!(std::fs::read(fx.file()).unwrap(), before);
}

/// The value of an unlabelled series in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A sink that has written every record of a topic pg-source wrote (in
/// Kafka transactions, so each partition ends in a commit marker that is
/// never delivered) reports a lag of 0, not 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_is_zero_once_caught_up_on_a_transactional_topic() {
    use crate::cli::{free_port, http_get};
    let fx = Fixture::new().await;
    let source = fx.start_source();
    let port = free_port();
    let mut sink = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_it-file-sink"))
            .args(["--name", &fx.sink_name, "--topics", &fx.topic()])
            .arg("--file")
            .arg(fx.file())
            .args(["--bootstrap-servers", &bootstrap()])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_lines(&fx.file(), 1, Duration::from_secs(30)).await;
    source.stop().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        let (_, page) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .unwrap();
        last = metric(&page, "tidemark_sink_lag_records");
        if last == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(sink.0.try_wait().unwrap().is_none(), "file-sink exited");
    assert_eq!(last, Some(0.0), "the lag once every record is in the file");
}

/// A child process killed when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A single file's consumer starts with 64 KiB fetches and, on a topic
/// another producer wrote without compression, takes larger ones while
/// records keep coming (a new consumer, reading on after the last record
/// handed over): every record is in the file once, in order. With 64 KiB
/// fetches such a topic was read at a third of what the sink writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_grows_on_an_uncompressed_topic_and_nothing_is_lost_or_doubled() {
    use rdkafka::producer::FutureRecord;
    use std::sync::atomic::Ordering;
    let topic = crate::archive::topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.txt");
    let cfg = crate::archive::archive_sink(&unique("fetch"), &topic, &file, &[]);
    let fetch = cfg.fetch_bytes.clone();
    let producer = crate::archive::producer();
    let pad = "x".repeat(1000);
    let send = |range: std::ops::Range<usize>| {
        let (producer, topic, pad) = (producer.clone(), topic.clone(), pad.clone());
        async move {
            let mut pending = Vec::new();
            let mut lines = Vec::new();
            for i in range {
                let line = format!(r#"{{"id":{i},"pad":"{pad}"}}"#);
                pending.push(
                    producer
                        .send_result(FutureRecord::<(), _>::to(&topic).payload(line.as_bytes()))
                        .map_err(|(e, _)| e)
                        .unwrap(),
                );
                lines.push(line);
            }
            for p in pending {
                p.await.unwrap().unwrap();
            }
            lines
        }
    };
    // A backlog, then more while the sink reads it.
    let mut want = send(0..8000).await;
    let sink = Running::start(|t| file_sink::run(cfg, t));
    for k in 1..6 {
        want.extend(send(k * 6000 + 2000..(k + 1) * 6000 + 2000).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let got = loop {
        let got: Vec<String> = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if got.len() >= want.len() || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    sink.stop().await.unwrap();
    let admin = kafka().admin().unwrap();
    let _ = admin
        .delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new())
        .await;
    assert_eq!(got.len(), want.len(), "lines in the file");
    assert!(
        got == want,
        "the file holds other lines than the topic, or in another order"
    );
    assert_eq!(
        fetch.load(Ordering::Relaxed),
        file_sink::consumer::FETCH_MAX,
        "the fetch grew to its largest"
    );
}
