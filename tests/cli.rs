//! The binary's edges without services: flags, bad configuration, readiness without a
//! broker, policy output, and the Docker Compose file.

mod common;
use common::bin;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use kd_testkit::{free_port, Worker, WorkerConfig};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const GOOD: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:1"
[tenants]
file = "tenants.json"
"#;

fn config_dir(config: &str, tenants: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    if let Some(t) = tenants {
        std::fs::write(dir.path().join("tenants.json"), t).unwrap();
    }
    dir
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
        vec!["tail", "--help"],
        vec!["policy", "--help"],
        vec!["produce", "--help"],
        vec!["replay", "--help"],
        vec!["status", "--help"],
    ] {
        let o = run(&cmd, &[]);
        assert!(o.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{cmd:?}"
        );
    }
}

/// `tail` takes the external ID from the environment, and never shows it: not in its
/// help, not in its errors.
#[test]
fn tail_takes_the_external_id_from_the_environment_and_never_shows_it() {
    let env = [("KINESIS_DESTINATION_EXTERNAL_ID", "s3cr3t-ext")];
    let help = run(&["tail", "--help"], &env);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("KINESIS_DESTINATION_EXTERNAL_ID"), "{text}");
    assert!(!text.contains("s3cr3t-ext"), "{text}");
    // Without the role it is for: a usage error naming both.
    let o = run(&["tail", "--stream", "s"], &env);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("needs --role-arn"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("s3cr3t-ext"));
    // One that breaks a secretId's rules (too long): refused, not echoed.
    let long = "s3cr3t".repeat(300);
    let o = run(
        &[
            "tail",
            "--stream",
            "s",
            "--role-arn",
            "arn:aws:iam::111111111111:role/r",
        ],
        &[("KINESIS_DESTINATION_EXTERNAL_ID", &long)],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--external-id"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("s3cr3t"));
}

#[test]
fn bad_flag_exits_2() {
    let o = run(&["run", "--no-such-flag"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--no-such-flag"));
}

#[test]
fn bad_config_exits_2_with_one_line_naming_the_key() {
    // (config text, tenants file, environment, key the error must name)
    type Case<'a> = (String, Option<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            GOOD.replace("bootstrap_servers", "bootstrap_server"),
            Some("[]"),
            vec![],
            "bootstrap_server",
        ),
        (
            GOOD.to_owned() + "[http]\nlisten = \"everywhere\"\n",
            Some("[]"),
            vec![],
            "http.listen",
        ),
        (
            GOOD.replace("file = \"tenants.json\"", ""),
            None,
            vec![],
            "tenants.file",
        ),
        (GOOD.to_owned(), None, vec![], "tenants.file"),
        (
            GOOD.to_owned(),
            Some("{\"not\": \"an array\"}"),
            vec![],
            "tenants.file",
        ),
        (
            GOOD.to_owned(),
            Some("[]"),
            vec![("KINESIS_DESTINATION__DELIVERY__MAX_IN_FLIGHT", "many")],
            "delivery.max_in_flight",
        ),
        (
            GOOD.to_owned() + "[kafka.librdkafka]\n\"no.such.property\" = \"1\"\n",
            Some("[]"),
            vec![],
            "kafka.librdkafka",
        ),
        ("[kafka\n".to_owned(), None, vec![], "config file"),
        (
            GOOD.to_owned() + "[status]\ntopic = \"s\"\ninterval_secs = 0\n",
            Some("[]"),
            vec![],
            "status.interval_secs",
        ),
        (
            GOOD.to_owned(),
            Some("[]"),
            vec![("KINESIS_DESTINATION__STATUS__TOPIC", "segment-events-dlq")],
            "status.topic",
        ),
    ];
    for (config, tenants, env, key) in cases {
        let dir = config_dir(&config, tenants);
        let path = dir.path().join("c.toml");
        let o = run(&["run", "--config", path.to_str().unwrap()], &env);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{key}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(key), "names {key}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn config_path_may_come_from_the_environment() {
    let o = run(
        &["run"],
        &[("KINESIS_DESTINATION_CONFIG", "/nonexistent/c.toml")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/c.toml"));
}

#[test]
fn not_ready_until_joined_and_sigterm_still_exits_0() {
    // A broker that is not there: alive, not ready, and stoppable.
    let cfg = WorkerConfig::new(&format!("127.0.0.1:{}", free_port()), "http://127.0.0.1:1");
    cfg.write_tenants(&[]);
    cfg.write();
    let mut worker = Worker::start(bin(), &cfg);
    let mut health = None;
    for _ in 0..100 {
        health = worker.get("/healthz");
        if health.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(health.map(|h| h.0), Some(200), "{}", worker.logs());
    let (status, body) = worker.get("/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("not joined"), "{body}");
    let metrics = worker.metrics();
    assert!(
        metrics.contains("kinesis_destination_events_received_total 0"),
        "{metrics}"
    );
    worker.stop();
}

#[test]
fn policy_prints_permission_and_trust_documents() {
    let o = run(
        &[
            "policy",
            "--stream",
            "my-stream",
            "--region",
            "us-west-2",
            "--account-id",
            "123456789012",
            "--principal",
            "arn:aws:iam::111122223333:root",
            "--external-id",
            "src_1",
            "--external-id",
            "src_2",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["permissionPolicy"]["Statement"][0]["Resource"][0],
        "arn:aws:kinesis:us-west-2:123456789012:stream/my-stream"
    );
    assert_eq!(
        v["trustPolicy"]["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"],
        serde_json::json!(["src_1", "src_2"])
    );
    let o = run(
        &[
            "policy",
            "--stream",
            "s",
            "--region",
            "us-west-2",
            "--account-id",
            "1",
            "--principal",
            "arn:aws:iam::1:root",
            "--external-id",
            "x",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--account-id"));
}

#[test]
fn docker_compose_file_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "--quiet"])
        .current_dir(root)
        .output()
        .expect("docker-compose is installed (scripts/test.sh installs Debian's)");
    assert!(o.status.success(), "docker-compose config: {}", stderr(&o));
    let o = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "--services"])
        .current_dir(root)
        .output()
        .unwrap();
    let services = String::from_utf8_lossy(&o.stdout);
    for s in ["kafka", "localstack", "worker", "prometheus"] {
        assert!(
            services.lines().any(|l| l == s),
            "service {s} in {services}"
        );
    }
}

#[test]
fn idle_http_connections_cannot_keep_the_probes_from_answering() {
    use std::io::Read;
    let cfg = WorkerConfig::new(&format!("127.0.0.1:{}", free_port()), "http://127.0.0.1:1");
    cfg.write_tenants(&[]);
    cfg.write();
    let mut worker = Worker::start(bin(), &cfg);
    for _ in 0..100 {
        if worker.get("/healthz").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // 100 clients connect and send nothing (or half a request head), more than the
    // server serves at once.
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", worker.http_port)).unwrap();
            if i % 2 == 0 {
                use std::io::Write;
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            }
            s
        })
        .collect();
    // The probe, from the same address, still answers at once: one address holds 16
    // connections, and a new one closes the address's longest idle connection.
    let asked = std::time::Instant::now();
    let health = worker.get("/healthz");
    let took = asked.elapsed();
    assert_eq!(health.map(|h| h.0), Some(200));
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    // The idle connections were closed by the server, for newer ones or 2 s after
    // they were accepted: reading them ends (after a 408 answer, or at once) or is
    // reset, rather than waiting.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(asked.elapsed()));
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(_) => {}
        }
    }
    assert_eq!(
        closed, 100,
        "every idle connection was closed by the server"
    );
    worker.stop();
}
