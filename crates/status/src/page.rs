//! The delivery page (`status --serve`): a search box for a source ID, the tenant's
//! delivered and failed events per minute (an SVG chart), failures by reason and code,
//! latency, the last error and samples, and the tenants with the most failures. Plain
//! HTML, no script. It reads the status topic as the `status` command does, on each
//! request; the list of failing tenants is kept for [`OVERVIEW_TTL`].

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::merge::{Merged, Point, Summary};
use crate::read::Reader;
use crate::report::ms;
use crate::state::State as Delivery;

/// How long the list of failing tenants is reused before the topic is read again.
const OVERVIEW_TTL: Duration = Duration::from_secs(15);
/// Ranges the page offers.
const RANGES: [(&str, u64); 4] = [("15m", 900), ("1h", 3600), ("6h", 21_600), ("24h", 86_400)];

struct Page {
    reader: Reader,
    /// The last list read, with when and for which range. Held while it is read again,
    /// so concurrent requests wait for one read instead of each making its own.
    overview: tokio::sync::Mutex<Option<(Instant, u64, Arc<Merged>)>>,
}

#[derive(serde::Deserialize)]
struct Ask {
    source_id: Option<String>,
    range: Option<String>,
}

pub fn router(reader: Reader) -> Router {
    let page = Arc::new(Page {
        reader,
        overview: tokio::sync::Mutex::new(None),
    });
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(page)
}

/// Serves the page on `listener` until SIGINT or SIGTERM.
pub async fn serve(listener: tokio::net::TcpListener, reader: Reader) -> std::io::Result<()> {
    axum::serve(listener, router(reader))
        .with_graceful_shutdown(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
}

async fn index(State(page): State<Arc<Page>>, Query(ask): Query<Ask>) -> Response {
    let (range_name, range) = RANGES
        .iter()
        .find(|(n, _)| Some(*n) == ask.range.as_deref())
        .copied()
        .unwrap_or(RANGES[1]);
    let source = ask
        .source_id
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let bucket = if range > 6 * 3600 { 600 } else { 60 };
    let detail: Option<Result<Summary, String>> = match &source {
        Some(s) => {
            let (reader, s2) = (page.reader.clone(), s.clone());
            let read = tokio::task::spawn_blocking(move || {
                reader.merged(Duration::from_secs(range), Some(&s2), bucket)
            })
            .await;
            match read {
                Ok(Ok(m)) => Some(Ok(m.summary(s))),
                Ok(Err(e)) => Some(Err(e.to_string())),
                Err(e) => Some(Err(e.to_string())),
            }
        }
        None => None,
    };
    let overview = overview(&page, range).await;
    let mut o = String::new();
    head(&mut o, source.as_deref(), range_name);
    match detail {
        Some(Ok(s)) => tenant(&mut o, &s),
        Some(Err(e)) => {
            let _ = write!(
                o,
                "<p class=error>Cannot read the status topic: {}</p>",
                esc(&e)
            );
        }
        None => {}
    }
    match overview {
        Ok(m) => failing(&mut o, &m, range_name),
        Err(e) => {
            let _ = write!(
                o,
                "<p class=error>Cannot read the status topic: {}</p>",
                esc(&e)
            );
        }
    }
    o.push_str("</main></body></html>\n");
    (
        StatusCode::OK,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(o),
    )
        .into_response()
}

async fn overview(page: &Arc<Page>, range: u64) -> Result<Arc<Merged>, String> {
    let mut cached = page.overview.lock().await;
    if let Some((at, r, m)) = &*cached {
        if *r == range && at.elapsed() < OVERVIEW_TTL {
            return Ok(m.clone());
        }
    }
    let reader = page.reader.clone();
    let m =
        tokio::task::spawn_blocking(move || reader.merged(Duration::from_secs(range), None, 3600))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    let m = Arc::new(m);
    *cached = Some((Instant::now(), range, m.clone()));
    Ok(m)
}

fn head(o: &mut String, source: Option<&str>, range: &str) {
    let _ = write!(
        o,
        r#"<!doctype html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}Event delivery · kinesis-destination</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}}
header{{background:#1d2330;color:#fff;padding:12px 24px}} header b{{font-size:16px}}
main{{max-width:980px;margin:0 auto;padding:16px 24px}}
form{{display:flex;gap:8px;margin:8px 0 16px}} input[type=text]{{flex:1;padding:6px 8px;font:inherit}}
select,button{{font:inherit;padding:6px 10px}}
section{{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin:12px 0}}
h2{{font-size:16px;margin:4px 0 8px}} table{{border-collapse:collapse;width:100%}}
td,th{{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;vertical-align:top}} th{{font-weight:600;color:#4a5364}}
.num{{text-align:right;font-variant-numeric:tabular-nums}}
.state{{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:600;color:#fff}}
.delivering{{background:#1f8a4c}} .degraded{{background:#c98a00}} .failing{{background:#c0392b}} .idle{{background:#7b8494}}
.kpis{{display:flex;gap:24px;flex-wrap:wrap}} .kpi b{{display:block;font-size:20px}}
.error{{color:#c0392b}} code{{font-size:12px;word-break:break-all}} .legend span{{margin-right:16px}}
</style></head><body><header><b>Event delivery</b> · kinesis-destination</header><main>
<form method=get action="/"><input type=text name=source_id placeholder="Source ID" value="{value}" aria-label="Source ID">
<select name=range aria-label=Range>{options}</select><button type=submit>Show</button></form>
"#,
        title = source.map(|s| format!("{} · ", esc(s))).unwrap_or_default(),
        value = esc(source.unwrap_or("")),
        options = RANGES
            .iter()
            .map(|(n, _)| format!(
                "<option{}>{n}</option>",
                if *n == range { " selected" } else { "" }
            ))
            .collect::<String>(),
    );
}

fn tenant(o: &mut String, s: &Summary) {
    let t = &s.total;
    let _ = write!(
        o,
        r#"<section id=tenant><h2>{source} <span class="state {state}" id=state>{state}</span></h2>
<div class=kpis>
<div class=kpi>Received<b id=received>{received}</b></div>
<div class=kpi>Delivered<b id=delivered>{delivered}</b></div>
<div class=kpi>Dead-lettered<b id=dead-lettered>{dead}</b></div>
<div class=kpi>Retried<b id=retried>{retried}</b></div>
<div class=kpi>Throttled<b>{throttled}</b></div>
<div class=kpi>Success rate<b>{rate}</b></div>
<div class=kpi>Latency p50 / p95 / p99<b>{p50} / {p95} / {p99}</b></div>
</div>
<p>{since} to {until} · pods: {pods} · last delivery {last_delivery} · last failure {last_failure}</p>
"#,
        source = esc(&s.source_id),
        state = s.state.as_str(),
        received = t.received,
        delivered = t.delivered,
        dead = t.dead_lettered_total(),
        retried = t.retried_total(),
        throttled = t.throttled,
        rate = s
            .success_rate
            .map(|r| format!("{:.1}%", r * 100.0))
            .unwrap_or_else(|| "–".into()),
        p50 = esc(&ms(s.latency_ms.p50)),
        p95 = esc(&ms(s.latency_ms.p95)),
        p99 = esc(&ms(s.latency_ms.p99)),
        since = esc(&s.since),
        until = esc(&s.until),
        pods = esc(&if s.pods.is_empty() {
            "–".to_owned()
        } else {
            s.pods.join(", ")
        }),
        last_delivery = esc(s.last_delivery.as_deref().unwrap_or("–")),
        last_failure = esc(s.last_failure.as_deref().unwrap_or("–")),
    );
    chart(o, &s.series, s.bucket_secs);
    o.push_str("</section>");
    if let Some(e) = &s.last_error {
        let _ = write!(
            o,
            "<section id=last-error><h2>Last error</h2><p><b>{}</b> at {}</p><p><code>{}</code></p>{}</section>",
            esc(&e.code),
            esc(&e.at),
            esc(&e.message),
            e.request_id
                .as_deref()
                .map(|r| format!("<p>AWS request ID <code>{}</code></p>", esc(r)))
                .unwrap_or_default()
        );
    }
    if !t.dead_lettered.is_empty() || !t.retried.is_empty() {
        o.push_str("<section id=failures><h2>Failures</h2><table><tr><th>Kind</th><th>Reason or AWS error</th><th class=num>Count</th></tr>");
        for (k, v) in &t.dead_lettered {
            let _ = write!(
                o,
                "<tr><td>events dead-lettered</td><td>{}</td><td class=num>{v}</td></tr>",
                esc(k)
            );
        }
        for (k, v) in &t.retried {
            let _ = write!(
                o,
                "<tr><td>attempts retried</td><td>{}</td><td class=num>{v}</td></tr>",
                esc(k)
            );
        }
        o.push_str("</table></section>");
    }
    if !s.samples.is_empty() {
        o.push_str("<section id=samples><h2>Sample failures</h2><table><tr><th>At</th><th>Reason</th><th>Topic / partition / offset</th><th>Message ID</th><th>Error</th></tr>");
        for x in &s.samples {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{} / {} / {}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                esc(&x.at),
                esc(&x.reason),
                esc(&x.topic),
                x.partition,
                x.offset,
                esc(x.message_id.as_deref().unwrap_or("–")),
                esc(&x.error)
            );
        }
        o.push_str("</table></section>");
    }
}

/// Delivered (green) and failed (red: dead-lettered and retried) events per row.
fn chart(o: &mut String, series: &[Point], bucket_secs: u64) {
    let (w, h, pad) = (900.0, 180.0, 28.0);
    let max = series
        .iter()
        .map(|p| p.delivered.max(p.dead_lettered + p.retried))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = series.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let y = |v: u64| h - pad - (h - 2.0 * pad) * v as f64 / max;
    let line = |f: &dyn Fn(&Point) -> u64| -> String {
        series
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(f(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let unit = if bucket_secs >= 600 {
        format!("per {} minutes", bucket_secs / 60)
    } else {
        "per minute".into()
    };
    let _ = write!(
        o,
        r##"<h2>Events {unit}</h2><p class=legend><span style="color:#1f8a4c">■ delivered</span><span style="color:#c0392b">■ failed (events dead-lettered and write attempts retried)</span></p>
<svg id=chart role=img aria-label="delivered and failed events {unit}" viewBox="0 0 {w} {h}" width="100%" style="max-width:{w}px">
<line x1="{pad}" y1="{base:.1}" x2="{right:.1}" y2="{base:.1}" stroke="#9aa3b2"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{base:.1}" stroke="#9aa3b2"/>
<text x="2" y="{top:.1}" font-size="11" fill="#4a5364">{max}</text><text x="2" y="{base:.1}" font-size="11" fill="#4a5364">0</text>
<polyline id=delivered-line fill="none" stroke="#1f8a4c" stroke-width="2" points="{delivered}"/>
<polyline id=failed-line fill="none" stroke="#c0392b" stroke-width="2" points="{failed}"/>
<text x="{pad}" y="{label:.1}" font-size="11" fill="#4a5364">{first}</text><text x="{right:.1}" y="{label:.1}" font-size="11" fill="#4a5364" text-anchor="end">{last}</text>
</svg>"##,
        base = h - pad,
        right = w - pad,
        top = pad + 4.0,
        label = h - 8.0,
        max = max as u64,
        delivered = line(&|p| p.delivered),
        failed = line(&|p| p.dead_lettered + p.retried),
        first = series.first().map(|p| esc(&p.start)).unwrap_or_default(),
        last = series.last().map(|p| esc(&p.start)).unwrap_or_default(),
    );
}

fn failing(o: &mut String, m: &Merged, range: &str) {
    let listed: Vec<_> = m
        .most_failing(crate::report::LISTED)
        .into_iter()
        .filter(|(_, h)| {
            matches!(h.state(), Delivery::Failing | Delivery::Degraded)
                || h.total.dead_lettered_total() + h.total.retried_total() > 0
        })
        .collect();
    let _ = write!(
        o,
        "<section id=failing><h2>Tenants with failures ({range})</h2>"
    );
    if listed.is_empty() {
        let _ = write!(
            o,
            "<p>None of the {} tenants with traffic failed.</p></section>",
            m.tenants.len()
        );
        return;
    }
    o.push_str("<table><tr><th>Source ID</th><th>State</th><th class=num>Delivered</th><th class=num>Dead-lettered</th><th class=num>Retried</th><th>Last error</th></tr>");
    for (source, h) in listed {
        let _ = write!(
            o,
            "<tr><td><a href=\"/?source_id={q}&amp;range={range}\">{s}</a></td><td><span class=\"state {st}\">{st}</span></td><td class=num>{d}</td><td class=num>{dl}</td><td class=num>{r}</td><td>{e}</td></tr>",
            q = url(source),
            s = esc(source),
            st = h.state().as_str(),
            d = h.total.delivered,
            dl = h.total.dead_lettered_total(),
            r = h.total.retried_total(),
            e = esc(h.last_error.as_ref().map(|e| e.code.as_str()).unwrap_or("–")),
        );
    }
    o.push_str("</table></section>");
}

/// Text for HTML: element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string value.
fn url(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{LastError, StatusRecord, VERSION};
    use crate::time::rfc3339;

    #[test]
    fn a_tenant_shows_its_counts_chart_and_error_and_nothing_unescaped() {
        let t0 = 1_800_000_000;
        let mut m = Merged::new(t0, t0 + 300, 60);
        let mut r = StatusRecord {
            v: VERSION,
            source_id: "<script>x</script>".into(),
            pod: "pod-1".into(),
            window_start: rfc3339(t0 + 240),
            window_secs: 60,
            ..Default::default()
        };
        r.counts.received = 4;
        r.counts.retried.insert("AccessDenied".into(), 4);
        r.last_error = Some(LastError {
            code: "AccessDenied".into(),
            message: "not authorized <b>".into(),
            request_id: Some("req-1".into()),
            at: rfc3339(t0 + 250),
        });
        m.add(r);
        let mut o = String::new();
        tenant(&mut o, &m.summary("<script>x</script>"));
        assert!(!o.contains("<script>"), "{o}");
        assert!(o.contains("&lt;script&gt;"));
        assert!(o.contains("class=\"state failing\""));
        assert!(o.contains("id=chart"));
        assert!(o.contains("req-1"));
        assert!(o.contains("not authorized &lt;b&gt;"));
        let mut list = String::new();
        failing(&mut list, &m, "1h");
        assert!(
            list.contains("/?source_id=%3Cscript%3Ex%3C%2Fscript%3E&amp;range=1h"),
            "{list}"
        );
    }
}
