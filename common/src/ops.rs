//! The operations endpoint every long-running program serves:
//!
//! - `GET /healthz`, liveness: 200 while the program's work loop comes round
//!   (or it is still starting), 503 once it has not for [`STALL`]; a restart
//!   may cure that.
//! - `GET /readyz`, readiness: 200 once the program is connected at both ends
//!   and doing its work (pg-source: the initial snapshot done, streaming;
//!   file-sink: partitions assigned, writing; pg-replay: applying or caught
//!   up), 503 otherwise.
//! - `GET /metrics`, Prometheus text format: every family in [`names`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Metric names, as constants so a typo cannot create a new series, and
/// what each program exports ([`names::SOURCE`], [`names::SINK`],
/// [`names::REPLAY`]): the endpoint describes every series (`# HELP`,
/// `# TYPE`), and counters exist at 0 from the start, error counters once
/// for every kind, so a rate or an alert on them works before the first
/// error. docs/operations.md lists them; the Grafana dashboard in docker/
/// queries only these (a test checks it).
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
    /// 1 for each captured table whose change-log triggers are gone or
    /// disabled, by `table` (changelog mode: its new changes are not logged;
    /// the others go on).
    pub const SOURCE_TABLES_UNCAPTURED: &str = "tidemark_source_tables_uncaptured";
    /// Seconds between the newest change sent and now, when one was sent.
    pub const SOURCE_LAG_SECONDS: &str = "tidemark_source_lag_seconds";
    /// Histogram: seconds from a change's commit in Postgres to the commit
    /// of its Kafka transaction, one observation per record.
    pub const SOURCE_CHANGE_LAG: &str = "tidemark_source_change_lag_seconds";
    /// 1 while the initial snapshot runs, 0 otherwise.
    pub const SOURCE_SNAPSHOT_RUNNING: &str = "tidemark_source_snapshot_running";
    /// Rows of the initial snapshot sent so far.
    pub const SOURCE_SNAPSHOT_ROWS_DONE: &str = "tidemark_source_snapshot_rows_done";
    /// Rows the initial snapshot's tables held when it began.
    pub const SOURCE_SNAPSHOT_ROWS_EXPECTED: &str = "tidemark_source_snapshot_rows_expected";
    /// Tables of the initial snapshot not read to their end yet.
    pub const SOURCE_SNAPSHOT_TABLES_LEFT: &str = "tidemark_source_snapshot_tables_left";
    /// Rows sent by incremental snapshots, by table.
    pub const SOURCE_INCREMENTAL_ROWS: &str = "tidemark_source_incremental_snapshot_rows_total";
    /// Tables whose incremental snapshot is not finished.
    pub const SOURCE_INCREMENTAL_TABLES_LEFT: &str =
        "tidemark_source_incremental_snapshot_tables_left";
    /// Tables that entered the connector's set while it ran or since its
    /// last run, by table.
    pub const SOURCE_TABLES_ADDED: &str = "tidemark_source_tables_added_total";
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
    /// Changes applied to the target.
    pub const REPLAY_CHANGES_APPLIED: &str = "tidemark_replay_changes_applied_total";
    /// Units (source transactions) applied.
    pub const REPLAY_UNITS_APPLIED: &str = "tidemark_replay_units_applied_total";
    /// The last unit applied (its commit_order).
    pub const REPLAY_POSITION: &str = "tidemark_replay_position";
    /// Commit time of the last unit applied, seconds since the epoch.
    pub const REPLAY_APPLIED_COMMIT_TIME: &str = "tidemark_replay_applied_commit_time_seconds";
    /// Seconds between the last applied unit's commit and now.
    pub const REPLAY_LAG_SECONDS: &str = "tidemark_replay_lag_seconds";
    /// Histogram: seconds from a unit's commit at the source to its apply
    /// in the target, one observation per unit.
    pub const REPLAY_UNIT_LAG: &str = "tidemark_replay_unit_lag_seconds";
    /// Units read and waiting (for their other events, or their turn).
    pub const REPLAY_PENDING_UNITS: &str = "tidemark_replay_pending_units";
    /// Runs applied event by event (the set-based apply could not).
    pub const REPLAY_SLOW_RUNS: &str = "tidemark_replay_slow_runs_total";
    /// How much of the archive is read, 0 to 1 (bytes of files, or
    /// offsets of topics, as they were when the run began).
    pub const REPLAY_READ_RATIO: &str = "tidemark_replay_read_ratio";

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
            name: SOURCE_TABLES_UNCAPTURED,
            kind: Kind::Gauge,
            help: "1 for a captured table whose change-log triggers were dropped or disabled, or (logical mode) for a table created again under a captured table's name without logical capture yet, by table: its new changes are not captured, the other tables go on.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_LAG_SECONDS,
            kind: Kind::Gauge,
            help: "Seconds between the commit of the newest change sent and now; 0 when caught up.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_CHANGE_LAG,
            kind: Kind::Histogram,
            help: "Seconds from a change's commit in Postgres to the commit of its Kafka transaction, per record.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_SNAPSHOT_RUNNING,
            kind: Kind::Gauge,
            help: "1 while the initial snapshot runs, 0 otherwise.",
            start: Start::Zero,
        },
        Metric {
            name: SOURCE_SNAPSHOT_ROWS_DONE,
            kind: Kind::Gauge,
            help: "Rows of the initial snapshot sent so far.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_SNAPSHOT_ROWS_EXPECTED,
            kind: Kind::Gauge,
            help: "Rows the initial snapshot's tables held when it began.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_SNAPSHOT_TABLES_LEFT,
            kind: Kind::Gauge,
            help: "Tables of the initial snapshot not yet read to their end.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_INCREMENTAL_ROWS,
            kind: Kind::Counter,
            help: "Rows sent by incremental snapshots (of tables that entered the set, or asked for), by table.",
            start: Start::Absent,
        },
        Metric {
            name: SOURCE_INCREMENTAL_TABLES_LEFT,
            kind: Kind::Gauge,
            help: "Tables whose incremental snapshot is not finished.",
            start: Start::Zero,
        },
        Metric {
            name: SOURCE_TABLES_ADDED,
            kind: Kind::Counter,
            help: "Tables that entered the connector's set (a longer table.whitelist, or a table a pattern came to match), by table.",
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

    /// What pg-replay exports.
    pub const REPLAY: &[Metric] = &[
        Metric {
            name: REPLAY_CHANGES_APPLIED,
            kind: Kind::Counter,
            help: "Changes applied to the target.",
            start: Start::Zero,
        },
        Metric {
            name: REPLAY_UNITS_APPLIED,
            kind: Kind::Counter,
            help: "Units (source transactions) applied.",
            start: Start::Zero,
        },
        Metric {
            name: REPLAY_POSITION,
            kind: Kind::Gauge,
            help: "The commit_order of the last unit applied.",
            start: Start::Absent,
        },
        Metric {
            name: REPLAY_APPLIED_COMMIT_TIME,
            kind: Kind::Gauge,
            help: "Commit time of the last unit applied, seconds since the epoch.",
            start: Start::Absent,
        },
        Metric {
            name: REPLAY_LAG_SECONDS,
            kind: Kind::Gauge,
            help: "Seconds between the last applied unit's commit and now.",
            start: Start::Absent,
        },
        Metric {
            name: REPLAY_UNIT_LAG,
            kind: Kind::Histogram,
            help:
                "Seconds from a unit's commit at the source to its apply in the target, per unit.",
            start: Start::Absent,
        },
        Metric {
            name: REPLAY_PENDING_UNITS,
            kind: Kind::Gauge,
            help: "Units read and waiting, for their other events or their turn.",
            start: Start::Absent,
        },
        Metric {
            name: REPLAY_SLOW_RUNS,
            kind: Kind::Counter,
            help: "Runs applied event by event, where the set-based apply could not.",
            start: Start::Zero,
        },
        Metric {
            name: REPLAY_READ_RATIO,
            kind: Kind::Gauge,
            help: "How much of the archive is read, 0 to 1, against its size when the run began.",
            start: Start::Absent,
        },
    ];

    /// Every family any program exports.
    pub fn all() -> impl Iterator<Item = &'static Metric> {
        SOURCE.iter().chain(SINK).chain(REPLAY)
    }
}

/// The buckets of every lag histogram, in seconds: from a few milliseconds
/// (a change log probe, a logical stream at rest) to ten minutes (a
/// follower catching up after an outage), so p50, p95 and p99 read well
/// across that range.
pub const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Sets the initial snapshot's gauges: `rows_done` of `rows_expected` sent,
/// `tables_left` tables not read to their end; `tables_left == 0` marks it
/// over.
pub fn snapshot_progress(rows_done: u64, rows_expected: u64, tables_left: usize) {
    metrics::gauge!(names::SOURCE_SNAPSHOT_RUNNING).set(if tables_left > 0 { 1.0 } else { 0.0 });
    metrics::gauge!(names::SOURCE_SNAPSHOT_ROWS_DONE).set(rows_done as f64);
    metrics::gauge!(names::SOURCE_SNAPSHOT_ROWS_EXPECTED).set(rows_expected as f64);
    metrics::gauge!(names::SOURCE_SNAPSHOT_TABLES_LEFT).set(tables_left as f64);
}

/// One series family a program exports.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name, one of [`names`]' constants.
    pub name: &'static str,
    /// Counter, gauge or histogram.
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
    /// Observations in [`LAG_BUCKETS`]; `_bucket`, `_sum` and `_count`
    /// series appear with the first observation.
    Histogram,
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
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
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
            (Kind::Histogram, _) | (_, Start::Absent) => {}
        }
    }
}

/// A program counts as stuck when its work loop has not come round for
/// this long: `/healthz` then answers 503.
pub const STALL: Duration = Duration::from_secs(120);

/// How often histograms' recent samples are folded into their buckets, so
/// an endpoint nobody scrapes holds no growing list of samples.
const UPKEEP: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct OpsState {
    health: Health,
    metrics: PrometheusHandle,
}

/// Installs the Prometheus recorder (once per process), [`register`]s what
/// the program exports (`exports`, like [`names::SOURCE`]) and serves
/// `/healthz`, `/readyz` and `/metrics` on `addr` until `shutdown`.
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
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(OpsState {
            health,
            metrics: metrics.clone(),
        });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for /healthz, /readyz and /metrics: change --http-addr (TIDEMARK_HTTP_ADDR)"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => break,
                _ = tick.tick() => metrics.run_upkeep(),
            }
        }
    });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the /healthz, /readyz and /metrics endpoint stopped");
        }
    });
    Ok(())
}

/// The process-wide Prometheus recorder, with [`LAG_BUCKETS`] for every
/// histogram.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            // A second recorder (tests start programs in-process) is ignored.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The exporter's settings: every histogram of [`names`] gets buckets (the
/// exporter would otherwise render it as a summary).
fn builder() -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new();
    for m in names::all().filter(|m| m.kind == Kind::Histogram) {
        b = b
            .set_buckets_for_metric(Matcher::Full(m.name.to_owned()), LAG_BUCKETS)
            .expect("the buckets are not empty");
    }
    b
}

/// What `/healthz` answers: liveness.
pub fn liveness(health: &Health) -> (StatusCode, &'static str) {
    if health.since_progress_ms() > STALL.as_millis() as i64 {
        (StatusCode::SERVICE_UNAVAILABLE, "stalled\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// What `/readyz` answers: readiness.
pub fn readiness(health: &Health) -> (StatusCode, &'static str) {
    if !health.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else if health.since_progress_ms() > STALL.as_millis() as i64 {
        (StatusCode::SERVICE_UNAVAILABLE, "stalled\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn healthz(State(s): State<OpsState>) -> (StatusCode, &'static str) {
    liveness(&s.health)
}

async fn readyz(State(s): State<OpsState>) -> (StatusCode, &'static str) {
    readiness(&s.health)
}

async fn render(State(s): State<OpsState>) -> String {
    s.metrics.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(exports: &[Metric]) -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || register(exports));
        handle.render()
    }

    #[test]
    fn every_exported_family_is_described_and_counters_start_at_zero() {
        for exports in [names::SOURCE, names::SINK, names::REPLAY] {
            let text = rendered(exports);
            for m in exports {
                assert_eq!(
                    m.kind == Kind::Counter,
                    m.name.ends_with("_total"),
                    "{}: counters, and only they, end in _total",
                    m.name
                );
                if !matches!(m.start, Start::Absent) && m.kind != Kind::Histogram {
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

    #[test]
    fn lag_histograms_have_buckets_from_milliseconds_to_minutes() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            register(names::SOURCE);
            metrics::histogram!(names::SOURCE_CHANGE_LAG).record_many(0.02, 3);
            metrics::histogram!(names::SOURCE_CHANGE_LAG).record(90.0);
        });
        let text = handle.render();
        assert!(
            text.contains("# TYPE tidemark_source_change_lag_seconds histogram"),
            "{text}"
        );
        for (le, n) in [
            ("0.01", 0),
            ("0.025", 3),
            ("60", 3),
            ("120", 4),
            ("+Inf", 4),
        ] {
            let series = format!("tidemark_source_change_lag_seconds_bucket{{le=\"{le}\"}} {n}");
            assert!(text.contains(&series), "no `{series}` in {text}");
        }
        assert!(
            text.contains("tidemark_source_change_lag_seconds_count 4"),
            "{text}"
        );
    }

    #[test]
    fn liveness_needs_the_loop_to_come_round_and_readiness_needs_ready_too() {
        let h = Health::new();
        assert_eq!(
            liveness(&h).0,
            StatusCode::OK,
            "a program starting is alive"
        );
        assert_eq!(readiness(&h).0, StatusCode::SERVICE_UNAVAILABLE);
        h.set_ready(true);
        assert_eq!(readiness(&h), (StatusCode::OK, "ready\n"));
        h.stalled_for_tests(STALL + Duration::from_secs(1));
        assert_eq!(liveness(&h), (StatusCode::SERVICE_UNAVAILABLE, "stalled\n"));
        assert_eq!(readiness(&h).0, StatusCode::SERVICE_UNAVAILABLE);
        h.progress();
        assert_eq!(liveness(&h).0, StatusCode::OK);
        h.set_ready(false);
        assert_eq!(
            liveness(&h).0,
            StatusCode::OK,
            "not connected is still alive"
        );
        assert_eq!(
            readiness(&h),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        );
    }

    #[test]
    fn metric_names_are_unique_and_histograms_count_seconds() {
        let mut seen = std::collections::BTreeSet::new();
        for m in names::all() {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("tidemark_"), "{}", m.name);
            if m.kind == Kind::Histogram {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
        }
    }
}
