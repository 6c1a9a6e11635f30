//! The transactional Kafka producer.
//!
//! Each batch of rows and the source position that covers it are written in
//! one Kafka transaction: either both become visible to `read_committed`
//! readers or neither does. On start, `init_transactions` fences any older
//! instance with the same `transactional.id` and aborts its open transaction,
//! so a crashed pg-source never leaves half a batch behind.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use tidemark_common::kafka::KafkaSettings;
use tokio_util::sync::CancellationToken;

/// How long a transaction step may take before it is treated as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a record that found librdkafka's queue full waits for room
/// before it tries again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);

/// How often a batch waiting for acknowledgements checks for a stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// One record to produce.
#[derive(Debug, Clone)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Key bytes; empty for a null key (a TRUNCATE event's: every key
    /// Tidemark writes otherwise is JSON, never empty).
    pub key: Vec<u8>,
    /// Value bytes; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
}

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The transaction was aborted; the batch can be read and sent again.
    #[error("kafka transaction aborted, the batch will be sent again: {0:#}")]
    Retry(anyhow::Error),
    /// The producer cannot go on (fenced by another instance, not
    /// authorised); the program must stop.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// The producer instance hit a fatal error that a new instance cures
    /// (librdkafka's `INVALID_TXN_STATE` after a broker restart, say), or
    /// a commit failed whose outcome is unknown: the caller drops the
    /// producer, starts a new one, whose `init_transactions` fences this one
    /// and aborts its transaction, and goes on from the position stored in
    /// Kafka, never from the one in memory.
    #[error("the Kafka producer failed and is replaced by a new one: {0:#}")]
    Lost(anyhow::Error),
    /// The program is stopping and the batch was left uncommitted: the
    /// next start fences this producer, which aborts the transaction, and
    /// sends the batch again.
    #[error("stopping; the batch in flight was not committed and is sent again after a restart")]
    Stopped,
}

/// Counts acknowledgements, so a batch waits for exactly its own.
///
/// The producer's own polling thread serves delivery reports as they
/// arrive and wakes the waiting batch. (Polling from the batch's thread
/// instead needs short `poll` timeouts, and rust-rdkafka spins through
/// the last millisecond of each: that cost half a core at 1000 changes/s.)
#[derive(Default)]
pub struct Acks {
    state: Mutex<AckState>,
    changed: Condvar,
}

struct AckState {
    done: u64,
    /// The first failed delivery, with its record's topic, key and size.
    first_error: Option<(KafkaError, Failed)>,
    /// The count a waiting batch waits for (`u64::MAX`: none waits): the
    /// deliveries before it wake no one, so a batch of many records wakes
    /// its thread once, not once per record.
    wanted: u64,
}

impl Default for AckState {
    fn default() -> Self {
        Self {
            done: 0,
            first_error: None,
            wanted: u64::MAX,
        }
    }
}

/// The record a delivery or a send failed for, for the message.
#[derive(Debug, Clone, Default)]
struct Failed {
    topic: String,
    key: String,
    bytes: usize,
}

impl Failed {
    fn of(topic: &str, key: Option<&[u8]>, payload: Option<&[u8]>) -> Self {
        Self {
            topic: topic.to_owned(),
            key: key
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            bytes: payload.map_or(0, <[u8]>::len) + key.map_or(0, <[u8]>::len),
        }
    }
}

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acknowledgements so far.
    fn done(&self) -> u64 {
        self.lock().done
    }

    /// Waits until `done` has passed `target`, or until `until`; returns
    /// whether it did.
    fn wait_for(&self, target: u64, until: Instant) -> bool {
        let mut state = self.lock();
        let reached = loop {
            if state.done >= target {
                break true;
            }
            let now = Instant::now();
            if now >= until {
                break false;
            }
            state.wanted = target;
            state = self
                .changed
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        state.wanted = u64::MAX;
        reached
    }

    fn take_error(&self) -> Option<(KafkaError, Failed)> {
        self.lock().first_error.take()
    }
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut state = self.lock();
        if let Err((e, msg)) = result {
            state.first_error.get_or_insert_with(|| {
                use rdkafka::Message as _;
                (e.clone(), Failed::of(msg.topic(), msg.key(), msg.payload()))
            });
        }
        state.done += 1;
        let wake = state.done >= state.wanted;
        drop(state);
        if wake {
            self.changed.notify_all();
        }
    }
}

type Producer = ThreadedProducer<Acks>;

/// A transactional producer. Batches are sent from a blocking thread;
/// rust-rdkafka's polling thread serves the delivery reports.
#[derive(Clone)]
pub struct TxProducer {
    producer: Arc<Producer>,
    stop: CancellationToken,
    /// The table of each topic, for messages about a record.
    tables: Arc<std::collections::HashMap<String, String>>,
    /// The transaction [`TxProducer::send_part`] left open.
    open: Arc<std::sync::Mutex<Option<OpenTxn>>>,
}

/// How many records of an open transaction may wait for Kafka's
/// acknowledgement before [`TxProducer::send_part`] returns.
const PART_MAX_UNACKED: u64 = 4096;

/// A Kafka transaction begun and not yet committed: the acknowledgement
/// count when it began and the records produced into it since.
#[derive(Debug, Clone, Copy)]
struct OpenTxn {
    start: u64,
    sent: u64,
}

impl TxProducer {
    /// Creates the producer and initialises transactions, fencing any older
    /// instance with the same `transactional.id`.
    ///
    /// Fails when the brokers cannot be reached in time or refuse the
    /// transactional id.
    ///
    /// Once `stop` is cancelled, a batch still waiting for Kafka gives up
    /// (uncommitted) instead of waiting out its timeouts.
    pub async fn new(
        settings: &KafkaSettings,
        transactional_id: &str,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let producer: Producer = settings
            .client_config_fixed(
                &[
                ("linger.ms", "5"),
                ("compression.type", "lz4"),
                // The Java client's partitioner, so keys land where Java
                // producers would put them.
                ("partitioner", "murmur2_random"),
                ("transaction.timeout.ms", "60000"),
                // Below the transaction timeout, so a record that cannot be
                // delivered fails its batch before the broker aborts it.
                ("message.timeout.ms", "30000"),
                ("queue.buffering.max.kbytes", "16384"),
                ],
                &[
                    (
                        "transactional.id",
                        transactional_id,
                        "records and positions are written in one transaction; set the name instead",
                    ),
                    ("enable.idempotence", "true", "transactions need it"),
                    ("acks", "all", "transactions need it"),
                ],
            )?
            .create_with_context(Acks::default())
            .context("cannot create the Kafka producer; check the kafka properties")?;
        let producer = Arc::new(producer);
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(60)))
            .await?
            .map_err(|e| classify(e, "initialise Kafka transactions").into_anyhow())
            .with_context(|| {
                format!("cannot start the transactional producer `{transactional_id}`; is Kafka reachable at the bootstrap servers?")
            })?;
        Ok(Self {
            producer,
            stop,
            tables: Arc::default(),
            open: Arc::default(),
        })
    }

    /// Names the table of each topic (`topic` → `schema.table`), so an
    /// error about a record says which table and key it came from.
    pub fn name_tables(&mut self, tables: std::collections::HashMap<String, String>) {
        self.tables = Arc::new(tables);
    }

    /// Produces `records` and then `position` in one transaction and commits
    /// it. When this returns `Ok`, Kafka has acknowledged every record.
    ///
    /// Fails with [`BatchError::Retry`] when the transaction was aborted, and
    /// with [`BatchError::Fatal`] when the producer cannot continue.
    ///
    /// Records sent before by [`TxProducer::send_part`] are in the same
    /// transaction.
    pub async fn send_batch(
        &self,
        records: Vec<Record>,
        position: Record,
    ) -> Result<(), BatchError> {
        self.send(records, Some(position)).await
    }

    /// Produces `records` into the open transaction (beginning one when
    /// none is open) and returns without committing it: a large batch (an
    /// initial snapshot's) goes to Kafka chunk by chunk, held once by
    /// librdkafka's bounded queue rather than whole in memory, and commits
    /// once, with its position, by [`TxProducer::send_batch`].
    ///
    /// Fails as [`TxProducer::send_batch`] does; the transaction is then
    /// aborted, and the records of its earlier parts are not committed.
    pub async fn send_part(&self, records: Vec<Record>) -> Result<(), BatchError> {
        self.send(records, None).await
    }

    /// Aborts a transaction [`TxProducer::send_part`] left open, if any:
    /// what a part sent is never committed.
    pub async fn abort_open(&self) -> Result<(), BatchError> {
        let producer = self.producer.clone();
        let open = self.open.clone();
        tokio::task::spawn_blocking(move || {
            if open.lock().expect("not poisoned").take().is_some() {
                abort(&producer)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| BatchError::Fatal(anyhow!("producer task failed: {e}")))?
    }

    async fn send(&self, records: Vec<Record>, position: Option<Record>) -> Result<(), BatchError> {
        let producer = self.producer.clone();
        let stop = self.stop.clone();
        let tables = self.tables.clone();
        let open = self.open.clone();
        tokio::task::spawn_blocking(move || {
            let mut open = open.lock().expect("not poisoned");
            let result = send_blocking(
                &producer,
                records,
                position.as_ref(),
                &mut open,
                &stop,
                &tables,
            );
            if result.is_err() || position.is_some() {
                // Committed, or aborted (or left to the stop) on a failure.
                *open = None;
            }
            result
        })
        .await
        .map_err(|e| BatchError::Fatal(anyhow!("producer task failed: {e}")))?
    }
}

fn send_blocking(
    producer: &Producer,
    records: Vec<Record>,
    position: Option<&Record>,
    open: &mut Option<OpenTxn>,
    stop: &CancellationToken,
    tables: &std::collections::HashMap<String, String>,
) -> Result<(), BatchError> {
    let acks = producer.context();
    let mut topics: Vec<String> = records
        .iter()
        .chain(position)
        .map(|r| r.topic.clone())
        .collect();
    topics.sort_unstable();
    topics.dedup();
    let committed_anyway = std::cell::Cell::new(false);
    // Set once `commit_transaction` was called: from then on a failure
    // does not say that the broker did not commit.
    let committing = std::cell::Cell::new(false);
    // The record a failure is about, when it is one record's.
    let failed: std::cell::RefCell<Option<Failed>> = std::cell::RefCell::new(None);
    let run = || -> Result<(), KafkaError> {
        let txn = match *open {
            Some(txn) => txn,
            None => {
                producer.begin_transaction()?;
                // A failed or aborted batch before this one may have left an
                // error behind (its purged records report one each): it is
                // not this batch's.
                let start = {
                    let mut state = acks.lock();
                    state.first_error = None;
                    state.done
                };
                let txn = OpenTxn { start, sent: 0 };
                *open = Some(txn);
                txn
            }
        };
        let start = txn.start;
        let queue_deadline = Instant::now() + TXN_TIMEOUT;
        let mut sent = txn.sent;
        // librdkafka copies each record: drop ours once it is queued, so a
        // batch is held once, not twice.
        for r in records.into_iter().chain(position.cloned()) {
            let mut rec = BaseRecord::<Vec<u8>, Vec<u8>>::to(&r.topic);
            if !r.key.is_empty() {
                rec = rec.key(&r.key);
            }
            if let Some(value) = &r.value {
                rec = rec.payload(value);
            }
            loop {
                match producer.send(rec) {
                    Ok(()) => {
                        sent += 1;
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        if Instant::now() > queue_deadline {
                            return Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
                        }
                        if stop.is_cancelled() {
                            return Err(KafkaError::Canceled);
                        }
                        // The queue drains as acknowledgements come in.
                        acks.wait_for(acks.done() + 1, Instant::now() + QUEUE_FULL_WAIT);
                    }
                    Err((e, _)) => {
                        *failed.borrow_mut() =
                            Some(Failed::of(&r.topic, Some(&r.key), r.value.as_deref()));
                        return Err(e);
                    }
                }
            }
        }
        if position.is_none() {
            // A part: the transaction stays open for the next. Reading
            // goes on once Kafka has acknowledged all but the last
            // [`PART_MAX_UNACKED`] records, so what waits for Kafka stays
            // as small as one batch did, however large the transaction.
            *open = Some(OpenTxn { start, sent });
            let deadline = Instant::now() + TXN_TIMEOUT;
            let target = (start + sent).saturating_sub(PART_MAX_UNACKED);
            while !acks.wait_for(target, deadline.min(Instant::now() + STOP_CHECK)) {
                if stop.is_cancelled() {
                    return Err(KafkaError::Canceled);
                }
                if Instant::now() >= deadline {
                    return Err(KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageTimedOut,
                    ));
                }
            }
            return Ok(());
        }
        // Wait until every record of the batch is acknowledged. Committing
        // with nothing outstanding returns at once, where rust-rdkafka's
        // flush inside the commit would sleep in 100 ms steps while
        // anything is still in flight.
        let deadline = Instant::now() + TXN_TIMEOUT;
        loop {
            if acks.wait_for(start + sent, deadline.min(Instant::now() + STOP_CHECK)) {
                break;
            }
            if stop.is_cancelled() {
                return Err(KafkaError::Canceled);
            }
            if Instant::now() >= deadline {
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                ));
            }
        }
        // librdkafka counts a record as outstanding until the polling
        // thread has finished with its delivery report, a moment after the
        // callback above; the commit's flush must find none, or it sleeps
        // in 100 ms steps.
        let until = Instant::now() + TXN_TIMEOUT;
        while producer.in_flight_count() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(100));
        }
        if let Some((e, record)) = acks.take_error() {
            *failed.borrow_mut() = Some(record);
            return Err(transaction_cause(producer, e, &committed_anyway));
        }
        committing.set(true);
        commit(producer, stop)
    };
    let result = run();
    // Only the waits above give `Canceled`: the program is stopping.
    if let Err(KafkaError::Canceled) = result {
        return Err(BatchError::Stopped);
    }
    if committed_anyway.get() {
        return Err(BatchError::Fatal(anyhow!(
            "Kafka committed a transaction to {} although some of its records were not delivered; stopping, so that nothing is sent past them (a restart sends the batch again)",
            topics.join(", ")
        )));
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
            let f = failed.borrow().clone().unwrap_or_default();
            let table = tables.get(&f.topic).map_or("?", String::as_str);
            let _ = abort(producer);
            Err(BatchError::Fatal(anyhow!(
                "a record of table {table} (topic {}, key {}) is {} bytes, more than Kafka accepts ({e}): \
                 raise the producer's message.max.bytes (--kafka-property message.max.bytes=N), the topic's \
                 max.message.bytes (or the broker's message.max.bytes), and queue.buffering.max.kbytes \
                 (16384 by default) above the largest record; until then pg-source stops here, so that \
                 nothing is sent past it",
                f.topic,
                f.key,
                f.bytes
            )))
        }
        Err(e) => {
            let what = format!("commit a batch to {}", topics.join(", "));
            if let Some(lost) = lost(producer, &e, &what) {
                return Err(lost);
            }
            match classify(e, &what) {
                // A commit interrupted by a broker restart can fail here
                // although the coordinator committed it (an abort then
                // fails with INVALID_TXN_STATE). Going on from the position
                // in memory, from before the batch, would send the batch
                // again and store an older position over the newer one;
                // the position read back from Kafka is the outcome. (A
                // fence or a refusal still stops pg-source.)
                BatchError::Retry(e) if committing.get() => Err(BatchError::Lost(
                    e.context("the commit's outcome is read back from Kafka"),
                )),
                BatchError::Retry(e) => {
                    abort(producer)?;
                    Err(BatchError::Retry(e))
                }
                err => Err(err),
            }
        }
    }
}

/// Commits the open transaction. A commit that times out (the brokers went
/// away in the middle of it) goes on in librdkafka's background: it is
/// resumed until it ends, never aborted, since an abort then only fails
/// with "conflicting commit_transaction API call is already in progress"
/// (pg-source waited out its whole abort patience so, stalled), and the
/// commit may well have reached the broker. Gives up with `Canceled` when
/// the program stops meanwhile: the next start fences this producer and
/// reads back whatever the broker committed.
fn commit(producer: &Producer, stop: &CancellationToken) -> Result<(), KafkaError> {
    let deadline = Instant::now() + ABORT_PATIENCE;
    let mut logged = false;
    loop {
        match producer.commit_transaction(TXN_TIMEOUT) {
            Err(KafkaError::Transaction(e))
                if e.is_retriable()
                    && !e.txn_requires_abort()
                    && !e.is_fatal()
                    && Instant::now() < deadline =>
            {
                if stop.is_cancelled() {
                    return Err(KafkaError::Canceled);
                }
                if !logged {
                    tracing::warn!(error = %e, "the Kafka commit has not finished yet; resuming it");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// The error that explains a failed delivery. Records purged from the queue
/// only say that the transaction failed (a refused topic, say); librdkafka
/// purges them when it moves the transaction to its abortable-error state,
/// and in that state `commit_transaction` commits nothing and returns the
/// transaction's own error at once. Any other delivery error is the cause
/// itself.
fn transaction_cause(
    producer: &Producer,
    delivery: KafkaError,
    committed_anyway: &std::cell::Cell<bool>,
) -> KafkaError {
    match delivery.rdkafka_error_code() {
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
            match producer.commit_transaction(TXN_TIMEOUT) {
                Err(e @ KafkaError::Transaction(_)) => e,
                Err(_) => delivery,
                // Not expected in that state; if it happens the commit is
                // partial, and the caller stops.
                Ok(()) => {
                    committed_anyway.set(true);
                    delivery
                }
            }
        }
        _ => delivery,
    }
}

/// How long to keep trying to abort a transaction while the brokers are
/// unreachable before handing the transaction to a new producer, whose
/// `init_transactions` aborts it.
const ABORT_PATIENCE: Duration = Duration::from_secs(300);

/// Aborts the open transaction, waiting out a broker restart.
///
/// librdkafka purges what is still queued or in flight, and the polling
/// thread serves the reports the abort waits for.
fn abort(producer: &Producer) -> Result<(), BatchError> {
    let deadline = Instant::now() + ABORT_PATIENCE;
    let mut logged = false;
    loop {
        match producer.abort_transaction(TXN_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {
                if !logged {
                    tracing::warn!(error = %e, "cannot abort the failed transaction yet; retrying");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                if let Some(lost) = lost(producer, &e, "abort a failed transaction") {
                    return Err(lost);
                }
                // Neither fenced nor refused: a new producer's
                // `init_transactions` aborts the transaction instead (and
                // fails, so that pg-source stops, if Kafka stays away).
                return Err(match classify(e, "abort a failed transaction") {
                    BatchError::Retry(e) => {
                        BatchError::Lost(e.context("a new producer aborts the transaction instead"))
                    }
                    fatal => fatal,
                });
            }
        }
    }
}

/// The codes of fatal errors that a new producer does not cure: another
/// instance took over, or the user may not use transactions. pg-source
/// stops on these (see [`classify`]).
fn fatal_for_good(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
    )
}

/// [`BatchError::Lost`] when `e` left the producer unusable for a reason a
/// new producer cures: the error is fatal (or the instance has raised a
/// fatal error, which librdkafka reports to later calls as `_FATAL` or
/// `_STATE`), and the fatal error is not one of [`fatal_for_good`]'s.
/// Sorted by librdkafka's codes and flags, never by the message.
fn lost(producer: &Producer, e: &KafkaError, what: &str) -> Option<BatchError> {
    let instance = producer.client().fatal_error();
    let flagged = match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    };
    let code = e.rdkafka_error_code();
    if instance.is_none() && !flagged && code != Some(RDKafkaErrorCode::Fatal) {
        return None;
    }
    // The instance's own fatal error is the cause; the call's code may only
    // say that the instance is in a fatal state.
    let cause = instance.as_ref().map(|(c, _)| *c).or(code);
    if cause.is_some_and(fatal_for_good) {
        return None;
    }
    let detail = match &instance {
        Some((c, reason)) => format!("{e}; the producer's fatal error: {reason} ({c:?})"),
        None => e.to_string(),
    };
    Some(BatchError::Lost(anyhow!("cannot {what}: {detail}")))
}

/// Sorts a Kafka error into retry or stop, with a message that says why.
fn classify(e: KafkaError, what: &str) -> BatchError {
    let code = e.rdkafka_error_code();
    let fatal_hint = match code {
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => Some(
            "not allowed to write to the topic: grant WRITE on it to this user, or fix topic.prefix",
        ),
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => Some(
            "not allowed to use the transactional id: grant WRITE on it to this user",
        ),
        Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => {
            Some("not allowed to use idempotent writes: grant IDEMPOTENT_WRITE on the cluster")
        }
        Some(RDKafkaErrorCode::ProducerFenced) | Some(RDKafkaErrorCode::InvalidProducerEpoch) => Some(
            "another pg-source with the same name took over; run one instance per connector name",
        ),
        Some(RDKafkaErrorCode::QueueFull) => Some(
            "a record found no room in librdkafka's queue for 30 s: raise queue.buffering.max.kbytes above the largest row",
        ),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => Some(
            "a row is larger than the broker accepts: raise message.max.bytes on the topic and the producer",
        ),
        _ => None,
    };
    let is_fatal = match &e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    };
    match fatal_hint {
        Some(hint) => BatchError::Fatal(anyhow!("cannot {what}: {e}; {hint}")),
        None if is_fatal => BatchError::Fatal(anyhow!("cannot {what}: {e}")),
        None => BatchError::Retry(anyhow!("cannot {what}: {e}")),
    }
}

impl BatchError {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            Self::Retry(e) | Self::Fatal(e) | Self::Lost(e) => e,
            Self::Stopped => anyhow!("{}", Self::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer that never connects (librdkafka connects lazily), to
    /// sort errors by the instance's state.
    fn idle_producer() -> Producer {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .create_with_context(Acks::default())
            .expect("a producer is created without a broker")
    }

    #[test]
    fn a_fatal_state_is_cured_by_a_new_producer() {
        let p = idle_producer();
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::Fatal);
        assert!(matches!(
            lost(&p, &e, "send a batch"),
            Some(BatchError::Lost(_))
        ));
    }

    #[test]
    fn fencing_and_refusals_are_not_cured_by_a_new_producer() {
        let p = idle_producer();
        for code in [
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
        ] {
            let e = KafkaError::MessageProduction(code);
            assert!(lost(&p, &e, "send a batch").is_none(), "{code:?}");
            assert!(matches!(classify(e, "send a batch"), BatchError::Fatal(_)));
        }
        // A transient error of a healthy instance is retried, not a new
        // producer.
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(lost(&p, &e, "send a batch").is_none());
    }
}
