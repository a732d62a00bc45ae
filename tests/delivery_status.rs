//! Per-tenant delivery status across pods: two workers in one group write status records
//! for a healthy, a throttled and a broken tenant (its role refused); `status` and the
//! delivery page, read back from the topic, add both pods up. The page is loaded in a
//! real headless browser (Debian's Chromium) and a screenshot kept as a test artefact.

mod common;
use common::bin;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kd_testkit::env::{wait_metric, FakeEnv as Env, DLQ};
use kd_testkit::{http_get, ownership, Fault, Worker, WorkerConfig, CALLER_ACCOUNT};
use serde_json::{json, Value};

const STATUS: &str = "kd-status";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_add_up_in_status_and_on_the_delivery_page() {
    let env = Env::start().await;
    env.tansu.create_topic(STATUS, 3);
    let ok = env.tenant("src_ok", "ok-stream", 4);
    let slow = env.tenant("src_slow", "slow-stream", 4);
    // The broken tenant's role trusts another external ID only: AssumeRole is denied.
    let mut bad = env.tenant("src_bad", "bad-stream", 1);
    bad.account = "444444444444".into();
    env.fake.set_trust_policy(
        &bad.role_arn(),
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{CALLER_ACCOUNT}:root")},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": "src_other"}}}]}),
    );
    let mut cfg = env
        .config(&[&ok, &slow, &bad])
        .set("log", "format = \"json\"")
        .set("status", &format!("topic = \"{STATUS}\""))
        .set("status", "interval_secs = 2")
        .set("aws", "assume_role_failure_ttl_secs = 1")
        .set("delivery", "permanent_error_window_secs = 3")
        .set("delivery", "initial_backoff_ms = 50")
        .set("delivery", "max_backoff_ms = 300")
        // Tansu's coordinator and the cooperative protocol: see delivery_faults.rs.
        .set(
            "kafka.librdkafka",
            "\"partition.assignment.strategy\" = \"range,roundrobin\"",
        );
    cfg.heartbeat_interval_ms = Some(500);
    cfg.write();
    let mut a = Worker::start_with_env(bin(), &cfg, &[("HOSTNAME", "pod-a")]);
    let mut b = Worker::start_with_env(bin(), &cfg, &[("HOSTNAME", "pod-b")]);
    a.wait_ready(Duration::from_secs(60));
    b.wait_ready(Duration::from_secs(60));
    wait_until(Duration::from_secs(60), "both pods hold partitions", || {
        [&a, &b].iter().all(|w| {
            ownership(&w.logs())
                .iter()
                .any(|(_, _, revoked)| revoked.is_none())
        })
    })
    .await;

    // Half of the slow stream's writes are throttled while its events arrive.
    env.fake.fail_for(
        "slow-stream",
        Fault::Throttle { percent: 50 },
        Duration::from_secs(15),
    );
    let events: Vec<(String, String, usize)> = (0..10)
        .flat_map(|seq| {
            (0..10).flat_map(move |u| {
                [
                    ("src_ok".to_owned(), format!("ok{u}"), seq),
                    ("src_slow".to_owned(), format!("slow{u}"), seq),
                ]
            })
        })
        .chain((0..12).map(|u| ("src_bad".to_owned(), format!("bad{u}"), 0)))
        .collect();
    env.send_all(&events).await;

    // While the broken tenant's events are retried, a pod calls it failing.
    wait_until(
        Duration::from_secs(30),
        "a pod counts a failing tenant",
        || {
            [&a, &b]
                .iter()
                .any(|w| w.metric("kinesis_destination_tenants{state=\"failing\"}") >= 1.0)
        },
    )
    .await;
    let views: Vec<Value> = [&a, &b]
        .iter()
        .filter_map(|w| w.get("/tenants/src_bad"))
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| serde_json::from_str(&body).unwrap())
        .collect();
    assert!(!views.is_empty(), "a pod shows the broken tenant");
    for v in &views {
        assert!(
            v["last_error"]["code"]
                .as_str()
                .unwrap()
                .contains("AccessDenied"),
            "{v}"
        );
        assert_eq!(v["source_id"], "src_bad");
    }
    assert_eq!(a.get("/tenants/nobody").map(|r| r.0), Some(404));

    let dead = env.kafka.read_topic(DLQ, 12, Duration::from_secs(60));
    assert_eq!(dead.len(), 12);
    wait_until(Duration::from_secs(60), "every event written", || {
        env.fake.records_of("ok-stream").len() >= 100
            && env.fake.records_of("slow-stream").len() >= 100
    })
    .await;
    env.wait_committed_to_end(&cfg.group_id).await;
    for w in [&a, &b] {
        wait_metric(
            w,
            "kinesis_destination_status_records_total{outcome=\"ok\"}",
            1.0,
            Duration::from_secs(10),
        )
        .await;
    }
    // Stopped, each pod produces its open window: nothing it did is left out.
    a.stop();
    b.stop();

    let (code, ok_json) = status_json(&cfg, "src_ok");
    assert_eq!(code, 0, "{ok_json:#}");
    assert_eq!(ok_json["state"], "delivering", "{ok_json:#}");
    assert_eq!(
        ok_json["total"]["delivered"].as_u64().unwrap(),
        env.fake.records_of("ok-stream").len() as u64,
        "every write of both pods counted once: {ok_json:#}"
    );
    assert!(ok_json["total"]["received"].as_u64().unwrap() >= 100);
    assert_eq!(ok_json["pods"], json!(["pod-a", "pod-b"]), "{ok_json:#}");
    assert!(ok_json["latency_ms"]["p99"].as_u64().is_some());

    let (code, slow_json) = status_json(&cfg, "src_slow");
    assert_eq!(code, 0, "{slow_json:#}");
    assert_eq!(
        slow_json["total"]["delivered"].as_u64().unwrap(),
        env.fake.records_of("slow-stream").len() as u64
    );
    assert!(
        slow_json["total"]["throttled"].as_u64().unwrap() > 0,
        "{slow_json:#}"
    );
    assert_eq!(slow_json["state"], "degraded", "{slow_json:#}");

    let (code, bad_json) = status_json(&cfg, "src_bad");
    assert_eq!(code, 3, "a failing tenant exits 3: {bad_json:#}");
    assert_eq!(bad_json["state"], "failing");
    assert_eq!(bad_json["total"]["delivered"], 0);
    assert_eq!(
        bad_json["total"]["dead_lettered"]["destination_rejected"], 12,
        "{bad_json:#}"
    );
    assert!(
        bad_json["total"]["retried"]["AccessDenied"]
            .as_u64()
            .unwrap()
            > 0,
        "{bad_json:#}"
    );
    assert_eq!(bad_json["last_error"]["code"], "AccessDenied");
    let samples = bad_json["samples"].as_array().unwrap();
    assert!(!samples.is_empty());
    assert!(samples
        .iter()
        .all(|s| s["message_id"].as_str().unwrap().starts_with("src_bad/")));
    let printed = bad_json.to_string();
    assert!(!printed.contains("src_other") && !printed.contains("SecretAccessKey"));

    let table = status(&cfg, &["--since", "15m"]);
    assert_eq!(table.0, 0);
    let first = table.1.lines().nth(1).unwrap_or_default();
    assert!(
        first.starts_with("src_bad") && first.contains("failing"),
        "{}",
        table.1
    );
    let one = status(&cfg, &["--source-id", "src_bad", "--since", "15m"]);
    assert!(
        one.1.contains("AccessDenied") && one.1.contains("samples"),
        "{}",
        one.1
    );

    // The delivery page, in a real browser.
    let port = kd_testkit::free_port();
    let mut page = Command::new(bin())
        .args(["status", "--config"])
        .arg(cfg.path())
        .args(["--serve", &port.to_string()])
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the page serves", || {
        http_get(port, "/healthz").is_some()
    })
    .await;
    let (code, html) = http_get(port, "/?source_id=src_bad&range=15m").unwrap();
    assert_eq!(code, 200);
    assert!(html.contains("class=\"state failing\" id=state"), "{html}");
    let dom = browse(
        port,
        "/?source_id=src_bad&range=15m",
        "delivery-page-failing.png",
    );
    assert!(dom.contains("state failing"), "{dom}");
    assert!(dom.contains("AccessDenied"));
    assert!(dom.contains("<svg id=\"chart\""), "the chart is drawn");
    assert!(dom.contains("id=\"samples\""));
    assert!(
        dom.contains("src_bad/bad"),
        "samples name their message IDs"
    );
    let dom = browse(
        port,
        "/?source_id=src_ok&range=15m",
        "delivery-page-healthy.png",
    );
    assert!(dom.contains("state delivering"), "{dom}");
    let delivered = ok_json["total"]["delivered"].to_string();
    assert!(
        dom.contains(&format!("id=\"delivered\">{delivered}<")),
        "{dom}"
    );
    assert!(
        dom.contains("id=\"failing\""),
        "the list of tenants with failures"
    );
    let _ = page.kill();
    let _ = page.wait();
}

/// `status --source-id SOURCE --format json` over the last 15 minutes: its exit code
/// and what it printed.
fn status_json(cfg: &WorkerConfig, source: &str) -> (i32, Value) {
    let (code, out) = status(
        cfg,
        &["--source-id", source, "--format", "json", "--since", "15m"],
    );
    let json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (code, json)
}

/// Runs `status --config CFG ARGS`: its exit code and stdout.
fn status(cfg: &WorkerConfig, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .args(["status", "--config"])
        .arg(cfg.path())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some(), "{stderr}");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr,
    )
}

/// Loads `path` in headless Chromium: its DOM once loaded, and a screenshot kept in
/// `target/test-artifacts/NAME`.
fn browse(port: u16, path: &str, name: &str) -> String {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is installed (scripts/test.sh installs Debian's chromium)");
    let artefacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let url = format!("http://127.0.0.1:{port}{path}");
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: &[String]| {
        let out = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1200,1500",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let shot = artefacts.join(name);
    let _ = std::fs::remove_file(&shot);
    run(&[format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    String::from_utf8(run(&["--dump-dom".to_owned()]).stdout).unwrap()
}

async fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
