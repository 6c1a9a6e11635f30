//! The operations endpoint every long-running program serves: `GET /healthz`
//! (200 when connected and making progress, 503 otherwise) and `GET /metrics`
//! (Prometheus text format).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Metric names, as constants so a typo cannot create a new series, and
/// what each program exports ([`names::SOURCE`], [`names::SINK`]): the
/// endpoint describes every series (`# HELP`, `# TYPE`), and counters exist
/// at 0 from the start, error counters once for every kind, so a rate or an
/// alert on them works before the first error.
pub mod names {
    use super::{Kind, Metric, Start};

    /// Rows read from Postgres (changes and snapshot rows).
    pub const SOURCE_ROWS_READ: &str = "tidemark_source_rows_read_total";
    /// Records committed to Kafka (data records, tombstones included).
    pub const SOURCE_RECORDS_PRODUCED: &str = "tidemark_source_records_produced_total";
    /// Kafka transactions committed.
    pub const SOURCE_BATCHES: &str = "tidemark_source_batches_total";
    /// Errors, by `kind` ([`SOURCE_ERROR_KINDS`]).
    pub const SOURCE_ERRORS: &str = "tidemark_source_errors_total";
    /// The kinds of [`SOURCE_ERRORS`].
    pub const SOURCE_ERROR_KINDS: &[&str] = &["postgres", "kafka"];
    /// Changes sent to the dead-letter topic, by `table`.
    pub const SOURCE_DEAD_LETTERS: &str = "tidemark_source_dead_letters_total";
    /// 1 for each captured table that was dropped, by `table` (changelog
    /// mode: its changes logged before the drop are sent; the others go on).
    pub const SOURCE_TABLES_DROPPED: &str = "tidemark_source_tables_dropped";
    /// Seconds between the newest change sent and now, when one was sent.
    pub const SOURCE_LAG_SECONDS: &str = "tidemark_source_lag_seconds";
    /// Lines written to the output file.
    pub const SINK_LINES_WRITTEN: &str = "tidemark_sink_lines_written_total";
    /// Records sent to the dead-letter file.
    pub const SINK_DEAD_LETTERS: &str = "tidemark_sink_dead_letters_total";
    /// Tombstones skipped.
    pub const SINK_TOMBSTONES_SKIPPED: &str = "tidemark_sink_tombstones_skipped_total";
    /// Errors, by `kind` ([`SINK_ERROR_KINDS`]).
    pub const SINK_ERRORS: &str = "tidemark_sink_errors_total";
    /// The kinds of [`SINK_ERRORS`].
    pub const SINK_ERROR_KINDS: &[&str] = &["kafka", "file"];
    /// Records in Kafka not yet written, summed over partitions.
    pub const SINK_LAG_RECORDS: &str = "tidemark_sink_lag_records";
    /// Segments of a segmented archive sealed.
    pub const SINK_SEGMENTS_SEALED: &str = "tidemark_sink_segments_sealed_total";
    /// Sealed segments a retention policy deleted.
    pub const SINK_SEGMENTS_RETIRED: &str = "tidemark_sink_segments_retired_total";
    /// Partitions of a segmented archive this instance writes now.
    pub const SINK_PARTITIONS_HELD: &str = "tidemark_sink_partitions_held";

    /// What pg-source exports.
    pub const SOURCE: &[Metric] = &[
        Metric {
            name: SOURCE_ROWS_READ,
            kind: Kind::Counter,
            help: "Rows read from Postgres: changes and snapshot rows.",
            start: Start::Zero,
        },
        Metric {
            name: SOURCE_RECORDS_PRODUCED,
            kind: Kind::Counter,
            help: "Records committed to Kafka, tombstones included.",
            start: Start::Zero,
        },
        Metric {
            name: SOURCE_BATCHES,
            kind: Kind::Counter,
            help: "Kafka transactions committed.",
            start: Start::Zero,
        },
        Metric {
            name: SOURCE_ERRORS,
            kind: Kind::Counter,
            help: "Errors, by kind (postgres, kafka); each is retried or stops the program.",
            start: Start::ZeroFor("kind", SOURCE_ERROR_KINDS),
        },
        Metric {
            name: SOURCE_DEAD_LETTERS,
            kind: Kind::Counter,
            help: "Changes that could not be encoded, sent to the dead-letter topic, by table.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_TABLES_DROPPED,
            kind: Kind::Gauge,
            help: "1 for a captured table that was dropped, by table: its changes logged before the drop are sent, the other tables go on.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_LAG_SECONDS,
            kind: Kind::Gauge,
            help: "Seconds between the commit of the newest change sent and now; 0 when caught up.",
            start: Start::Absent,
        },
    ];

    /// What file-sink exports.
    pub const SINK: &[Metric] = &[
        Metric {
            name: SINK_LINES_WRITTEN,
            kind: Kind::Counter,
            help: "Lines written (and fsynced) to the output file.",
            start: Start::Zero,
        },
        Metric {
            name: SINK_DEAD_LETTERS,
            kind: Kind::Counter,
            help: "Records written to the dead-letter file instead (not JSON, or too large).",
            start: Start::Zero,
        },
        Metric {
            name: SINK_TOMBSTONES_SKIPPED,
            kind: Kind::Counter,
            help: "Tombstones (records with a null value) skipped.",
            start: Start::Zero,
        },
        Metric {
            name: SINK_ERRORS,
            kind: Kind::Counter,
            help: "Errors, by kind (kafka, file); each is retried or stops the program.",
            start: Start::ZeroFor("kind", SINK_ERROR_KINDS),
        },
        Metric {
            name: SINK_LAG_RECORDS,
            kind: Kind::Gauge,
            help: "Records in Kafka not yet written to the file, summed over partitions.",
            start: Start::Absent,
        },
        Metric {
            name: SINK_SEGMENTS_SEALED,
            kind: Kind::Counter,
            help: "Segments of a segmented archive sealed (compressed, listed in the manifest).",
            start: Start::Zero,
        },
        Metric {
            name: SINK_SEGMENTS_RETIRED,
            kind: Kind::Counter,
            help: "Sealed segments deleted by the retention policy (file.retention.window.ms).",
            start: Start::Zero,
        },
        Metric {
            name: SINK_PARTITIONS_HELD,
            kind: Kind::Gauge,
            help: "Partitions of a segmented archive this instance writes now (its share of the consumer group's).",
            start: Start::Absent,
        },
    ];
}

/// One series family a program exports.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name, one of [`names`]' constants.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Which series exist before anything is counted.
    pub start: Start,
}

/// The Prometheus type of a [`Metric`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// Which series of a [`Metric`] exist from the start.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The series without labels, at 0.
    Zero,
    /// One series at 0 for each value of the label.
    ZeroFor(&'static str, &'static [&'static str]),
    /// None until the program sets one (a gauge with no value yet, or a
    /// counter whose labels are only known at run time).
    Absent,
}

/// Describes `metrics` to the current recorder and creates their starting
/// series.
pub fn register(metrics: &[Metric]) {
    for m in metrics {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
        }
        match (m.kind, m.start) {
            (Kind::Counter, Start::Zero) => metrics::counter!(m.name).increment(0),
            (Kind::Counter, Start::ZeroFor(label, values)) => {
                for value in values {
                    metrics::counter!(m.name, label => *value).increment(0);
                }
            }
            (Kind::Gauge, Start::Zero) => metrics::gauge!(m.name).set(0.0),
            (Kind::Gauge, Start::ZeroFor(label, values)) => {
                for value in values {
                    metrics::gauge!(m.name, label => *value).set(0.0);
                }
            }
            (_, Start::Absent) => {}
        }
    }
}

/// A program counts as stuck when its loop has not come round for this long.
const STALL: Duration = Duration::from_secs(120);

#[derive(Clone)]
struct OpsState {
    health: Health,
    metrics: PrometheusHandle,
}

/// Installs the Prometheus recorder (once per process), [`register`]s what
/// the program exports (`exports`, like [`names::SOURCE`]) and serves the
/// endpoint on `addr` until `shutdown`.
///
/// Fails when the address cannot be bound, naming it.
pub async fn serve(
    addr: SocketAddr,
    exports: &[Metric],
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = recorder();
    register(exports);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render))
        .with_state(OpsState { health, metrics });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for /healthz and /metrics: change --http-addr (TIDEMARK_HTTP_ADDR)"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz and /metrics");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the /healthz and /metrics endpoint stopped");
        }
    });
    Ok(())
}

/// The process-wide Prometheus recorder.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // A second recorder (tests start programs in-process) is ignored.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

async fn healthz(State(s): State<OpsState>) -> (StatusCode, &'static str) {
    if !s.health.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else if s.health.since_progress_ms() > STALL.as_millis() as i64 {
        (StatusCode::SERVICE_UNAVAILABLE, "stalled\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn render(State(s): State<OpsState>) -> String {
    s.metrics.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(exports: &[Metric]) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || register(exports));
        handle.render()
    }

    #[test]
    fn every_exported_family_is_described_and_counters_start_at_zero() {
        for exports in [names::SOURCE, names::SINK] {
            let text = rendered(exports);
            for m in exports {
                assert_eq!(
                    m.kind == Kind::Counter,
                    m.name.ends_with("_total"),
                    "{}: counters, and only they, end in _total",
                    m.name
                );
                if !matches!(m.start, Start::Absent) {
                    assert!(
                        text.contains(&format!("# HELP {} {}", m.name, m.help)),
                        "{text}"
                    );
                }
            }
        }
        let source = rendered(names::SOURCE);
        assert!(
            source.contains("# TYPE tidemark_source_errors_total counter"),
            "{source}"
        );
        for kind in names::SOURCE_ERROR_KINDS {
            assert!(
                source.contains(&format!(
                    "tidemark_source_errors_total{{kind=\"{kind}\"}} 0"
                )),
                "{source}"
            );
        }
        assert!(
            source.contains("tidemark_source_rows_read_total 0"),
            "{source}"
        );
        let sink = rendered(names::SINK);
        for kind in names::SINK_ERROR_KINDS {
            assert!(
                sink.contains(&format!("tidemark_sink_errors_total{{kind=\"{kind}\"}} 0")),
                "{sink}"
            );
        }
    }
}
