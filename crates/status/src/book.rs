//! This pod's accounting: per tenant (source ID) and window, what arrived, what was
//! written, what failed and why. The pipeline calls the hooks as events move; every
//! window the publisher closes the windows into status records.
//!
//! Memory: a tenant without traffic in the open window keeps its key (shared with its
//! settings), the times of its last delivery, failure and traffic, its last state and
//! its last error; one with traffic also a [`Tally`] (fixed size, plus one entry per
//! dead-letter reason and AWS error code seen, both bounded sets, and at most
//! [`SAMPLES_PER_WINDOW`] samples). A tenant without traffic for [`FORGET_AFTER`] is
//! dropped.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashMap;
use serde::Serialize;

use crate::record::{
    latency_bucket, Counts, LastError, Sample, StatusRecord, LATENCY_BUCKETS, VERSION,
};
use crate::state::State;
use crate::time::{now_secs, rfc3339};

/// Failures kept as samples per tenant and window.
pub const SAMPLES_PER_WINDOW: usize = 3;
/// A tenant without traffic this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// An idle tenant's last error is kept this long (it is in the status topic after).
pub const ERROR_KEPT: Duration = Duration::from_secs(600);
/// A dead letter after retries keeps an AWS error at most this old as the last error
/// (the one that caused it); an older one says nothing about this dead letter.
const CAUSE_WITHIN: Duration = Duration::from_secs(600);
/// Longest error message kept, in characters.
const MESSAGE_CHARS: usize = 300;
const SHARDS: usize = 32;

/// One shard of the book: tenants whose source ID hashes to it.
type Shard = Mutex<HashMap<Arc<str>, Account>>;

pub struct StatusBook {
    shards: Box<[Shard]>,
    // Picks the shard; independent of the maps' own hashers, so the keys of one shard
    // do not share their low hash bits inside its map.
    hasher: foldhash::quality::RandomState,
    pod: String,
    window_secs: AtomicU64,
}

struct Account {
    window: Option<Box<Tally>>,
    /// Seconds since the epoch; 0 for never.
    last_traffic: u64,
    last_delivery: u64,
    last_failure: u64,
    last_error: Option<Box<ErrorNote>>,
    /// The state of the last window closed.
    state: State,
}

/// One open window's counts.
#[derive(Default)]
struct Tally {
    received: u64,
    delivered: u64,
    throttled: u64,
    latency: [u32; LATENCY_BUCKETS],
    dead_lettered: Vec<(&'static str, u64)>,
    retried: Vec<(Box<str>, u64)>,
    samples: Vec<Sample>,
}

#[derive(Clone)]
struct ErrorNote {
    code: Box<str>,
    message: Box<str>,
    request_id: Option<Box<str>>,
    at: u64,
}

impl ErrorNote {
    fn to_last_error(&self) -> LastError {
        LastError {
            code: self.code.to_string(),
            message: self.message.to_string(),
            request_id: self.request_id.as_ref().map(|r| r.to_string()),
            at: rfc3339(self.at),
        }
    }
}

/// A failed write attempt, as the writer saw it.
pub struct Failure<'a> {
    /// The AWS error code (or the fixed word for a failure without one).
    pub code: &'a str,
    pub message: &'a str,
    pub request_id: Option<&'a str>,
    /// Refused for throughput.
    pub throttle: bool,
}

/// Where a failed event was read (for a sample).
pub struct Place {
    pub message_id: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// This pod's view of one tenant, for `GET /tenants/{sourceId}`.
#[derive(Serialize, Debug)]
pub struct PodView {
    pub source_id: String,
    pub pod: String,
    /// The open window's state when something was written or failed in it, else the
    /// last closed window's.
    pub state: State,
    /// The open window so far.
    pub window_start: String,
    pub window_secs: u64,
    pub current: Counts,
    pub last_delivery: Option<String>,
    pub last_failure: Option<String>,
    pub last_error: Option<LastError>,
    pub samples: Vec<Sample>,
}

impl Default for StatusBook {
    fn default() -> Self {
        StatusBook::new(pod_name(), Duration::from_secs(60))
    }
}

impl StatusBook {
    pub fn new(pod: String, window: Duration) -> Self {
        StatusBook {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::quality::RandomState::default(),
            pod,
            window_secs: AtomicU64::new(window.as_secs().max(1)),
        }
    }

    pub fn set_window(&self, window: Duration) {
        self.window_secs
            .store(window.as_secs().max(1), Ordering::Relaxed);
    }

    pub fn window_secs(&self) -> u64 {
        self.window_secs.load(Ordering::Relaxed)
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }

    fn shard(&self, source: &str) -> MutexGuard<'_, HashMap<Arc<str>, Account>> {
        let i = self.hasher.hash_one(source) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the open window of `source`, adding the tenant when `add` is given.
    fn with(
        &self,
        source: &str,
        add: Option<&Arc<str>>,
        f: impl FnOnce(&mut Account, &mut Tally, u64),
    ) {
        let now = now_secs();
        let mut shard = self.shard(source);
        let account = match (shard.get_mut(source), add) {
            (Some(a), _) => a,
            (None, Some(shared)) => shard.entry(shared.clone()).or_insert_with(Account::new),
            (None, None) => return,
        };
        account.last_traffic = now;
        let mut tally = account.window.take().unwrap_or_default();
        f(account, &mut tally, now);
        account.window = Some(tally);
    }

    /// An event was read for `source`.
    pub fn received(&self, source: &Arc<str>) {
        self.with(source, Some(source), |_, t, _| {
            t.received = t.received.saturating_add(1)
        });
    }

    /// An event of `source` was written, `latency` after it was produced. Like the hooks
    /// below, counted for a tenant whose event was [received](Self::received) here.
    pub fn delivered(&self, source: &str, latency: Option<Duration>) {
        self.with(source, None, |a, t, now| {
            t.delivered = t.delivered.saturating_add(1);
            if let Some(l) = latency {
                let b = &mut t.latency[latency_bucket(l.as_millis() as u64)];
                *b = b.saturating_add(1);
            }
            a.last_delivery = now;
        });
    }

    /// A write attempt of `source` failed and will be tried again.
    pub fn retried(&self, source: &str, failure: &Failure<'_>, place: impl FnOnce() -> Place) {
        self.with(source, None, |a, t, now| {
            match t.retried.iter_mut().find(|(c, _)| &**c == failure.code) {
                Some((_, n)) => *n += 1,
                None => t.retried.push((failure.code.into(), 1)),
            }
            if failure.throttle {
                t.throttled += 1;
            }
            a.failed(now, failure.code, failure.message, failure.request_id);
            t.sample(now, "retrying", failure.code, failure.message, place);
        });
    }

    /// An event of `source` was dead-lettered (the dead letter acknowledged). Counted
    /// only for tenants this pod already accounts for: a dead letter's source ID may be
    /// anything an outsider sent.
    pub fn dead_lettered(
        &self,
        source: &str,
        reason: &'static str,
        error: &str,
        place: impl FnOnce() -> Place,
    ) {
        self.with(source, None, |a, t, now| {
            match t.dead_lettered.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => t.dead_lettered.push((reason, 1)),
            }
            // After retries, the last AWS error is what the tenant needs to see (the
            // dead letter's own error repeats it); other reasons are errors of their own.
            let after_retries = matches!(reason, "destination_rejected" | "retries_exhausted");
            let recent = a
                .last_error
                .as_ref()
                .is_some_and(|e| now.saturating_sub(e.at) <= CAUSE_WITHIN.as_secs());
            if after_retries && recent {
                a.last_failure = now;
            } else {
                a.failed(now, reason, error, None);
            }
            t.sample(now, reason, "", error, place);
        });
    }

    /// Closes every open window into a record (tenants with traffic in it), labelled as
    /// the `window_secs` from `window_start`; forgets tenants idle for [`FORGET_AFTER`]
    /// (and an idle tenant's last error after [`ERROR_KEPT`]); sets the state gauge.
    /// Under each shard's lock only the windows are taken; records are built after.
    pub fn close(&self, window_start: u64, window_secs: u64) -> Vec<StatusRecord> {
        self.close_windows(true)
            .into_iter()
            .map(|c| c.record(&self.pod, window_start, window_secs))
            .collect()
    }

    /// [`close`](Self::close) without making records, for a pod with no status topic:
    /// the states, the gauge and forgetting are the same, and nothing is kept of the
    /// windows (a window of 100,000 active tenants' records is about 30 MB).
    pub fn close_without_records(&self) {
        self.close_windows(false);
    }

    /// Closes every open window; the closed ones are returned only `with_records`.
    fn close_windows(&self, with_records: bool) -> Vec<Closed> {
        let now = now_secs();
        let mut closed: Vec<Closed> = Vec::new();
        let mut states = [0i64; State::ALL.len()];
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|source, a| {
                a.state = match a.window.take() {
                    Some(tally) => {
                        let state = tally.state();
                        if with_records {
                            closed.push(Closed {
                                source: source.clone(),
                                tally,
                                last_delivery: a.last_delivery,
                                last_failure: a.last_failure,
                                last_error: a.last_error.clone(),
                            });
                        }
                        state
                    }
                    None => State::Idle,
                };
                let stale_error = a
                    .last_error
                    .as_ref()
                    .is_some_and(|e| now.saturating_sub(e.at) > ERROR_KEPT.as_secs());
                if a.state == State::Idle && stale_error {
                    a.last_error = None;
                }
                let keep = a.state != State::Idle
                    || now.saturating_sub(a.last_traffic) < FORGET_AFTER.as_secs();
                if keep {
                    states[a.state.index()] += 1;
                }
                keep
            });
            if shard.capacity() > 2 * shard.len() + 64 {
                shard.shrink_to_fit();
            }
        }
        let gauge = &kd_telemetry::metrics().tenants;
        for (state, n) in State::ALL.iter().zip(states) {
            gauge.with_label_values(&[state.as_str()]).set(n);
        }
        closed
    }

    /// This pod's view of `source`, if it had traffic here within [`FORGET_AFTER`].
    pub fn view(&self, source: &str) -> Option<PodView> {
        let window_secs = self.window_secs();
        let start = now_secs() / window_secs * window_secs;
        let shard = self.shard(source);
        let a = shard.get(source)?;
        let current = a.window.as_deref().map(Tally::counts).unwrap_or_default();
        let open = State::of(&current);
        Some(PodView {
            source_id: source.to_owned(),
            pod: self.pod.clone(),
            state: if current.delivered + current.dead_lettered_total() + current.retried_total()
                > 0
            {
                open
            } else {
                a.state
            },
            window_start: rfc3339(start),
            window_secs,
            current,
            last_delivery: time(a.last_delivery),
            last_failure: time(a.last_failure),
            last_error: a.last_error(),
            samples: a
                .window
                .as_ref()
                .map(|t| t.samples.clone())
                .unwrap_or_default(),
        })
    }

    /// Tenants accounted for now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Account {
    fn new() -> Self {
        Account {
            window: None,
            last_traffic: 0,
            last_delivery: 0,
            last_failure: 0,
            last_error: None,
            state: State::Idle,
        }
    }

    fn failed(&mut self, now: u64, code: &str, message: &str, request_id: Option<&str>) {
        self.last_failure = now;
        self.last_error = Some(Box::new(ErrorNote {
            code: kd_event::text::escape_clip(code, 64).into(),
            message: line(message).into(),
            request_id: request_id.map(|r| kd_event::text::escape_clip(r, 64).into()),
            at: now,
        }));
    }

    fn last_error(&self) -> Option<LastError> {
        self.last_error.as_deref().map(ErrorNote::to_last_error)
    }
}

/// A window taken out of the book, to be made a record outside its lock.
struct Closed {
    source: Arc<str>,
    tally: Box<Tally>,
    last_delivery: u64,
    last_failure: u64,
    last_error: Option<Box<ErrorNote>>,
}

impl Closed {
    fn record(self, pod: &str, window_start: u64, window_secs: u64) -> StatusRecord {
        let Closed {
            source,
            tally,
            last_delivery,
            last_failure,
            last_error,
        } = self;
        let counts = tally.counts();
        StatusRecord {
            v: VERSION,
            source_id: source.to_string(),
            pod: pod.to_owned(),
            window_start: rfc3339(window_start),
            window_secs,
            counts,
            last_delivery: time(last_delivery),
            last_failure: time(last_failure),
            last_error: last_error.as_deref().map(ErrorNote::to_last_error),
            samples: tally.samples,
        }
    }
}

impl Tally {
    /// The window's state (as [`State::of`] its counts).
    fn state(&self) -> State {
        let failed = !self.dead_lettered.is_empty() || !self.retried.is_empty();
        match (failed, self.delivered > 0) {
            (true, true) => State::Degraded,
            (true, false) => State::Failing,
            (false, _) if self.delivered > 0 || self.received > 0 => State::Delivering,
            (false, _) => State::Idle,
        }
    }

    fn counts(&self) -> Counts {
        let mut c = Counts {
            received: self.received,
            delivered: self.delivered,
            throttled: self.throttled,
            ..Counts::default()
        };
        for (reason, n) in &self.dead_lettered {
            c.dead_lettered.insert((*reason).to_owned(), *n);
        }
        for (code, n) in &self.retried {
            c.retried.insert(code.to_string(), *n);
        }
        for (to, from) in c.latency_ms.counts.iter_mut().zip(self.latency) {
            *to = u64::from(from);
        }
        c
    }

    /// Keeps a sample of this failure while the window has room: a dead letter takes
    /// the place of a retried attempt's sample when it is full (the dead letter is the
    /// failure that lost the event its delivery).
    fn sample(
        &mut self,
        now: u64,
        reason: &str,
        code: &str,
        message: &str,
        place: impl FnOnce() -> Place,
    ) {
        let retrying = reason == "retrying";
        let slot = if self.samples.len() < SAMPLES_PER_WINDOW {
            None
        } else if retrying {
            return;
        } else {
            match self.samples.iter().position(|s| s.reason == "retrying") {
                Some(i) => Some(i),
                None => return,
            }
        };
        let place = place();
        let error = if code.is_empty() {
            line(message)
        } else {
            line(&format!("{code}: {message}"))
        };
        let sample = Sample {
            message_id: place
                .message_id
                .map(|m| kd_event::text::escape_clip(&m, 128)),
            topic: place.topic,
            partition: place.partition,
            offset: place.offset,
            reason: reason.to_owned(),
            error,
            at: rfc3339(now),
        };
        match slot {
            Some(i) => self.samples[i] = sample,
            None => self.samples.push(sample),
        }
    }
}

/// A message as one line of at most [`MESSAGE_CHARS`] characters, cut before anything
/// that could be a request's signing material (an AWS answer that quotes the request it
/// refused, such as `SignatureDoesNotMatch`'s canonical request).
fn line(message: &str) -> String {
    let flat = kd_event::text::one_line(message);
    let lower = flat.to_ascii_lowercase();
    let cut = [
        "x-amz-security-token",
        "credential=",
        "signature=",
        "authorization",
    ]
    .iter()
    .filter_map(|needle| lower.find(needle))
    .min()
    .unwrap_or(flat.len());
    let kept = kd_event::text::clip(&flat[..cut], MESSAGE_CHARS);
    if cut < flat.len() {
        format!("{kept}[request details not kept]")
    } else {
        kept.to_owned()
    }
}

fn time(secs: u64) -> Option<String> {
    (secs > 0).then(|| rfc3339(secs))
}

/// The pod's name: `HOSTNAME` (Kubernetes sets it to the pod's name), else the host's.
pub fn pod_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| kd_event::text::escape_clip(h.trim(), 128))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests;
