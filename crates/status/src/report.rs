//! What `status --format table` prints: one tenant's summary and series, or the tenants
//! with the most failures.

use std::fmt::Write;

use crate::merge::{Merged, Summary};

/// Tenants listed without `--source-id`.
pub const LISTED: usize = 50;

pub fn tenant_table(s: &Summary) -> String {
    let mut o = String::new();
    let t = &s.total;
    let _ = writeln!(o, "source         {}", s.source_id);
    let _ = writeln!(
        o,
        "state          {} (over the last 5 minutes of the range)",
        s.state.as_str()
    );
    let _ = writeln!(o, "range          {} .. {}", s.since, s.until);
    let _ = writeln!(
        o,
        "pods           {}",
        if s.pods.is_empty() {
            "-".into()
        } else {
            s.pods.join(", ")
        }
    );
    let _ = writeln!(o, "received       {}", t.received);
    let _ = writeln!(
        o,
        "delivered      {}   success rate {}",
        t.delivered,
        rate(s.success_rate)
    );
    let _ = writeln!(
        o,
        "dead-lettered  {}{}",
        t.dead_lettered_total(),
        by(&t.dead_lettered)
    );
    let _ = writeln!(
        o,
        "retried        {}{}   throttled {}",
        t.retried_total(),
        by(&t.retried),
        t.throttled
    );
    let _ = writeln!(
        o,
        "latency        p50 {}  p95 {}  p99 {}",
        ms(s.latency_ms.p50),
        ms(s.latency_ms.p95),
        ms(s.latency_ms.p99)
    );
    let _ = writeln!(
        o,
        "last delivery  {}",
        s.last_delivery.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        o,
        "last failure   {}",
        s.last_failure.as_deref().unwrap_or("-")
    );
    match &s.last_error {
        Some(e) => {
            let _ = writeln!(
                o,
                "last error     {}: {}{} at {}",
                e.code,
                e.message,
                e.request_id
                    .as_deref()
                    .map(|r| format!(" (request {r})"))
                    .unwrap_or_default(),
                e.at
            );
        }
        None => {
            let _ = writeln!(o, "last error     -");
        }
    }
    let unit = if s.bucket_secs >= 3600 {
        "hour"
    } else {
        "minute"
    };
    let _ = writeln!(
        o,
        "\n{unit:<20}  {:>9}  {:>9}  {:>13}  {:>7}  {:>9}  {:>9}",
        "received", "delivered", "dead-lettered", "retried", "throttled", "p95"
    );
    for p in s
        .series
        .iter()
        .filter(|p| p.received + p.delivered + p.dead_lettered + p.retried > 0)
    {
        let _ = writeln!(
            o,
            "{:<20}  {:>9}  {:>9}  {:>13}  {:>7}  {:>9}  {:>9}",
            p.start,
            p.received,
            p.delivered,
            p.dead_lettered,
            p.retried,
            p.throttled,
            ms(p.p95_ms)
        );
    }
    if !s.samples.is_empty() {
        let _ = writeln!(o, "\nsamples (newest first)");
        for x in &s.samples {
            let _ = writeln!(
                o,
                "{}  {}  {}/{}/{}  message {}  {}",
                x.at,
                x.reason,
                x.topic,
                x.partition,
                x.offset,
                x.message_id.as_deref().unwrap_or("-"),
                x.error
            );
        }
    }
    o
}

pub fn overview_table(m: &Merged) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<32}  {:<10}  {:>9}  {:>9}  {:>13}  {:>7}  {:>8}  last error",
        "source", "state", "received", "delivered", "dead-lettered", "retried", "success"
    );
    for (source, h) in m.most_failing(LISTED) {
        let t = &h.total;
        let _ = writeln!(
            o,
            "{:<32}  {:<10}  {:>9}  {:>9}  {:>13}  {:>7}  {:>8}  {}",
            source,
            h.state().as_str(),
            t.received,
            t.delivered,
            t.dead_lettered_total(),
            t.retried_total(),
            rate(t.success_rate()),
            h.last_error
                .as_ref()
                .map(|e| e.code.as_str())
                .unwrap_or("-")
        );
    }
    if m.tenants.len() > LISTED {
        let _ = writeln!(
            o,
            "... {} more tenants (name one with --source-id)",
            m.tenants.len() - LISTED
        );
    }
    o
}

fn rate(r: Option<f64>) -> String {
    r.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// A latency bucket's upper bound.
pub fn ms(v: Option<u64>) -> String {
    match v {
        Some(v) if v >= 1000 => format!("≤{}s", v as f64 / 1000.0),
        Some(v) => format!("≤{v}ms"),
        None => "-".into(),
    }
}

fn by(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("   ({})", parts.join(", "))
}
