//! A real Prometheus (Debian's package, started per test on a free port) scrapes a real
//! worker that is sent good events, bad ones and a failing tenant's, with the alert rules
//! of `deploy/prometheus/alerts.yml` loaded: the series exist, the dead-letter alert
//! fires, and every query of the Grafana dashboard parses and finds data.

mod common;
use common::bin;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kd_aws::msk_iam::percent_encode;
use kd_testkit::env::{wait_metric, FakeEnv as Env, TOPIC};
use kd_testkit::{eventually, http_get, Fault, Worker};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Prometheus server scraping one worker every second, with the alert rules.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(worker_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{:?}]\n\
                 scrape_configs:\n\
                 - job_name: kinesis-destination\n  \
                   static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n",
                repo().join("deploy/prometheus/alerts.yml")
            ),
        )
        .unwrap();
        let port = kd_testkit::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (scripts/test.sh installs it)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// `GET path` of the HTTP API, as JSON.
    fn api(&self, path: &str) -> Value {
        let (_, body) = http_get(self.port, path).unwrap_or_default();
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// An instant query: `Ok(result)` or `Err(the error)`.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)));
        match v["status"].as_str() {
            Some("success") => Ok(v["data"]["result"].as_array().cloned().unwrap_or_default()),
            _ => Err(format!("{promql}: {v}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `expr` of the dashboard's panels, with Grafana's variables filled in as
/// Grafana would for this Prometheus.
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/kinesis-destination.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_owned();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("$job"),
                "{title}: every query selects the job"
            );
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$job", "kinesis-destination");
            out.push((title.clone(), expr));
        }
    }
    out
}

/// The metric names a query reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let word: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + word.len()..];
        if word.starts_with("kinesis_destination_") || word.starts_with("process_") {
            names.insert(word);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_worker_fires_the_dead_letter_alert_and_answers_the_dashboard()
{
    let env = Env::start().await;
    let good = env.tenant("src_good", "good", 2);
    // Writes to this tenant's stream are throttled for a while, then succeed: put
    // errors, retries.
    let flaky = env.tenant("src_flaky", "flaky", 1);
    env.fake.fail_for(
        "flaky",
        Fault::Throttle { percent: 100 },
        Duration::from_secs(2),
    );
    let cfg = env.config(&[&good, &flaky]);
    cfg.write();
    let worker = Worker::start_ready(bin(), &cfg);
    let prometheus = Prometheus::start(worker.http_port);
    env.send_many("src_good", 5, 4).await;
    env.send_many("src_flaky", 2, 2).await;
    wait_metric(
        &worker,
        "kinesis_destination_events_delivered_total",
        24.0,
        Duration::from_secs(30),
    )
    .await;

    // Prometheus scrapes the worker and evaluates the rules; nothing fires yet.
    eventually(Duration::from_secs(30), "the worker scraped", || async {
        let up = prometheus.query("up{job=\"kinesis-destination\"}").ok()?;
        (up.first()?["value"][1].as_str() == Some("1")).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "delivered events in Prometheus",
        || async {
            let r = prometheus
                .query("kinesis_destination_events_delivered_total")
                .ok()?;
            (r.first()?["value"][1].as_str() == Some("24")).then_some(())
        },
    )
    .await;
    let firing = |name: &'static str| {
        let alerts = prometheus.api("/api/v1/alerts");
        alerts["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["labels"]["alertname"].as_str() == Some(name))
            .collect::<Vec<Value>>()
    };
    assert!(firing("KinesisDestinationDeadLetters").is_empty());

    // Bad events: dead-lettered, and the alert fires for their reason.
    for i in 0..3 {
        env.kafka
            .send(
                TOPIC,
                Some("u"),
                format!("{{not json {i}").as_bytes(),
                &[("source_id", "src_good")],
            )
            .await;
    }
    wait_metric(
        &worker,
        "kinesis_destination_events_dead_lettered_total{reason=\"invalid_json\"}",
        3.0,
        Duration::from_secs(30),
    )
    .await;
    let alert = eventually(
        Duration::from_secs(30),
        "the dead-letter alert firing",
        || async {
            firing("KinesisDestinationDeadLetters")
                .into_iter()
                .find(|a| a["state"].as_str() == Some("firing"))
        },
    )
    .await;
    assert_eq!(alert["labels"]["reason"], "invalid_json");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("dead-lettered (invalid_json)"),
        "{alert}"
    );
    assert!(
        firing("KinesisDestinationDown").is_empty() && firing("KinesisDestinationStuck").is_empty(),
        "a healthy worker fires nothing else"
    );

    // The dashboard: every metric a panel reads is one the worker exposes and
    // Prometheus has; every query parses and, but for the ones about failures this run
    // did not have, returns data.
    eventually(
        Duration::from_secs(20),
        "consumer lag published",
        || async {
            worker
                .metrics()
                .contains("kinesis_destination_consumer_lag{")
                .then_some(())
        },
    )
    .await;
    let exposed = worker.metrics();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut names = BTreeSet::new();
    for (title, expr) in &queries {
        let found = metric_names(expr);
        assert!(!found.is_empty(), "{title}: {expr} reads no metric");
        names.extend(found);
    }
    for name in &names {
        assert!(
            exposed
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard reads {name}, which the worker does not expose"
        );
        let what = format!("{name} in Prometheus");
        eventually(Duration::from_secs(15), &what, || async {
            let r = prometheus.query(&format!("count({name})")).ok()?;
            (!r.is_empty()).then_some(())
        })
        .await;
    }
    for (title, expr) in &queries {
        let result = prometheus.query(expr);
        let result = result.unwrap_or_else(|e| panic!("{title}: {e}"));
        assert!(!result.is_empty(), "{title}: {expr} returned nothing");
    }
    // The throttling panel's label value is the one the worker records.
    let throttled = prometheus
        .query("kinesis_destination_put_errors_total{error=\"ProvisionedThroughputExceededException\"}")
        .unwrap();
    assert!(!throttled.is_empty(), "no throttled writes recorded");
    // The job variable lists the worker's job.
    let jobs = prometheus.api(&format!(
        "/api/v1/label/job/values?match[]={}",
        percent_encode("kinesis_destination_events_received_total")
    ));
    assert_eq!(jobs["data"][0], "kinesis-destination", "{jobs}");
}
