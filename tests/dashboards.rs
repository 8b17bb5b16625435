//! The dashboards and alert rules in `dashboards/` (issue 17 item 4), checked with Debian's
//! `prometheus` package: `promtool check rules` and `promtool test rules` on the alerts, the
//! Grafana JSON's structure, and a real Prometheus scraping a real gateway (readings through an
//! MQTT broker, an MQTT listener and a serial port; a rejection, drops at the buffer bound, a
//! port unplugged) where every dashboard query must return data and every alert rule must
//! evaluate without error. Nothing is skipped: without `prometheus`/`promtool` the tests fail
//! and say which package to install.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::pty::{wait_port_open, SerialLink};
use support::{
    free_port, http_get, probe_config_with_input, probe_readings, publish_all, wait_for_port,
    Gateway, Mosquitto, Nats,
};

/// Metrics the dashboards chart that this version of the gateway does not export yet: the
/// downlink's (DESIGN.md §8), whose panels are in the dashboards so they work the day it ships.
/// Their queries are skipped by the data check, and the check fails once `/metrics` exports
/// one of them, so that it is taken off this list and its panels get checked too.
const NOT_YET_EXPORTED: &[&str] = &[
    "sahool_gateway_commands_total",
    "sahool_gateway_actuator_on",
];

/// The scrape job the alert rules expect (`SahoolGatewayDown`).
const JOB: &str = "sahool-gateway";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A binary from the Debian `prometheus` package; fails (never skips) when it is missing.
fn prometheus_tool(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} not found: install the Debian package `prometheus` (`apt-get install prometheus`; \
         scripts/test installs it)",
        path.display()
    );
    path
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(prometheus_tool("promtool"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every `- alert: Name` in alerts.yml.
fn alert_names() -> Vec<String> {
    let text = std::fs::read_to_string(repo("dashboards/alerts.yml")).expect("alerts.yml");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check() {
    let (ok, out) = promtool(&["check", "rules", "dashboards/alerts.yml"]);
    assert!(ok, "promtool check rules dashboards/alerts.yml:\n{out}");
    let names = alert_names();
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{out}"
    );
    for wanted in [
        "SahoolGatewayDown",
        "SahoolGatewayNatsDown",
        "SahoolGatewayBacklogGrowing",
        "SahoolGatewaySerialPortDown",
        "SahoolGatewayDeadLettersRising",
        "SahoolGatewayBufferNearBound",
        "SahoolGatewayReadingsDropped",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing: {names:?}"
        );
    }
    let text = std::fs::read_to_string(repo("dashboards/alerts.yml")).expect("alerts.yml");
    assert_eq!(
        text.matches("summary:").count(),
        names.len(),
        "every alert has a summary"
    );
    assert_eq!(
        text.matches("description:").count(),
        names.len(),
        "every alert has a description"
    );
}

#[test]
fn alert_rules_fire_and_stay_silent_as_their_unit_tests_say() {
    let (ok, out) = promtool(&["test", "rules", "dashboards/alerts.test.yml"]);
    assert!(ok, "promtool test rules dashboards/alerts.test.yml:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert has a case where it fires (exp_labels) and one where it must not (exp_alerts: []).
    let tests = std::fs::read_to_string(repo("dashboards/alerts.test.yml")).expect("test file");
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current = String::new();
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = name.trim().to_string();
        } else if line == "exp_alerts: []" {
            cases.entry(current.clone()).or_default().1 += 1;
        } else if line.starts_with("- exp_labels:") {
            cases.entry(current.clone()).or_default().0 += 1;
        }
    }
    for name in alert_names() {
        let (fires, silent) = cases.get(&name).copied().unwrap_or_default();
        assert!(
            fires > 0 && silent > 0,
            "{name}: {fires} firing and {silent} silent cases in alerts.test.yml, need both"
        );
    }
}

/// A dashboard file, parsed.
fn dashboard(name: &str) -> Value {
    let path = repo(&format!("dashboards/{name}"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard file"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every non-row panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                walk(&p["panels"], out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// (panel title, PromQL) of every query: panel targets and `label_values(...)` variables.
fn queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        let title = p["title"].as_str().unwrap_or_default();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                title.to_string(),
                t["expr"].as_str().unwrap_or_default().into(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().unwrap_or_default();
            out.push((
                format!("variable ${}", v["name"].as_str().unwrap_or("?")),
                q.into(),
            ));
        }
    }
    out
}

/// Every `sahool_gateway_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sahool_gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboards_are_grafana_json_with_a_prometheus_input_and_label_filters() {
    let mut uids = BTreeSet::new();
    for name in ["gateway.json", "fleet.json"] {
        let d = dashboard(name);
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{name}: schemaVersion {schema}"
        );
        assert!(
            uids.insert(d["uid"].as_str().expect("uid").to_string()),
            "{name}: uid reused"
        );
        let input = d["__inputs"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["name"] == "DS_PROMETHEUS"))
            .unwrap_or_else(|| panic!("{name}: no DS_PROMETHEUS input"));
        assert_eq!(input["type"], "datasource", "{name}");
        assert_eq!(input["pluginId"], "prometheus", "{name}");

        let defined: BTreeSet<&str> = d["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for var in ["DS_PROMETHEUS", "job", "instance"] {
            assert!(defined.contains(var), "{name}: no ${var} variable");
        }

        let mut ids = BTreeSet::new();
        let mut boxes: Vec<(String, u64, u64, u64, u64)> = Vec::new();
        for p in d["panels"].as_array().expect("panels") {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{name}: id of {title} reused"
            );
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_u64().expect("x"),
                g["y"].as_u64().expect("y"),
                g["w"].as_u64().expect("w"),
                g["h"].as_u64().expect("h"),
            );
            assert!(
                x + w <= 24 && w > 0 && h > 0,
                "{name}: {title} outside the grid"
            );
            for (other, ox, oy, ow, oh) in &boxes {
                let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
                assert!(apart, "{name}: {title} overlaps {other}");
            }
            boxes.push((title, x, y, w, h));
        }

        let panels = panels(&d);
        assert!(panels.len() >= 10, "{name}: {} panels", panels.len());
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            assert_eq!(
                p["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{name}: {title}"
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{name}: {title} has no query");
            let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
            assert_eq!(refs.len(), targets.len(), "{name}: {title} refIds");
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "${DS_PROMETHEUS}",
                    "{name}: {title}"
                );
                let expr = t["expr"].as_str().expect("expr");
                // One gateway, or the fleet's selection: every selector filters by both labels.
                let selectors = expr.matches('{').count();
                assert!(selectors > 0, "{name}: {title}: {expr}");
                assert_eq!(
                    expr.matches("job=~\"$job\"").count(),
                    selectors,
                    "{name}: {title}: {expr}"
                );
                assert_eq!(
                    expr.matches("instance=~\"$instance\"").count(),
                    selectors,
                    "{name}: {title}: {expr}"
                );
                // Only variables the dashboard defines, or Grafana's own.
                for (i, _) in expr.match_indices('$') {
                    let var: String = expr[i + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        var.starts_with("__") || defined.contains(var.as_str()),
                        "{name}: {title}: ${var} is not defined"
                    );
                }
            }
        }
    }
}

/// A Prometheus server on a free loopback port in a temp dir, scraping one gateway every
/// second and evaluating `dashboards/alerts.yml` every second. Killed on drop.
struct Prometheus {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let binary = prometheus_tool("prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = repo("dashboards/alerts.yml").display()
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Self { port, dir, child };
        wait_for_port(port, Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/-/ready").map(|r| r.0) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Targets reach the scrape loop a few seconds after start (discovery updates are
        // batched): everything the test does from here is seen from the start.
        while !p
            .query("up")
            .is_ok_and(|r| r.iter().any(|s| s["value"][1] == "1"))
        {
            assert!(
                Instant::now() < deadline,
                "prometheus never scraped {target}:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; the `data` of a `success` answer.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (code, body) = http_get(self.port, path).ok_or("no answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{code} {body}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("{code}: {body}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(promql)))?;
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            Some("scalar") => Ok(vec![data["result"].clone()]),
            other => Err(format!("result type {other:?}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard query as Grafana would send it, with the variables set.
fn expand(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut e = expr.to_string();
    // Longest names first, so `$instance` does not eat a longer name's prefix.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in vars {
        e = e
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    assert!(!e.contains('$'), "unexpanded variable in {e}");
    e
}

/// `label_values(selector, label)` as Prometheus queries: the selector, whose result must carry
/// the label.
fn label_values(expr: &str) -> Option<(String, String)> {
    let inner = expr.strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// Why a query's answer is not data: an error, no series, only NaN (a quantile without
/// observations), or a `label_values` selector whose series lack the label.
fn no_data(prom: &Prometheus, expr: &str) -> Option<String> {
    let (promql, label) = match label_values(expr) {
        Some((selector, label)) => (selector, Some(label)),
        None => (expr.to_string(), None),
    };
    let result = match prom.query(&promql) {
        Ok(r) => r,
        Err(e) => return Some(format!("error: {e}")),
    };
    if result.is_empty() {
        return Some("empty result".into());
    }
    if let Some(label) = label {
        if !result.iter().any(|s| s["metric"][&label].is_string()) {
            return Some(format!("no series with label {label}"));
        }
        return None;
    }
    let value = |s: &Value| s["value"][1].as_str().unwrap_or("NaN").to_string();
    if result.iter().all(|s| value(s) == "NaN") {
        return Some(format!("only NaN: {result:?}"));
    }
    None
}

/// Every metric name a `/metrics` body exports (sample names, `_bucket` etc. included).
fn exported(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_prometheus_scraping_a_running_gateway() {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut link = SerialLink::plugged("usb-dashboards-talker-if00");
    let listener_port = free_port();
    // Three kinds of source, a 16KiB buffer (the smallest allowed) so an outage overflows it.
    let input = format!(
        r#"[[mqtt]]
name = "farm"
url = "{broker}"
topics = ["sahool/sensors/#"]
format = "sahool"

[[mqtt_listener]]
name = "devices"
listen = "127.0.0.1:{listener_port}"
topics = ["sahool/sensors/#"]
format = "sahool"
auth = "none"

[[serial]]
name = "talker"
path = "{path}"
protocol = "lines"
line_format = "kv"
device_id = "tank-1"

[[fields]]
id = "field-2"
  [[fields.sensors]]
  device_id = "tank-1"
  sensor_type = "water_level"
  line = {{ port = "talker", key = "level" }}
"#,
        broker = broker.url(),
        path = link.path.display(),
    );
    let gateway = Gateway::start(&probe_config_with_input(
        &nats,
        "max_bytes = \"16KiB\"",
        "",
        &input,
    ));
    gateway.wait_subscribed(1).await;
    wait_port_open(&gateway, "talker");
    wait_for_port(listener_port, WITHIN);
    let target = format!("127.0.0.1:{}", gateway.http_port);
    let prom = Prometheus::start(&target);

    // Readings through each source, and one input that is rejected into the dead-letters.
    let mut messages = probe_readings(0..5);
    messages.push((
        "sahool/sensors/probe-1/field-1/water_level".into(),
        b"not json".to_vec(),
    ));
    assert_eq!(publish_all(broker.port, "dash-broker", messages).await, 6);
    assert_eq!(
        publish_all(listener_port, "dash-device", probe_readings(5..10)).await,
        5
    );
    for level in 1..=3 {
        link.write(format!("level={level}\n").as_bytes());
    }
    gateway.wait_until("13 readings forwarded, 1 rejected", WITHIN, |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= 13.0
            && g.metric("sahool_gateway_dead_letters", "") >= 1.0
    });

    // The serial device unplugged and plugged in again: a `lost` error, the port down then up.
    link.unplug();
    gateway.wait_until("the port noticed lost", WITHIN, |g| {
        g.metric("sahool_gateway_serial_port_up", "port=\"talker\"") == 0.0
    });
    // Prometheus sees the port down before it comes back.
    std::thread::sleep(Duration::from_secs(2));
    link.plug();
    wait_port_open(&gateway, "talker");

    // More through the listener now that Prometheus has its histogram series: PubAck latency
    // quantiles need observations between two scrapes.
    assert_eq!(
        publish_all(listener_port, "dash-device", probe_readings(400..405)).await,
        5
    );

    // An outage longer than the buffer holds: the oldest readings are dropped at the bound.
    nats.stop();
    assert_eq!(
        publish_all(broker.port, "dash-outage", probe_readings(10..400)).await,
        390
    );
    gateway.wait_until("readings dropped at the bound", WITHIN, |g| {
        g.metric(
            "sahool_gateway_readings_dropped_total",
            "reason=\"buffer_full\"",
        ) > 0.0
    });
    nats.resume();
    gateway.wait_until("the backlog drained", WITHIN, |g| {
        g.metric("sahool_gateway_nats_connected", "") == 1.0
            && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });

    // Every metric the dashboards and alerts name is exported, except the ones listed as not
    // yet exported, which must really be absent.
    let (_, body) = gateway.get("/metrics").expect("/metrics");
    let exported = exported(&body);
    let mut named = BTreeSet::new();
    for file in ["gateway.json", "fleet.json", "alerts.yml"] {
        let text = std::fs::read_to_string(repo(&format!("dashboards/{file}"))).expect("file");
        named.extend(metric_names(&text));
    }
    for name in &named {
        if NOT_YET_EXPORTED.contains(&name.as_str()) {
            assert!(
                !exported.contains(name),
                "{name} is exported now: take it off NOT_YET_EXPORTED so its panels are checked"
            );
        } else {
            assert!(
                exported.contains(name),
                "{name} is named in dashboards/ but not exported"
            );
        }
    }

    // Every query of both dashboards, with the variables as a user would set them: all
    // gateways (`.*`, as the fleet's "All") and this one by name.
    let bound = "16384";
    let settings: [&[(&str, &str)]; 2] = [
        &[("job", ".*"), ("instance", ".*")],
        &[("job", JOB), ("instance", target.as_str())],
    ];
    let mut checks = Vec::new();
    for name in ["gateway.json", "fleet.json"] {
        let d = dashboard(name);
        for (title, expr) in queries(&d) {
            if let Some(skip) = NOT_YET_EXPORTED.iter().find(|m| expr.contains(*m)) {
                eprintln!("skipped (not yet exported: {skip}): {name}: {title}: {expr}");
                continue;
            }
            for vars in settings {
                let mut vars = vars.to_vec();
                // Five minutes covers everything this test did, for rate() and quantiles.
                vars.extend([("__rate_interval", "5m"), ("buffer_max_bytes", bound)]);
                checks.push((format!("{name}: {title}"), expand(&expr, &vars)));
            }
        }
    }
    assert!(checks.len() > 60, "{} queries", checks.len());
    let deadline = Instant::now() + WITHIN;
    let failures = loop {
        let failures: Vec<String> = checks
            .iter()
            .filter_map(|(what, q)| {
                no_data(&prom, q).map(|why| format!("{what}\n    {q}\n    {why}"))
            })
            .collect();
        if failures.is_empty() || Instant::now() > deadline {
            break failures;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries return no data:\n{}\n--- prometheus log ---\n{}",
        failures.len(),
        checks.len(),
        failures.join("\n"),
        prom.log()
    );

    // The alert rules load into this Prometheus and evaluate against real series without error.
    let deadline = Instant::now() + WITHIN;
    loop {
        let data = prom.api("/api/v1/rules").expect("rules");
        let rules: Vec<&Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(names, alert_names(), "rules loaded by prometheus");
        if rules.iter().all(|r| r["health"] != "unknown") {
            for r in &rules {
                assert_eq!(r["health"], "ok", "{r}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules never evaluated: {data}");
        std::thread::sleep(Duration::from_millis(500));
    }
}
