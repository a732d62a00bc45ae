//! What `status --format table` prints: one tenant's summary and series, or the tenants
//! with the most failures.

use std::fmt::Write;

use crate::merge::{Merged, Summary};

/// Tenants listed without `--source-id`.
pub const LISTED: usize = 50;

/// Text from records (anyone who can write the status topic wrote it) for a terminal:
/// nothing that breaks or rewrites the line, and bounded.
fn t(s: &str) -> String {
    kd_event::text::escape_clip(s, 300)
}

pub fn tenant_table(s: &Summary) -> String {
    let mut o = String::new();
    let c = &s.total;
    let _ = writeln!(o, "source         {}", t(&s.source_id));
    let _ = writeln!(
        o,
        "state          {} (over the last 5 minutes of the range)",
        s.state.as_str()
    );
    let _ = writeln!(o, "range          {} .. {}", t(&s.since), t(&s.until));
    let _ = writeln!(
        o,
        "pods           {}",
        if s.pods.is_empty() {
            "-".into()
        } else {
            t(&s.pods.join(", "))
        }
    );
    let _ = writeln!(o, "received       {}", c.received);
    let _ = writeln!(
        o,
        "delivered      {}   success rate {}",
        c.delivered,
        rate(s.success_rate)
    );
    let _ = writeln!(
        o,
        "dead-lettered  {}{}",
        c.dead_lettered_total(),
        by(&c.dead_lettered)
    );
    let _ = writeln!(
        o,
        "retried        {} attempts{}   throttled {}",
        c.retried_total(),
        by(&c.retried),
        c.throttled
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
                t(&e.code),
                t(&e.message),
                e.request_id
                    .as_deref()
                    .map(|r| format!(" (request {})", t(r)))
                    .unwrap_or_default(),
                t(&e.at)
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
            t(&p.start),
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
                t(&x.at),
                t(&x.reason),
                t(&x.topic),
                x.partition,
                x.offset,
                t(x.message_id.as_deref().unwrap_or("-")),
                t(&x.error)
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
        let c = &h.total;
        let _ = writeln!(
            o,
            "{:<32}  {:<10}  {:>9}  {:>9}  {:>13}  {:>7}  {:>8}  {}",
            t(source),
            h.state().as_str(),
            c.received,
            c.delivered,
            c.dead_lettered_total(),
            c.retried_total(),
            rate(c.success_rate()),
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
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{} {v}", t(k))).collect();
    format!("   ({})", parts.join(", "))
}
