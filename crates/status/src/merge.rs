//! Adding status records up: every pod's record of a window, and the windows of a range,
//! per tenant. A tenant whose events all pods saw is the sum of its records.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::record::{Counts, LastError, Sample, StatusRecord, VERSION};
use crate::state::State;
use crate::time::{parse_rfc3339, rfc3339};

/// A tenant's state is judged on this last stretch of the range.
pub const RECENT_SECS: u64 = 300;
/// Samples kept per tenant (the newest).
const SAMPLES_KEPT: usize = 20;

/// Records of a range, per tenant.
pub struct Merged {
    /// The range's end (usually now): what `RECENT_SECS` counts back from.
    pub until: u64,
    pub since: u64,
    /// Rows of the series: a minute, or an hour for long ranges.
    pub bucket_secs: u64,
    pub tenants: BTreeMap<String, History>,
    /// Records of another version or unreadable (counted, not shown).
    pub skipped: u64,
    /// Only totals, the recent counts and the last error per tenant (no series, no
    /// samples): the list of all tenants, at a bounded cost per tenant.
    pub totals_only: bool,
}

/// One tenant over the range.
#[derive(Default)]
pub struct History {
    pub buckets: BTreeMap<u64, Counts>,
    pub total: Counts,
    /// The records of the last [`RECENT_SECS`].
    pub recent: Counts,
    pub pods: BTreeSet<String>,
    pub last_delivery: Option<u64>,
    pub last_failure: Option<u64>,
    pub last_error: Option<LastError>,
    pub samples: Vec<Sample>,
}

impl Merged {
    pub fn new(since: u64, until: u64, bucket_secs: u64) -> Self {
        Merged {
            until,
            since,
            bucket_secs: bucket_secs.max(1),
            tenants: BTreeMap::new(),
            skipped: 0,
            totals_only: false,
        }
    }

    /// Adds a record read from the topic (its key and value). Records outside the
    /// range, of another version, unreadable, or whose key is not their source ID
    /// (written by something else than a pod) are passed over.
    pub fn add_json(&mut self, key: &[u8], value: &[u8]) {
        match serde_json::from_slice::<StatusRecord>(value) {
            Ok(r) if r.v == VERSION && r.source_id.as_bytes() == key => self.add(r),
            _ => self.skipped += 1,
        }
    }

    pub fn add(&mut self, r: StatusRecord) {
        let Some(start) = parse_rfc3339(&r.window_start) else {
            self.skipped += 1;
            return;
        };
        let end = start.saturating_add(r.window_secs);
        if end <= self.since || start > self.until {
            return;
        }
        let h = self.tenants.entry(r.source_id).or_default();
        if !self.totals_only {
            let bucket = start / self.bucket_secs * self.bucket_secs;
            h.buckets.entry(bucket).or_default().add(&r.counts);
        }
        h.total.add(&r.counts);
        if end + RECENT_SECS > self.until {
            h.recent.add(&r.counts);
        }
        h.pods.insert(r.pod);
        let latest =
            |a: Option<u64>, b: &Option<String>| a.max(b.as_deref().and_then(parse_rfc3339));
        h.last_delivery = latest(h.last_delivery, &r.last_delivery);
        h.last_failure = latest(h.last_failure, &r.last_failure);
        if let Some(e) = r.last_error {
            let newer = h
                .last_error
                .as_ref()
                .is_none_or(|old| parse_rfc3339(&old.at) <= parse_rfc3339(&e.at));
            if newer {
                h.last_error = Some(e);
            }
        }
        if !self.totals_only {
            h.samples.extend(r.samples);
        }
        if h.samples.len() > SAMPLES_KEPT * 2 {
            h.trim_samples();
        }
    }

    /// Tenants by failures in the range (most first), at most `n`.
    pub fn most_failing(&self, n: usize) -> Vec<(&str, &History)> {
        let mut all: Vec<_> = self.tenants.iter().map(|(s, h)| (s.as_str(), h)).collect();
        all.sort_by_key(|(s, h)| {
            (
                std::cmp::Reverse(h.total.dead_lettered_total() + h.total.retried_total()),
                h.state(),
                *s,
            )
        });
        all.truncate(n);
        all
    }

    /// What `status --format json` prints for one tenant, and the page shows.
    pub fn summary(&self, source: &str) -> Summary {
        let empty = History::default();
        let h = self.tenants.get(source).unwrap_or(&empty);
        let mut samples = h.samples.clone();
        samples.sort_by(|a, b| b.at.cmp(&a.at));
        samples.truncate(SAMPLES_KEPT);
        // Every bucket of the range, empty ones too (a chart's gaps are news).
        let first = self.since / self.bucket_secs * self.bucket_secs;
        let series = (first..=self.until)
            .step_by(self.bucket_secs as usize)
            .map(|start| Point::of(start, h.buckets.get(&start)))
            .collect();
        Summary {
            source_id: source.to_owned(),
            state: h.state(),
            since: rfc3339(self.since),
            until: rfc3339(self.until),
            pods: h.pods.iter().cloned().collect(),
            total: h.total.clone(),
            success_rate: h.total.success_rate(),
            latency_ms: Percentiles::of(&h.total),
            last_delivery: h.last_delivery.map(rfc3339),
            last_failure: h.last_failure.map(rfc3339),
            last_error: h.last_error.clone(),
            samples,
            bucket_secs: self.bucket_secs,
            series,
        }
    }
}

impl History {
    /// The state of the last [`RECENT_SECS`] of the range (`idle` without records then).
    pub fn state(&self) -> State {
        State::of(&self.recent)
    }

    fn trim_samples(&mut self) {
        self.samples.sort_by(|a, b| b.at.cmp(&a.at));
        self.samples.truncate(SAMPLES_KEPT);
    }
}

#[derive(Serialize, Debug)]
pub struct Summary {
    pub source_id: String,
    pub state: State,
    pub since: String,
    pub until: String,
    pub pods: Vec<String>,
    pub total: Counts,
    pub success_rate: Option<f64>,
    pub latency_ms: Percentiles,
    pub last_delivery: Option<String>,
    pub last_failure: Option<String>,
    pub last_error: Option<LastError>,
    pub samples: Vec<Sample>,
    pub bucket_secs: u64,
    pub series: Vec<Point>,
}

#[derive(Serialize, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
}

impl Percentiles {
    pub fn of(c: &Counts) -> Self {
        Percentiles {
            p50: c.latency_quantile_ms(0.50),
            p95: c.latency_quantile_ms(0.95),
            p99: c.latency_quantile_ms(0.99),
        }
    }
}

/// One row of a tenant's series.
#[derive(Serialize, Debug, PartialEq)]
pub struct Point {
    pub start: String,
    #[serde(skip)]
    pub start_secs: u64,
    pub received: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub retried: u64,
    pub throttled: u64,
    pub p95_ms: Option<u64>,
}

impl Point {
    fn of(start: u64, c: Option<&Counts>) -> Self {
        let empty = Counts::default();
        let c = c.unwrap_or(&empty);
        Point {
            start: rfc3339(start),
            start_secs: start,
            received: c.received,
            delivered: c.delivered,
            dead_lettered: c.dead_lettered_total(),
            retried: c.retried_total(),
            throttled: c.throttled,
            p95_ms: c.latency_quantile_ms(0.95),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(source: &str, pod: &str, start: u64, delivered: u64, denied: u64) -> StatusRecord {
        let mut r = StatusRecord {
            v: VERSION,
            source_id: source.into(),
            pod: pod.into(),
            window_start: rfc3339(start),
            window_secs: 60,
            ..Default::default()
        };
        r.counts.received = delivered + denied;
        r.counts.delivered = delivered;
        if denied > 0 {
            r.counts.retried.insert("AccessDenied".into(), denied);
            r.last_error = Some(LastError {
                code: "AccessDenied".into(),
                message: format!("denied on {pod}"),
                request_id: None,
                at: rfc3339(start + 30),
            });
        }
        r
    }

    #[test]
    fn pods_and_windows_add_up_and_the_state_is_the_recent_one() {
        let t0 = 1_800_000_000;
        let mut m = Merged::new(t0, t0 + 600, 60);
        m.add(record("a", "pod-1", t0, 10, 0));
        m.add(record("a", "pod-2", t0, 5, 0));
        m.add(record("a", "pod-1", t0 + 540, 7, 0));
        m.add(record("b", "pod-1", t0, 4, 0));
        m.add(record("b", "pod-2", t0 + 480, 0, 3));
        m.add(record("b", "pod-1", t0 + 540, 0, 2));
        m.add(record("old", "pod-1", t0 - 600, 1, 0));
        m.add_json(b"future", br#"{"v":2,"source_id":"future"}"#);
        m.add_json(b"x", b"not json");
        let forged = serde_json::to_vec(&record("a", "pod-9", t0, 1000, 0)).unwrap();
        m.add_json(b"someone-else", &forged);
        assert_eq!(
            m.skipped, 3,
            "another version, not JSON, a key not its source"
        );
        assert!(!m.tenants.contains_key("old"), "out of the range");

        let a = m.summary("a");
        assert_eq!(a.total.delivered, 22);
        assert_eq!(a.pods, ["pod-1", "pod-2"]);
        assert_eq!(a.state, State::Delivering);
        assert_eq!(a.series.len(), 11);
        assert_eq!(a.series[0].delivered, 15, "both pods' first window");
        assert_eq!(a.series[9].delivered, 7);

        let b = m.summary("b");
        assert_eq!(
            b.state,
            State::Failing,
            "only failures in the last five minutes"
        );
        assert_eq!(b.total.retried["AccessDenied"], 5);
        assert_eq!(
            b.last_error.unwrap().message,
            "denied on pod-1",
            "the latest"
        );
        assert_eq!(m.most_failing(10)[0].0, "b");
        assert_eq!(m.summary("nobody").state, State::Idle);
    }
}
