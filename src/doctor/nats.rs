//! NATS: the connection with the gateway's own [`Connector`], the streams that capture what it
//! publishes and their duplicate windows, and with `[commands]` on, the commands stream and
//! the durable consumer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, pull, PullConsumer};
use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, stream, Context, ErrorCode};

use super::{bounded, config_bucket, published_subjects, timed_out, Check, Verdict, CHECK_TIMEOUT};
use crate::common::metrics::Metrics;
use crate::config::{Config, Nats};
use crate::uplink::forward::RETRY_BACKOFF_MAX;
use crate::uplink::nats::{Connector, Link, NatsError};

/// The platform's duplicate window (DESIGN §2): it covers short link outages as well as retries.
const PLATFORM_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// JetStream requests answer well within a check's time, or not at all (a denied request).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection, then what needs it.
pub(super) async fn checks(config: &Config) -> Vec<Check> {
    let failed = |check| {
        let mut out = vec![check, Check::skip("stream", "NATS not reached")];
        if config.commands.enabled {
            out.push(Check::skip("commands", "NATS not reached"));
        }
        if config.fleet.config_bucket.is_some() {
            out.push(Check::skip("config_bucket", "NATS not reached"));
        }
        out
    };
    let link = match tokio::time::timeout(CHECK_TIMEOUT, connect(config)).await {
        Ok(Ok(link)) => link,
        Ok(Err(check)) => return failed(check),
        Err(_) => return failed(timed_out("nats")),
    };
    let js = jetstream::context::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(link.client.clone());
    let mut out = vec![connected(&config.nats, &link)];
    match tokio::time::timeout(CHECK_TIMEOUT, streams(&js, &link, config)).await {
        Ok(checks) => out.extend(checks),
        Err(_) => out.push(timed_out("stream")),
    }
    if config.commands.enabled {
        out.push(bounded("commands", commands(&js, &link, config)).await);
    }
    if let Some(bucket) = config.fleet.bucket(&config.gateway) {
        let check = config_bucket::check(&js, &link, config, &bucket);
        out.push(bounded("config_bucket", check).await);
    }
    out
}

/// Which stream captures each subject the gateway publishes, and each stream's window.
async fn streams(js: &Context, link: &Link, config: &Config) -> Vec<Check> {
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for subject in published_subjects(config) {
        let lookup = js.stream_by_subject(subject.clone());
        match unless_denied(link, STREAM_NAMES, lookup).await {
            Some(Ok(stream)) => found.entry(stream).or_default().push(subject),
            Some(Err(e)) if e.kind() == GetStreamByNameErrorKind::NotFound => missing.push(subject),
            Some(Err(e)) => out.push(names_refused("stream", &subject, &e.to_string())),
            None => {
                // Denied for one subject, denied for all.
                out.push(names_refused("stream", &subject, "this user may not ask"));
                return out;
            }
        }
    }
    let mut first: Option<stream::Config> = None;
    for (name, subjects) in &found {
        let api = format!("$JS.API.STREAM.INFO.{name}");
        let info = unless_denied(link, &api, js.get_stream(name)).await;
        match info.ok_or_else(|| "this user may not read it".to_string()) {
            Ok(Ok(s)) => {
                let info = &s.cached_info().config;
                out.push(window(name, info, subjects, config.nats.ack_timeout.0));
                first.get_or_insert_with(|| info.clone());
            }
            Ok(Err(e)) => out.push(unknown_window(name, subjects, &e.to_string())),
            Err(e) => out.push(unknown_window(name, subjects, &e)),
        }
    }
    let other = found.keys().next().map(String::as_str);
    out.extend(missing.iter().map(|s| uncaptured(s, first.as_ref(), other)));
    out
}

fn unknown_window(name: &str, subjects: &[String], why: &str) -> Check {
    Check::with_fix(
        Verdict::Warn,
        "stream",
        format!(
            "{name} captures {}; its duplicate window is unknown: {why}",
            subjects.join(", ")
        ),
        format!(
            "allow this user $JS.API.STREAM.INFO.{name}, or see it with `nats stream info {name}`"
        ),
    )
}

/// `request`'s outcome, or `None` as soon as the server reports that this user may not
/// publish to `api` (a denied request gets no reply, only a report on the connection).
pub(super) async fn unless_denied<T>(
    link: &Link,
    api: &str,
    request: impl std::future::Future<Output = T>,
) -> Option<T> {
    let sent = Instant::now();
    let mut reports = link.denials.watch();
    tokio::pin!(request);
    loop {
        tokio::select! {
            out = &mut request => return (!link.denials.denied_since(api, sent)).then_some(out),
            Ok(()) = reports.changed() => {
                if link.denials.denied_since(api, sent) {
                    return None;
                }
            }
        }
    }
}

/// The API subject that says which stream captures a subject.
const STREAM_NAMES: &str = "$JS.API.STREAM.NAMES";

fn names_refused(check: &str, subject: &str, why: &str) -> Check {
    Check::fail(
        check,
        format!("cannot ask JetStream which stream captures {subject}: {why}"),
        format!("allow this user to publish to {STREAM_NAMES} (config/nats-server.least-privilege.conf)"),
    )
}

/// A subject no stream captures, and how to add it to the stream that has the others: `stream`
/// when its config could be read, else the one named `other`.
fn uncaptured(subject: &str, stream: Option<&stream::Config>, other: Option<&str>) -> Check {
    let found = format!("no stream captures {subject}");
    let fix = match (stream, other) {
        (Some(s), _) => format!(
            "add it to the stream's subjects: nats stream edit {} --subjects \"{},{subject}\"",
            s.name,
            s.subjects.join(",")
        ),
        (None, Some(name)) => format!(
            "add it to the subjects of stream {name} (`nats stream info {name}` lists them; `nats stream edit {name} --subjects` takes them all)"
        ),
        (None, None) => {
            let subjects = if subject.starts_with("sahool.iot.") {
                "sahool.iot.>".to_string()
            } else {
                format!("sahool.iot.>,{subject}")
            };
            format!("have the platform create its stream: nats stream add SAHOOL_IOT --subjects \"{subjects}\" --dupe-window 2m")
        }
    };
    Check::fail("stream", found, fix)
}

/// The stream's duplicate window against what the gateway's resends need (DESIGN §1.3): at
/// least one retry after a lost PubAck, best the platform's 2 minutes for short outages.
fn window(
    name: &str,
    config: &stream::Config,
    subjects: &[String],
    ack_timeout: Duration,
) -> Check {
    let captures = format!("{name} captures {}", subjects.join(", "));
    let w = config.duplicate_window;
    let shown = humantime::format_duration(w);
    let fix = format!("nats stream edit {name} --dupe-window 2m");
    let retry = ack_timeout + RETRY_BACKOFF_MAX;
    if w.is_zero() {
        Check::fail(
            "stream",
            format!("{captures}, without a duplicate window: every resend is stored twice"),
            fix,
        )
    } else if w < retry {
        Check::fail(
            "stream",
            format!("{captures}; its duplicate window {shown} is shorter than one resend ({} ack_timeout + up to {} backoff): a publish whose PubAck was lost is stored twice", humantime::format_duration(ack_timeout), humantime::format_duration(RETRY_BACKOFF_MAX)),
            fix,
        )
    } else if w < PLATFORM_DUPLICATE_WINDOW {
        Check::with_fix(
            Verdict::Warn,
            "stream",
            format!("{captures}; its duplicate window {shown} catches resends on a live link, but not after an outage longer than that (consumers then drop doubles by event_id)"),
            fix,
        )
    } else {
        Check::ok("stream", format!("{captures} (duplicate window {shown})"))
    }
}

/// `[commands]`: the commands stream captures this gateway's filter subject, and its durable
/// consumer exists on it (or the gateway may create it).
async fn commands(js: &Context, link: &Link, config: &Config) -> Check {
    let c = &config.commands;
    let stream = c.stream.as_str();
    let filter = c.filter_subject(&config.gateway);
    let add_stream = format!(
        "have the platform create it: nats stream add {stream} --subjects \"sahool.commands.>\""
    );
    let lookup = js.stream_by_subject(filter.clone());
    let Some(captured) = unless_denied(link, STREAM_NAMES, lookup).await else {
        return names_refused("commands", &filter, "this user may not ask");
    };
    match captured {
        Ok(s) if s == stream => {}
        Ok(other) => {
            return Check::fail(
                "commands",
                format!(
                    "{filter} is captured by stream {other}, not by [commands] stream {stream}"
                ),
                format!("set [commands] stream = \"{other}\", or {add_stream}"),
            )
        }
        Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
            return Check::fail(
                "commands",
                format!("no stream captures {filter}"),
                add_stream,
            )
        }
        Err(e) => return names_refused("commands", &filter, &e.to_string()),
    }
    let name = c.consumer_name(&config.gateway);
    let api = format!("$JS.API.CONSUMER.INFO.{stream}.{name}");
    let lookup = js.get_consumer_from_stream::<pull::Config, _, _>(&name, stream);
    let Some(consumer) = unless_denied(link, &api, lookup).await else {
        return Check::fail(
            "commands",
            format!("this user may not read consumer {name} on {stream}, so doctor cannot see it"),
            format!("allow this user to publish to {api}"),
        );
    };
    let missing = matches!(&consumer, Err(e) if matches!(e.kind(),
        ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND));
    if missing && c.create_consumer {
        return creatable(js, link, config, &name, &filter).await;
    }
    consumer_check(consumer, config, &name, &filter)
}

/// Whether this user may create the missing consumer, asked without creating it: the request
/// goes where the gateway's will (`$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter}`), with
/// another filter in its body, which the server refuses (error 10131) once the subject's
/// permission let it through. `update` makes a server that would not check the filter refuse
/// it as well, the consumer not existing.
async fn creatable(js: &Context, link: &Link, config: &Config, name: &str, filter: &str) -> Check {
    let stream = config.commands.stream.as_str();
    let api = format!("CONSUMER.CREATE.{stream}.{name}.{filter}");
    let body = serde_json::json!({
        "stream_name": stream,
        "action": "update",
        "config": {"durable_name": name, "filter_subject": format!("{filter}.doctor-probe"), "ack_policy": "explicit"},
    });
    let request = js.request::<_, _, Response<consumer::Info>>(api.clone(), &body);
    let answer = unless_denied(link, &format!("$JS.API.{api}"), request).await;
    let found =
        format!("stream {stream} captures {filter}; durable consumer {name} does not exist yet");
    let creates = format!(
        "{found}: the gateway creates it at start (create_consumer = true, and this user may)"
    );
    match answer {
        // JetStream answered, so the subject is allowed; the request itself was refused.
        Some(Ok(Response::Err { .. })) => Check::ok("commands", creates),
        Some(Ok(Response::Ok(_))) => {
            // Only a server that checks neither the filter nor `update` gets here.
            let _ = js.delete_consumer_from_stream(name, stream).await;
            Check::ok("commands", creates)
        }
        None => Check::fail(
            "commands",
            format!("{found}, and this user may not create it (create_consumer = true)"),
            format!("have the platform create it: nats consumer add {stream} {name} --pull --filter {filter} --ack explicit, or allow this user to publish to $JS.API.CONSUMER.CREATE.{stream}.{name}.>"),
        ),
        Some(Err(e)) => Check::with_fix(
            Verdict::Warn,
            "commands",
            format!("{found}; whether this user may create it is unknown: {e}"),
            format!("see that this user may publish to $JS.API.CONSUMER.CREATE.{stream}.{name}.>"),
        ),
    }
}

/// What the consumer lookup found.
fn consumer_check(
    consumer: Result<PullConsumer, jetstream::stream::ConsumerError>,
    config: &Config,
    name: &str,
    filter: &str,
) -> Check {
    let stream = config.commands.stream.as_str();
    let recreate = format!("nats consumer rm {stream} {name}, then let the gateway create it (create_consumer = true) or have the platform create it on {filter}");
    let add = format!("have the platform create it: nats consumer add {stream} {name} --pull --filter {filter} --ack explicit, or set [commands] create_consumer = true");
    match consumer {
        Ok(consumer) => {
            let info = &consumer.cached_info().config;
            if info.filter_subject == filter || info.filter_subjects.iter().any(|f| f == filter) {
                Check::ok(
                    "commands",
                    format!(
                        "stream {stream} captures {filter}; durable consumer {name} pulls from it"
                    ),
                )
            } else {
                let actual = if info.filter_subject.is_empty() {
                    info.filter_subjects.join(", ")
                } else {
                    info.filter_subject.clone()
                };
                Check::fail(
                    "commands",
                    format!("consumer {name} on {stream} filters on `{actual}`, not {filter}"),
                    recreate,
                )
            }
        }
        Err(e) => match e.kind() {
            // With create_consumer = true, `creatable` answers instead.
            ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND => {
                Check::fail("commands", format!("durable consumer {name} does not exist on stream {stream}, and create_consumer = false"), add)
            }
            ConsumerErrorKind::InvalidConsumerType => Check::fail(
                "commands",
                format!("consumer {name} on {stream} is a push consumer; the gateway pulls"),
                recreate,
            ),
            _ => Check::fail(
                "commands",
                format!("cannot read consumer {name} on {stream}: {e}"),
                format!("allow this user $JS.API.CONSUMER.INFO.{stream}.{name}"),
            ),
        },
    }
}

async fn connect(config: &Config) -> Result<Link, Check> {
    let nats = &config.nats;
    let name = format!("sahool-gateway doctor {}", config.gateway.id);
    let connector = Connector::new(nats, &name, Arc::new(Metrics::new())).map_err(|e| {
        Check::fail(
            "nats",
            e.to_string(),
            "correct the file [nats] names, then run `validate`",
        )
    })?;
    connector
        .open()
        .await
        .map_err(|e| refused(nats, &connector, &e))
}

/// Why the connection failed, with what to do about it.
fn refused(nats: &Nats, connector: &Connector, e: &NatsError) -> Check {
    use async_nats::ConnectErrorKind as K;
    let NatsError::Connect(connect) = e else {
        return Check::fail("nats", e.to_string(), "correct [nats], then run `validate`");
    };
    let at = servers(nats);
    // The client reports a rejected certificate as an I/O error; the handshake knows better.
    let tls_problem = connector.tls_problem();
    let (found, fix) = match connect.kind() {
        K::AuthorizationViolation | K::Authentication => (
            format!("{at} refuses {}: {e}", identity(nats)),
            "check [nats] user and password (or token, nkey_seed_file, creds_file) against the server's users".to_string(),
        ),
        kind if kind == K::Tls || tls_problem.is_some() => (
            format!("TLS with {at} failed: {}", tls_problem.unwrap_or_else(|| e.to_string())),
            "check tls_ca_file (the CA that signed the server's certificate), tls_server_name, and the client certificate if the server verifies it".to_string(),
        ),
        _ => (
            format!("cannot reach {at}: {e}"),
            "see that nats-server runs and its client port is reachable from here (firewall, address, port)".to_string(),
        ),
    };
    Check::fail("nats", found, fix)
}

fn connected(nats: &Nats, link: &Link) -> Check {
    let info = link.client.server_info();
    let tls = if nats.uses_tls() { "TLS" } else { "plaintext" };
    Check::ok(
        "nats",
        format!(
            "connected to {} (server {}, nats-server {}) {}, {tls}",
            servers(nats),
            info.server_name,
            info.version,
            identity(nats)
        ),
    )
}

fn servers(nats: &Nats) -> String {
    let all: Vec<String> = nats.servers.iter().map(ToString::to_string).collect();
    all.join(", ")
}

/// Who the gateway connects as, without the secret.
fn identity(nats: &Nats) -> String {
    let file = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    if let Some(user) = &nats.user {
        format!("as user {user}")
    } else if nats.token.is_some() || nats.token_file.is_some() {
        "with a token".into()
    } else if let Some(seed) = file(&nats.nkey_seed_file) {
        format!("with the NKey seed in {seed}")
    } else if let Some(creds) = file(&nats.creds_file) {
        format!("with the credentials in {creds}")
    } else {
        "without credentials".into()
    }
}
