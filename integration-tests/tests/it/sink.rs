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
