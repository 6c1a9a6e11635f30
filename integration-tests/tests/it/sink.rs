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
