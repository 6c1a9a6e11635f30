//! The transactional Kafka producer.
//!
//! Each batch of rows and the source position that covers it are written in
//! one Kafka transaction: either both become visible to `read_committed`
//! readers or neither does. On start, `init_transactions` fences any older
//! instance with the same `transactional.id` and aborts its open transaction,
//! so a crashed pg-source never leaves half a batch behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use tidemark_common::kafka::KafkaSettings;

/// How long a transaction step may take before it is treated as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// One record to produce.
#[derive(Debug, Clone)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Key bytes.
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
}

/// Counts acknowledgements, so a batch waits for exactly its own.
#[derive(Default)]
pub struct Acks {
    done: AtomicU64,
    first_error: Mutex<Option<KafkaError>>,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut slot = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.clone());
        }
        self.done.fetch_add(1, Ordering::Release);
    }
}

/// A transactional producer. Batches are sent from a blocking thread that
/// also serves the producer's delivery reports, so nothing else polls it.
#[derive(Clone)]
pub struct TxProducer {
    producer: Arc<BaseProducer<Acks>>,
}

impl TxProducer {
    /// Creates the producer and initialises transactions, fencing any older
    /// instance with the same `transactional.id`.
    ///
    /// Fails when the brokers cannot be reached in time or refuse the
    /// transactional id.
    pub async fn new(settings: &KafkaSettings, transactional_id: &str) -> anyhow::Result<Self> {
        let producer: BaseProducer<Acks> = settings
            .client_config(&[
                ("transactional.id", transactional_id),
                ("enable.idempotence", "true"),
                ("acks", "all"),
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
            ])
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
        Ok(Self { producer })
    }

    /// Produces `records` and then `position` in one transaction and commits
    /// it. When this returns `Ok`, Kafka has acknowledged every record.
    ///
    /// Fails with [`BatchError::Retry`] when the transaction was aborted, and
    /// with [`BatchError::Fatal`] when the producer cannot continue.
    pub async fn send_batch(
        &self,
        records: Vec<Record>,
        position: Record,
    ) -> Result<(), BatchError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || send_blocking(&producer, records, &position))
            .await
            .map_err(|e| BatchError::Fatal(anyhow!("producer task failed: {e}")))?
    }
}

fn send_blocking(
    producer: &BaseProducer<Acks>,
    records: Vec<Record>,
    position: &Record,
) -> Result<(), BatchError> {
    let acks = producer.context();
    let mut topics: Vec<String> = records
        .iter()
        .chain(std::iter::once(position))
        .map(|r| r.topic.clone())
        .collect();
    topics.sort_unstable();
    topics.dedup();
    let committed_anyway = std::cell::Cell::new(false);
    let run = || -> Result<(), KafkaError> {
        producer.begin_transaction()?;
        let start = acks.done.load(Ordering::Acquire);
        let mut sent = 0u64;
        // librdkafka copies each record: drop ours once it is queued, so a
        // batch is held once, not twice.
        for r in records.into_iter().chain(std::iter::once(position.clone())) {
            let mut rec = BaseRecord::to(&r.topic).key(&r.key);
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
                        producer.poll(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        // Serve delivery reports until every record of the batch is
        // acknowledged. Committing with nothing outstanding returns at once,
        // where rust-rdkafka's flush inside the commit would sleep in 100 ms
        // steps while anything is still in flight.
        let deadline = std::time::Instant::now() + TXN_TIMEOUT;
        while acks.done.load(Ordering::Acquire) - start < sent {
            if std::time::Instant::now() > deadline {
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                ));
            }
            producer.poll(Duration::from_millis(1));
        }
        if let Some(e) = acks
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(transaction_cause(producer, e, &committed_anyway));
        }
        producer.commit_transaction(TXN_TIMEOUT)
    };
    let result = run();
    if committed_anyway.get() {
        return Err(BatchError::Fatal(anyhow!(
            "Kafka committed a transaction to {} although some of its records were not delivered; stopping, so that nothing is sent past them (a restart sends the batch again)",
            topics.join(", ")
        )));
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            let err = classify(e, &format!("commit a batch to {}", topics.join(", ")));
            if let BatchError::Retry(_) = &err {
                abort(producer)?;
            }
            Err(err)
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
    producer: &BaseProducer<Acks>,
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
/// unreachable before giving up (and exiting, to be restarted).
const ABORT_PATIENCE: Duration = Duration::from_secs(300);

/// Aborts the open transaction, waiting out a broker restart.
///
/// librdkafka aborts only once every in-flight record has a delivery report,
/// and with a `BaseProducer` nothing serves those reports unless this thread
/// does, so it polls them first.
fn abort(producer: &BaseProducer<Acks>) -> Result<(), BatchError> {
    let deadline = std::time::Instant::now() + ABORT_PATIENCE;
    let mut logged = false;
    loop {
        let drained = std::time::Instant::now() + TXN_TIMEOUT;
        while producer.in_flight_count() > 0 && std::time::Instant::now() < drained {
            producer.poll(Duration::from_millis(10));
        }
        match producer.abort_transaction(TXN_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e))
                if e.is_retriable() && std::time::Instant::now() < deadline =>
            {
                if !logged {
                    tracing::warn!(error = %e, "cannot abort the failed transaction yet; retrying");
                    logged = true;
                }
            }
            Err(e) => return Err(match classify(e, "abort a failed transaction") {
                BatchError::Retry(e) => BatchError::Fatal(e.context(
                    "Kafka stayed unreachable; exiting so that a restart starts a fresh producer",
                )),
                fatal => fatal,
            }),
        }
    }
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
            Self::Retry(e) | Self::Fatal(e) => e,
        }
    }
}
