//! What operators deploy, checked offline: the Kubernetes manifests (rendered with
//! `kubectl kustomize`, validated against Kubernetes' OpenAPI schemas with
//! kubernetes-validate, and the invariants they rely on), the alert rules (promtool's
//! checks and unit tests), the dashboard's queries and the Dockerfile. The rules and
//! the dashboard meet a real Prometheus and worker in `tests/observability.rs`.

mod common;
use common::bin;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

const OVERLAYS: [&str; 3] = [
    "deploy/kubernetes/base",
    "deploy/kubernetes/overlays/keda",
    "deploy/kubernetes/overlays/statefulset",
];

/// Kinds from CRDs (the Prometheus Operator's, KEDA's): Kubernetes' own schemas do not
/// have them, so they are checked field by field here.
const CUSTOM_KINDS: [&str; 3] = ["PodMonitor", "PrometheusRule", "ScaledObject"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/test.sh installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).expect(path);
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `kubectl kustomize DIR`, as objects.
fn render(dir: &str) -> (String, Vec<Value>) {
    let text = run(Command::new("kubectl").args(["kustomize", dir]));
    let objects = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .collect();
    (text, objects)
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn one<'a>(objects: &'a [Value], k: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| kind(o) == k).collect();
    assert_eq!(found.len(), 1, "one {k} expected");
    found[0]
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

#[test]
fn every_overlay_renders_into_objects_valid_against_the_kubernetes_schemas() {
    for dir in OVERLAYS {
        let (text, objects) = render(dir);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        // Strict: an unknown field (a typo) fails too. Two versions: the oldest and the
        // newest Kubernetes an operator is likely to run.
        for version in ["1.29.0", "1.34.0"] {
            let report = run(Command::new("kubernetes-validate").args([
                "--strict",
                "-k",
                version,
                file.path().to_str().unwrap(),
            ]));
            for o in &objects {
                let name = str_at(o, &["metadata", "name"]);
                let line = format!("resource {}/{name}", kind(o).to_lowercase());
                if CUSTOM_KINDS.contains(&kind(o)) {
                    assert!(
                        !report.contains(&format!("{line} against")),
                        "{dir}: {line} was not expected to have a schema"
                    );
                } else {
                    assert!(
                        report.contains(&format!("passed for {line} against")),
                        "{dir}: {line} did not pass on {version}:\n{report}"
                    );
                }
            }
        }
        for o in objects.iter().filter(|o| CUSTOM_KINDS.contains(&kind(o))) {
            check_custom(dir, o);
        }
    }
}

/// The fields of the CRD kinds that the operators' controllers require.
fn check_custom(dir: &str, o: &Value) {
    let api = str_at(o, &["apiVersion"]);
    match kind(o) {
        "PodMonitor" => {
            assert_eq!(api, "monitoring.coreos.com/v1");
            let selector = &o["spec"]["selector"]["matchLabels"];
            assert_eq!(
                selector["app.kubernetes.io/name"].as_str(),
                Some("kinesis-destination")
            );
            let endpoint = &o["spec"]["podMetricsEndpoints"][0];
            assert_eq!(str_at(endpoint, &["port"]), "http");
            assert_eq!(str_at(endpoint, &["path"]), "/metrics");
        }
        "PrometheusRule" => {
            assert_eq!(api, "monitoring.coreos.com/v1");
            assert_eq!(
                o["spec"]["groups"],
                yaml_file("deploy/prometheus/alerts.yml")["groups"],
                "{dir}: the PrometheusRule differs from deploy/prometheus/alerts.yml: run scripts/prometheusrule.sh"
            );
        }
        "ScaledObject" => {
            assert_eq!(api, "keda.sh/v1alpha1");
            assert!(o["spec"]["scaleTargetRef"]["name"].is_string());
            let trigger = &o["spec"]["triggers"][0];
            assert_eq!(str_at(trigger, &["type"]), "kafka");
            for key in ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"] {
                assert!(trigger["metadata"][key].is_string(), "{key}");
            }
        }
        other => panic!("no check for {other}"),
    }
}

/// The worker's configuration as the ConfigMap carries it.
fn config_in(objects: &[Value]) -> (String, toml::Table) {
    let text = str_at(one(objects, "ConfigMap"), &["data", "config.toml"]).to_owned();
    let table = text.parse::<toml::Table>().expect("config.toml");
    (text, table)
}

fn int(t: &toml::Table, section: &str, key: &str) -> i64 {
    t[section][key]
        .as_integer()
        .unwrap_or_else(|| panic!("{section}.{key}"))
}

#[test]
fn the_workload_keeps_what_operators_rely_on_in_every_overlay() {
    for dir in OVERLAYS {
        let (_, objects) = render(dir);
        let workloads: Vec<&Value> = objects
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "StatefulSet"))
            .collect();
        assert_eq!(workloads.len(), 1, "{dir}: one workload");
        let workload = workloads[0];
        let pod = &workload["spec"]["template"];
        let spec = &pod["spec"];
        let container = &spec["containers"][0];

        // The configuration in the ConfigMap is one the worker accepts.
        let (text, config) = config_in(&objects);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        let out = run(Command::new(bin()).args([
            "run",
            "--config",
            file.path().to_str().unwrap(),
            "--check-config",
        ]));
        assert!(out.starts_with("config ok"), "{out}");

        // SIGTERM: the worker's shutdown budget ends before the kubelet's SIGKILL.
        let budget = int(&config, "delivery", "shutdown_timeout_secs")
            + int(&config, "delivery", "close_timeout_secs");
        let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
        assert!(
            grace > budget,
            "{dir}: grace {grace} s ≤ shutdown budget {budget} s"
        );

        // Probes and the metrics port are the worker's.
        let port = config["http"]["listen"]
            .as_str()
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<i64>().ok())
            .expect("http.listen");
        let ports = &container["ports"][0];
        assert_eq!(ports["containerPort"].as_i64(), Some(port), "{dir}");
        assert_eq!(ports["name"].as_str(), Some("http"), "{dir}");
        // Only Prometheus' namespace reaches the pods, on the HTTP port alone (the
        // kubelet's probes come from the node).
        let policies: Vec<&Value> = objects
            .iter()
            .filter(|o| kind(o) == "NetworkPolicy")
            .collect();
        assert_eq!(policies.len(), 1, "{dir}: one NetworkPolicy");
        let policy = &policies[0]["spec"];
        let pod_labels = pod["metadata"]["labels"].as_mapping().unwrap();
        for (k, v) in policy["podSelector"]["matchLabels"].as_mapping().unwrap() {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "{dir}: the policy selects the pods"
            );
        }
        assert_eq!(
            policy["policyTypes"],
            serde_yaml::from_str::<Value>("[Ingress]").unwrap()
        );
        let rules = policy["ingress"].as_sequence().unwrap();
        assert_eq!(rules.len(), 1, "{dir}");
        let from = rules[0]["from"].as_sequence().expect("a rule with sources");
        assert!(!from.is_empty(), "{dir}: an empty `from` admits everybody");
        for source in from {
            assert!(
                source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    .is_string()
                    && source.get("ipBlock").is_none(),
                "{dir}: only a namespace by name: {source:?}"
            );
        }
        let allowed = rules[0]["ports"].as_sequence().unwrap();
        assert_eq!(allowed.len(), 1, "{dir}");
        assert_eq!(allowed[0]["port"].as_str(), Some("http"), "{dir}");

        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            assert_eq!(
                str_at(container, &[probe, "httpGet", "path"]),
                path,
                "{dir}: {probe}"
            );
            assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("http"));
        }

        // Not root, nothing written to the image.
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true)
        );
        assert!(spec["securityContext"]["runAsUser"].as_i64().unwrap() > 0);
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{dir}");
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));

        // Requests and a memory limit, the limit above the 100,000-tenant bench's peak.
        let resources = &container["resources"];
        assert!(resources["requests"]["cpu"].is_string());
        assert!(resources["requests"]["memory"].is_string());
        assert_eq!(resources["limits"]["memory"].as_str(), Some("1Gi"));

        // The config file the container is told to read is the ConfigMap's.
        let configmap = one(&objects, "ConfigMap");
        let cm_name = str_at(configmap, &["metadata", "name"]);
        let volume = &spec["volumes"][0];
        assert_eq!(str_at(volume, &["configMap", "name"]), cm_name, "{dir}");
        let mount = &container["volumeMounts"][0];
        assert_eq!(mount["name"], volume["name"]);
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let config_path = format!("{}/config.toml", str_at(mount, &["mountPath"]));
        assert_eq!(args, ["run", "--config", config_path.as_str()], "{dir}");
        assert!(
            cm_name.starts_with("kinesis-destination-config-"),
            "the ConfigMap's name carries a hash of its content, so a change rolls the pods: {cm_name}"
        );

        // Selectors find the pods.
        let pod_label = pod["metadata"]["labels"]["app.kubernetes.io/name"].clone();
        assert_eq!(pod_label.as_str(), Some("kinesis-destination"));
        assert_eq!(
            one(&objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
                ["app.kubernetes.io/name"],
            pod_label
        );
        for service in objects.iter().filter(|o| kind(o) == "Service") {
            assert_eq!(
                service["spec"]["selector"]["app.kubernetes.io/name"],
                pod_label
            );
        }
        assert_eq!(
            one(&objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
                ["app.kubernetes.io/name"],
            pod_label
        );

        // The worker's AWS identity: IRSA's annotation on its service account.
        let sa = one(&objects, "ServiceAccount");
        assert_eq!(
            spec["serviceAccountName"].as_str(),
            sa["metadata"]["name"].as_str()
        );
        assert!(str_at(
            sa,
            &["metadata", "annotations", "eks.amazonaws.com/role-arn"]
        )
        .starts_with("arn:aws:iam::"));

        match dir.rsplit('/').next().unwrap() {
            "keda" => {
                let so = one(&objects, "ScaledObject");
                assert_eq!(
                    so["spec"]["scaleTargetRef"]["name"],
                    workload["metadata"]["name"]
                );
                assert!(
                    workload["spec"]["replicas"].is_null(),
                    "the HPA owns the replica count"
                );
                let t = &so["spec"]["triggers"][0]["metadata"];
                assert_eq!(
                    t["consumerGroup"].as_str(),
                    config["kafka"]["group_id"].as_str()
                );
                assert_eq!(
                    t["bootstrapServers"].as_str(),
                    config["kafka"]["bootstrap_servers"].as_str()
                );
                let topics = config["kafka"]["topics"].as_array().unwrap();
                assert!(topics.iter().any(|x| x.as_str() == t["topic"].as_str()));
                assert!(t["lagThreshold"].as_str().unwrap().parse::<u64>().unwrap() > 0);
            }
            "statefulset" => {
                assert_eq!(kind(workload), "StatefulSet");
                // The same pod as the base's Deployment, plus static membership.
                let (_, base) = render(OVERLAYS[0]);
                let mut expected = one(&base, "Deployment")["spec"]["template"].clone();
                let env = expected["spec"]["containers"][0]["env"]
                    .as_sequence_mut()
                    .unwrap();
                env.push(
                    serde_yaml::from_str(
                        "{name: KINESIS_DESTINATION__KAFKA__LIBRDKAFKA__GROUP.INSTANCE.ID, value: $(POD_NAME)}",
                    )
                    .unwrap(),
                );
                assert_eq!(
                    pod, &expected,
                    "the StatefulSet's pod differs from the Deployment's"
                );
                assert!(!str_at(workload, &["spec", "serviceName"]).is_empty());
            }
            _ => assert_eq!(kind(workload), "Deployment"),
        }
    }
}

/// GitHub's anchor for a README heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_passes_promtool_is_tested_both_ways_and_has_a_runbook() {
    run(Command::new("promtool").args(["check", "rules", "deploy/prometheus/alerts.yml"]));
    let report =
        run(Command::new("promtool").args(["test", "rules", "deploy/prometheus/alerts.test.yml"]));
    assert!(report.contains("SUCCESS"), "{report}");

    let runbooks = std::fs::read_to_string(repo().join("docs/runbooks.md")).unwrap();
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| anchor(h.trim_start_matches('#')))
        .collect();
    let tests = yaml_file("deploy/prometheus/alerts.test.yml");
    let cases: Vec<&Value> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap())
        .collect();
    let rules = yaml_file("deploy/prometheus/alerts.yml");
    let mut alerts = 0;
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let name = str_at(rule, &["alert"]);
        alerts += 1;
        assert!(
            matches!(
                str_at(rule, &["labels", "severity"]),
                "critical" | "warning"
            ),
            "{name}"
        );
        for a in ["summary", "description"] {
            assert!(!str_at(rule, &["annotations", a]).is_empty(), "{name}: {a}");
        }
        let runbook = str_at(rule, &["annotations", "runbook_url"]);
        let (_, fragment) = runbook.split_once("docs/runbooks.md#").expect(runbook);
        assert_eq!(fragment, name.to_lowercase(), "{name}: runbook anchor");
        assert!(
            anchors.contains(fragment),
            "{name}: no heading in docs/runbooks.md for #{fragment}"
        );
        let of_this: Vec<&&Value> = cases
            .iter()
            .filter(|c| c["alertname"].as_str() == Some(name))
            .collect();
        let firing = |c: &&&Value| !c["exp_alerts"].as_sequence().unwrap().is_empty();
        assert!(of_this.iter().any(firing), "{name}: no test where it fires");
        assert!(
            of_this.iter().any(|c| !firing(c)),
            "{name}: no test where it stays quiet"
        );
    }
    assert_eq!(alerts, 10);
}

#[test]
fn the_dockerfile_builds_this_binary_and_runs_it_as_the_manifests_expect() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    // Logical lines: continuations joined, comments and blank lines left out.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    const INSTRUCTIONS: [&str; 9] = [
        "FROM",
        "RUN",
        "WORKDIR",
        "COPY",
        "USER",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "ENV",
    ];
    for l in &lines {
        let word = l.split_whitespace().next().unwrap_or_default();
        assert!(INSTRUCTIONS.contains(&word), "not an instruction: {l}");
    }
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    let rust_version = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .parse::<toml::Table>()
        .unwrap()["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        froms[0].starts_with(&format!("FROM rust:{rust_version}")),
        "the build image is the workspace's rust-version ({rust_version}): {}",
        froms[0]
    );
    assert!(froms[1].contains("debian:bookworm-slim") || froms[1].contains("distroless"));
    let name = bin().file_name().unwrap().to_str().unwrap();
    assert!(
        text.contains(&format!("--bin {name}")),
        "builds --bin {name}"
    );
    assert!(text.contains(&format!("target/release/{name} ")));
    assert!(text.contains(&format!("ENTRYPOINT [\"{name}\"]")));
    // The user the manifests run as.
    let (_, objects) = render(OVERLAYS[0]);
    let uid = one(&objects, "Deployment")["spec"]["template"]["spec"]["securityContext"]
        ["runAsUser"]
        .as_i64()
        .unwrap();
    assert!(
        lines.contains(&format!("USER {uid}").as_str()),
        "USER {uid}"
    );
    assert!(text.contains("--uid 10001") && uid == 10001);
    // The shared libraries the binary links that Debian slim does not have are
    // installed in the runtime stage.
    let ldd = run(Command::new("ldd").arg(bin()));
    let runtime = &text[text.rfind("FROM ").unwrap()..];
    for (lib, package) in [("libssl.so.3", "libssl3"), ("libcurl.so.4", "libcurl4")] {
        if ldd.contains(lib) {
            assert!(
                runtime.contains(&format!(" {package} ")),
                "the binary links {lib}: the runtime stage must install {package}"
            );
        }
    }
    assert!(
        ldd.contains("libcurl.so.4"),
        "librdkafka is built with libcurl (OIDC)"
    );
    let mount = "/etc/kinesis-destination/config.toml";
    assert!(text.contains(mount), "CMD reads {mount}");
    assert!(Path::new(&repo().join(".dockerignore")).exists());
}
