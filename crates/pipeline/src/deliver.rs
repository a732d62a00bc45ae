//! Delivery with retries: one event's write to its tenant's stream, tried again as the
//! retry policy says until it is written, dead-lettered or abandoned (its partition
//! revoked, or shutdown), then acknowledged to the offset tracker.
//!
//! Owns the retry windows and following a tenant's settings between attempts. Never
//! touches the consumer (no pause, seek or commit): it only tells the tracker an event
//! is done.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kd_aws::{AwsError, ErrorClass, KinesisWriter};
use kd_event::PartitionKey;
use kd_tenants::{TenantEntry, TenantSettings, TenantStore};
use tokio::time::Instant;

use crate::dead_letter::{DeadLetter, DeadLetters, Reason};
use crate::lanes::Group;
use crate::offsets::{OffsetTracker, Ticket};
use crate::panics::{retrying_panics, GaveUp};
use crate::record::Record;
use crate::retry::RetryPolicy;

/// One event on its way to Kinesis.
pub(crate) struct Job {
    pub msg: Record,
    pub ticket: Ticket,
    /// The settings the event was routed with.
    pub tenant: Arc<TenantSettings>,
    pub key: PartitionKey,
}

/// Where events are written: Kinesis (`KinesisWriter`), or a fake in the unit tests.
pub(crate) trait RecordWriter: Send + Sync + 'static {
    fn put<'a>(
        &'a self,
        tenant: &'a Arc<TenantSettings>,
        key: &'a PartitionKey,
        data: &'a Bytes,
    ) -> impl Future<Output = Result<(), AwsError>> + Send + 'a;
}

impl RecordWriter for KinesisWriter {
    async fn put(
        &self,
        tenant: &Arc<TenantSettings>,
        key: &PartitionKey,
        data: &Bytes,
    ) -> Result<(), AwsError> {
        self.put_record(tenant, key, data).await
    }
}

/// How one event's delivery ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Written,
    DeadLetter(DeadLetter),
    /// Its partition was revoked or the worker is shutting down: left unacknowledged,
    /// for the partition's next reader.
    Cancelled,
}

/// Writes one event, retrying as the policy says, following its tenant's settings.
pub(crate) struct Retrying<W> {
    pub writer: W,
    pub retry: RetryPolicy,
    /// Looked up again before each attempt: settings may change during a retry window.
    pub tenants: Arc<TenantStore>,
    /// Failing writes are logged once a minute per error code and region (a region down
    /// or black-holed fails every write to it).
    pub failures: crate::log_limit::LogLimit,
}

impl<W: RecordWriter> Retrying<W> {
    /// Writes `job` until it is written, dead-lettered or cancelled. One retry window
    /// for the event, across panics too, counted from when it was produced: neither a
    /// rebalance nor a restart starts it again.
    pub async fn write(&self, job: &Job) -> Outcome {
        let data = job.msg.payload_shared();
        self.write_record(job, &data, produced_at(&job.msg)).await
    }

    /// Writes a group of one user's consecutive events (one lane, one partition) as one
    /// aggregated record: all of them written, or all dead-lettered or cancelled
    /// together. Its retry window runs from the oldest event's production.
    pub async fn write_group(&self, jobs: &[Job]) -> Outcome {
        let Some(first) = jobs.first() else {
            return Outcome::Written;
        };
        let payloads: Vec<&[u8]> = jobs
            .iter()
            .map(|j| j.msg.payload().unwrap_or_default())
            .collect();
        let data = Bytes::from(kd_aws::aggregate::aggregate(first.key.as_str(), &payloads));
        let produced = jobs.iter().filter_map(|j| produced_at(&j.msg)).min();
        let outcome = self.write_record(first, &data, produced).await;
        if matches!(outcome, Outcome::Written) {
            let m = kd_telemetry::metrics();
            m.aggregated_user_records.inc_by(jobs.len() as u64);
            m.aggregated_kinesis_records.inc();
        }
        outcome
    }

    /// Writes `data` for `job` (its tenant, key, partition) until written, dead-lettered
    /// or cancelled.
    async fn write_record(&self, job: &Job, data: &Bytes, produced: Option<SystemTime>) -> Outcome {
        let started = Instant::now();
        let attempts = retrying_panics(&self.retry, &job.ticket.cancel, || {
            self.attempts(job, data, produced, started)
        });
        match attempts.await {
            Ok(outcome) => outcome,
            Err(GaveUp::Cancelled) => Outcome::Cancelled,
            // A write that panics every time is a bug that would otherwise hold the
            // partition's commits back for good: the event goes to the dead letters.
            Err(GaveUp::Panicked { times, message }) => Outcome::DeadLetter(
                DeadLetter::new(
                    Reason::RetriesExhausted,
                    format!("the write panicked {times} times: {message}"),
                )
                .of_source(job.tenant.source_id.as_str()),
            ),
        }
    }

    async fn attempts(
        &self,
        job: &Job,
        data: &Bytes,
        produced: Option<SystemTime>,
        started: Instant,
    ) -> Outcome {
        let mut permanent_since: Option<Instant> = None;
        // Set at the first retryable failure: `min_retry` counts from there.
        let mut give_up_at: Option<Instant> = None;
        let mut attempt = 0u32;
        let cancel = &job.ticket.cancel;
        let mut tenant = job.tenant.clone();
        loop {
            // Revoked or shutting down: leave the event to the partition's next reader.
            if cancel.is_cancelled() {
                return Outcome::Cancelled;
            }
            // Every attempt uses the settings in force now: an event may have waited in
            // its lane behind a retrying one, and one user's events must all follow a
            // change of stream together.
            match current_settings(&self.tenants, &tenant) {
                Ok(current) => {
                    if !Arc::ptr_eq(&current, &tenant) {
                        tracing::info!(source_id = %tenant.source_id, "tenant settings changed; writing with the new ones");
                        // A new role, secret, region or stream: the old ones' failures
                        // say nothing about the new ones.
                        permanent_since = None;
                        tenant = current;
                    }
                }
                Err(dl) => return Outcome::DeadLetter(dl),
            }
            // Biased: the write first (a write done is acknowledged even if the partition
            // was revoked meanwhile), and no random draw per event.
            let err = tokio::select! {
                biased;
                r = self.writer.put(&tenant, &job.key, data) => match r {
                    Ok(()) => return Outcome::Written,
                    Err(e) => e,
                },
                _ = cancel.cancelled() => return Outcome::Cancelled,
            };
            let now = Instant::now();
            let reason = match err.class {
                ErrorClass::RecordTooLarge => Some((Reason::RecordTooLarge, err.to_string())),
                ErrorClass::Permanent => {
                    let since = *permanent_since.get_or_insert(now);
                    (now - since >= self.retry.permanent_window)
                        .then(|| (Reason::DestinationRejected, err.to_string()))
                }
                ErrorClass::Retryable | ErrorClass::ExpiredCredentials => {
                    permanent_since = None;
                    let at = *give_up_at.get_or_insert_with(|| {
                        self.retry.give_up_at(produced, SystemTime::now(), now)
                    });
                    (now >= at).then(|| {
                        let tried = (now - started).as_secs();
                        let age = produced.and_then(|p| SystemTime::now().duration_since(p).ok());
                        let message = match age {
                            Some(age) => format!(
                                "still failing {}s after the event was produced ({tried}s of retries by this worker); last error {err}",
                                age.as_secs()
                            ),
                            None => format!(
                                "still failing after {tried}s of retries (the record has no usable timestamp); last error {err}"
                            ),
                        };
                        (Reason::RetriesExhausted, message)
                    })
                }
            };
            if let Some((reason, message)) = reason {
                return Outcome::DeadLetter(
                    DeadLetter::new(reason, message).of_source(tenant.source_id.as_str()),
                );
            }
            let kind = format!(
                "{}@{}",
                kd_event::text::clip(&err.code, 64),
                tenant.region.as_str()
            );
            match self.failures.due(&kind) {
                Some(passed_over) => tracing::warn!(
                    source_id = %tenant.source_id,
                    region = tenant.region.as_str(),
                    attempt,
                    error = %err,
                    failures_since_last_line = passed_over,
                    "writes failing; retrying (one line a minute per error and region)"
                ),
                None => {
                    tracing::debug!(source_id = %tenant.source_id, attempt, error = %err, "write failed; retrying")
                }
            }
            kd_telemetry::metrics().retries.inc();
            let failure = kd_status::Failure {
                code: &err.code,
                message: &err.message,
                request_id: err.request_id.as_deref(),
                throttle: err.is_shard_throttle(),
            };
            kd_status::book().retried(tenant.source_id.as_str(), &failure, || {
                job.msg.status_place()
            });
            let wait = self.retry.backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Outcome::Cancelled,
            }
        }
    }
}

/// The settings in force now for the tenant an event was routed to: the same `Arc`
/// while they did not change. A tenant removed or made invalid meanwhile is a dead
/// letter (`unknown_source`, `invalid_settings`), as its next event would be.
fn current_settings(
    tenants: &TenantStore,
    routed_with: &Arc<TenantSettings>,
) -> Result<Arc<TenantSettings>, DeadLetter> {
    let source = routed_with.source_id.as_str();
    match tenants.snapshot().get(source) {
        // The same settings (usually the very same `Arc`: a pointer comparison on the
        // per-event path; equal after a reload that changed nothing else).
        Some(TenantEntry::Valid(t)) if Arc::ptr_eq(t, routed_with) || **t == **routed_with => {
            Ok(routed_with.clone())
        }
        Some(TenantEntry::Valid(t)) => Ok(t.clone()),
        Some(TenantEntry::Invalid { reason }) => Err(DeadLetter::new(
            Reason::InvalidSettings,
            format!("settings became invalid while the event was retried: {reason}"),
        )
        .of_source(source)),
        None => Err(DeadLetter::new(
            Reason::UnknownSource,
            format!("source {source:?} was removed while its event was retried"),
        )
        .of_source(source)),
    }
}

/// Writes events with retries, then acknowledges them: written, or dead-lettered once
/// the dead letter is acknowledged by Kafka.
pub(crate) struct Deliverer {
    pub retrying: Retrying<KinesisWriter>,
    pub dead_letters: DeadLetters,
    pub tracker: Arc<OffsetTracker>,
}

impl Deliverer {
    /// Delivers a lane's group: one event, or several of one user written as one
    /// aggregated record.
    pub async fn deliver(&self, mut jobs: Group<Job>) {
        let outcome = match jobs.len() {
            0 => return,
            1 => self.retrying.write(&jobs[0]).await,
            _ => Box::pin(self.retrying.write_group(&jobs)).await,
        };
        match outcome {
            Outcome::Written => {
                let m = kd_telemetry::metrics();
                let book = kd_status::book();
                for job in &jobs {
                    m.events_delivered.inc();
                    let age = produced_at(&job.msg)
                        .and_then(|p| SystemTime::now().duration_since(p).ok());
                    if let Some(age) = age {
                        m.delivery_latency.observe(age.as_secs_f64());
                    }
                    book.delivered(job.tenant.source_id.as_str(), age);
                    if let Some(source) = kd_telemetry::source_label(job.tenant.source_id.as_str())
                    {
                        m.source_delivered.with_label_values(&[source]).inc();
                    }
                    self.tracker.done(&job.ticket);
                }
            }
            Outcome::DeadLetter(dl) => {
                // In order: a dead letter that cannot be written leaves the rest of the
                // group unacknowledged too (the partition's next reader has them all).
                for job in jobs.drain(..) {
                    // Boxed: the dead-letter producer's future is large and rarely
                    // needed, and every event's lane task would otherwise carry it.
                    if Box::pin(self.dead_letters.send(&job.msg, &dl, &job.ticket.cancel)).await {
                        self.tracker.done(&job.ticket);
                    } else {
                        break;
                    }
                }
            }
            // Not acknowledged, so it is read again by the partition's next reader.
            Outcome::Cancelled => {}
        }
    }
}

/// Whether `next` may join `group` (consecutive events of one lane) in one aggregated
/// record: its tenant aggregates, with the very settings the group was routed with (a
/// reload that turns aggregation off applies to the next event), it was read from the
/// same partition in the same assignment (one cancellation covers them all), the
/// aggregate stays within the stream's maximum record size as known now (`stream_max`:
/// the tenant's `maxRecordSizeKiB`, DescribeStreamSummary's answer, else 1 MiB, which
/// every stream accepts; a refused aggregate would take all its events to the dead
/// letters), and the group within `max_records`.
pub(crate) fn joins_aggregate(
    group: &[Job],
    next: &Job,
    max_records: usize,
    stream_max: impl FnOnce(&TenantSettings) -> usize,
) -> bool {
    let Some(first) = group.first() else {
        return false;
    };
    if !first.tenant.aggregate
        || !Arc::ptr_eq(&first.tenant, &next.tenant)
        || group.len() >= max_records
        || !first.ticket.same_assignment(&next.ticket)
    {
        return false;
    }
    let key = first.key.as_str();
    let data: usize = group
        .iter()
        .chain([next])
        .map(|j| j.msg.payload().map_or(0, <[u8]>::len))
        .sum();
    data + kd_aws::aggregate::max_overhead(key, group.len() + 1) + key.len()
        <= stream_max(&first.tenant)
}

/// When the event was produced, from its Kafka record's timestamp (create or log-append
/// time); `None` when it has none.
fn produced_at(msg: &Record) -> Option<SystemTime> {
    let millis = u64::try_from(msg.timestamp().to_millis()?).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests;
