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

/// Metric names, as constants so a typo cannot create a new series.
pub mod names {
    /// Rows read from Postgres (changes and snapshot rows).
    pub const SOURCE_ROWS_READ: &str = "tidemark_source_rows_read_total";
    /// Records committed to Kafka (data records, tombstones included).
    pub const SOURCE_RECORDS_PRODUCED: &str = "tidemark_source_records_produced_total";
    /// Kafka transactions committed.
    pub const SOURCE_BATCHES: &str = "tidemark_source_batches_total";
    /// Errors, by `kind` (postgres, kafka).
    pub const SOURCE_ERRORS: &str = "tidemark_source_errors_total";
    /// Seconds between the newest change sent and now, when one was sent.
    pub const SOURCE_LAG_SECONDS: &str = "tidemark_source_lag_seconds";
    /// Lines written to the output file.
    pub const SINK_LINES_WRITTEN: &str = "tidemark_sink_lines_written_total";
    /// Records sent to the dead-letter file.
    pub const SINK_DEAD_LETTERS: &str = "tidemark_sink_dead_letters_total";
    /// Tombstones skipped.
    pub const SINK_TOMBSTONES_SKIPPED: &str = "tidemark_sink_tombstones_skipped_total";
    /// Errors, by `kind` (kafka, file).
    pub const SINK_ERRORS: &str = "tidemark_sink_errors_total";
    /// Records in Kafka not yet written, summed over partitions.
    pub const SINK_LAG_RECORDS: &str = "tidemark_sink_lag_records";
}

/// A program counts as stuck when its loop has not come round for this long.
const STALL: Duration = Duration::from_secs(120);

#[derive(Clone)]
struct OpsState {
    health: Health,
    metrics: PrometheusHandle,
}

/// Installs the Prometheus recorder (once per process) and serves the
/// endpoint on `addr` until `shutdown`.
///
/// Fails when the address cannot be bound, naming it.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = recorder();
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
