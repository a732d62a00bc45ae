//! The consume loop: reads each event, routes it to its tenant, admits it to the offset
//! tracker (or skips it, for fairness) and hands it to its lane, or to the dead letters;
//! between events, the flow-control tick.
//!
//! Owns the consumer's read side until shutdown. Never commits (see `commits`) and never
//! writes to Kinesis (see `deliver`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kd_event::PartitionKey;
use kd_tenants::{SourceId, TenantStore};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

use crate::callbacks::{consumer_error, WorkerContext};
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::deliver::Job;
use crate::flow::FlowControl;
use crate::lanes::{Group, Lanes};
use crate::log_limit::LogLimit;
use crate::offsets::{Admission, OffsetTracker};
use crate::reading::{Reading, Sight};
use crate::record::Record;
use crate::route::{route, Routed, SourceIdFrom};

/// One user's lane: events of one tenant with one partition key, written in order.
pub(crate) type Lane = (SourceId, PartitionKey);

pub(crate) struct ConsumeLoop<F, G> {
    pub consumer: Arc<StreamConsumer<WorkerContext>>,
    /// The names of the topics read from (those subscribed to, and any a pattern
    /// subscription brings, once seen): shared by the records read from them.
    pub topics: std::sync::Mutex<Vec<Arc<str>>>,
    pub tracker: Arc<OffsetTracker>,
    /// Looked up for every event.
    pub tenants: Arc<TenantStore>,
    pub source_id_from: SourceIdFrom,
    pub flow: FlowControl,
    /// Where routed events go, one lane per user.
    pub lanes: Arc<Lanes<Lane, Job, F, G>>,
    /// Where events that cannot be routed go.
    pub dead_letters: DeadLetters,
    /// Limits fetch-error lines to one a minute per kind.
    pub errors: Arc<LogLimit>,
}

impl<F, G, Fut> ConsumeLoop<F, G>
where
    F: Fn(Group<Job>) -> Fut + Send + Sync + 'static,
    G: Fn(&[Job], &Job) -> bool + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    /// Reads and dispatches events until `shutdown` is cancelled.
    pub async fn run(&self, shutdown: &CancellationToken) {
        // The tick resumes drained partitions and reads skipped events again (also
        // woken early when a paused partition drains, see `OffsetTracker::drained`).
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut reading = Reading::Open;
        let mut last_stuck_check = None;
        loop {
            // The loop runs on one of the runtime's workers, and librdkafka's queue has
            // an event ready for as long as a backlog lasts: give the worker back to the
            // lane tasks it spawned every so often (tokio's cooperative budget).
            tokio::task::consume_budget().await;
            let now = Instant::now();
            reading = self.move_to(
                reading,
                reading.next(Sight {
                    flow: &self.flow,
                    tracker: &self.tracker,
                    now,
                    last_stuck_check: &mut last_stuck_check,
                }),
            );
            let hold = reading.holding_since().is_some();
            // librdkafka must be polled within max.poll.interval.ms or it leaves the
            // group: a long hold pauses every partition instead, and reads (nothing).
            let long_hold = reading.long_hold(now);
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.flow.reread_drained(&*self.consumer, &self.tracker);
                    self.flow.pause_and_resume(&*self.consumer, &self.tracker, long_hold);
                    ticks += 1;
                    if ticks.is_multiple_of(10) {
                        self.tracker.publish_oldest_in_flight();
                        self.report_positions();
                    }
                    continue;
                }
                m = self.consumer.recv(), if !hold || long_hold => m,
                _ = self.tracker.drained() => {
                    self.flow.pause_and_resume(&*self.consumer, &self.tracker, long_hold);
                    continue;
                }
            };
            match msg {
                Ok(m) => {
                    let topic = self.topic(m.topic());
                    self.dispatch(Record::from_kafka(&m, topic), long_hold)
                }
                Err(e) => {
                    // An undecodable batch or a partition the broker will not serve
                    // repeats at every fetch.
                    consumer_error(&self.errors, &e, "fetch");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Tells the tracker what the move from reading state `from` to `to` changes: stuck
    /// tenants skipped everywhere or no longer, and while holding (at every turn: the
    /// level to read again at changes with the overdraft) where holding ends.
    fn move_to(&self, from: Reading, to: Reading) -> Reading {
        if from.past_stuck() != to.past_stuck() {
            self.tracker.set_contended_everywhere(to.past_stuck());
        }
        match to.holding_since() {
            Some(_) => self.tracker.set_holding(Some(to.resume_at(&self.flow))),
            None if from.holding_since().is_some() => self.tracker.set_holding(None),
            None => {}
        }
        to
    }

    /// Tells the tracker where librdkafka's reading stands in each partition, so that
    /// commits move past the transaction markers and aborted records it passed over
    /// (see [`OffsetTracker::passed`]). Here, between reads, and nowhere else: every
    /// event below a position has then been admitted.
    fn report_positions(&self) {
        let positions = match crate::kafka::blocking(|| self.consumer.position()) {
            Ok(positions) => positions,
            Err(e) => {
                consumer_error(&self.errors, &e, "position");
                return;
            }
        };
        for p in positions.elements() {
            if let rdkafka::Offset::Offset(position) = p.offset() {
                self.tracker.passed(p.topic(), p.partition(), position);
            }
        }
    }

    /// The shared name of `topic`.
    fn topic(&self, topic: &str) -> Arc<str> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        match topics.iter().find(|t| ***t == *topic) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = Arc::from(topic);
                topics.push(shared.clone());
                shared
            }
        }
    }

    /// Counts a handled event in its tenant's status: a tenant routed to, or one whose
    /// settings are known but refused the event (invalid settings, no partition key).
    /// Source IDs no tenant has are not accounted for: anyone may send them.
    fn account_received(&self, source: Option<&Arc<str>>, routed: &Result<Routed, DeadLetter>) {
        let book = kd_status::book();
        match (source, routed) {
            (Some(source), _) => book.received(source),
            (None, Err(dl)) => {
                if let Some(source) = dl.source.as_deref() {
                    if self.tenants.snapshot().get(source).is_some() {
                        book.received(&Arc::from(source));
                    }
                }
            }
            (None, Ok(_)) => {}
        }
    }

    /// Routes one event and hands it on, unless the tracker says it is not to be
    /// handled (skipped for fairness, already handled, or of a partition not ours).
    fn dispatch(&self, msg: Record, long_hold: bool) {
        let routed = route(&msg, &self.tenants.snapshot(), &self.source_id_from);
        let source = routed.as_ref().ok().map(|r| r.tenant.source_id.shared());
        let bytes = msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len);
        let (ticket, partition_held) = match self.tracker.admit(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            bytes,
            source.as_ref(),
            self.flow.fairness,
        ) {
            Admission::Handle(ticket, held) => (ticket, held),
            // Read again after a skip, or not ours: nothing to do (not even count it).
            other => {
                if matches!(other, Admission::Skip) {
                    kd_telemetry::metrics().fairness_skips.inc();
                }
                tracing::trace!(offset = msg.offset(), partition = msg.partition(), admission = ?other, "not handled");
                return;
            }
        };
        kd_telemetry::metrics().events_received.inc();
        self.account_received(source.as_ref(), &routed);
        if self
            .flow
            .reached(&self.tracker, msg.topic(), msg.partition(), partition_held)
        {
            self.flow
                .pause_and_resume(&*self.consumer, &self.tracker, long_hold);
        }
        match routed {
            Ok(routed) => {
                let lane = (routed.tenant.source_id.clone(), routed.key.clone());
                self.lanes.push(
                    lane,
                    Job {
                        msg,
                        ticket,
                        tenant: routed.tenant,
                        key: routed.key,
                    },
                );
            }
            Err(dl) => {
                let (dead_letters, tracker) = (self.dead_letters.clone(), self.tracker.clone());
                tokio::spawn(async move {
                    if dead_letters.send(&msg, &dl, &ticket.cancel).await {
                        tracker.done(&ticket);
                    }
                });
            }
        }
    }
}
