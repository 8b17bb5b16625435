//! An `[[mqtt]]` broker: connected with the source's own options (address, credentials, TLS)
//! and its topics subscribed, each SUBACK reason code read. Doctor uses a client id of its own
//! and a clean session that ends when it disconnects, so the gateway's persistent session (and
//! the messages queued in it) is left alone.

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop};

use super::Check;
use crate::common::tls;
use crate::config::{Config, MqttSource};
use crate::sources::mqtt::{broker_options, client_secrets};

pub(super) async fn check(config: &Config, source: &MqttSource) -> Check {
    let name = format!("mqtt {}", source.name);
    let (client, mut events, tls) = match connect(config, source) {
        Ok(parts) => parts,
        Err(e) => {
            return Check::fail(
                name,
                e,
                "correct the file this [[mqtt]] names, then run `validate`",
            )
        }
    };
    let check = match wait_connected(&mut events).await {
        Ok(()) => {
            let check = subscribe(&client, &mut events, source).await;
            let _ = client.try_disconnect();
            // Lets the DISCONNECT out; the check's own time bounds it.
            while let Ok(event) = events.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
            check
        }
        Err(e) => refused(source, &e, tls.and_then(|t| t.last_problem())),
    };
    Check { name, ..check }
}

/// The client with the source's password and TLS read as the gateway reads them.
type Client = (AsyncClient, EventLoop, Option<tls::ClientTls>);

fn connect(config: &Config, source: &MqttSource) -> Result<Client, String> {
    let (password, tls) = client_secrets(source).map_err(|e| e.to_string())?;
    let client_id = format!("{}-doctor", source.client_id(&config.gateway));
    let mut options = broker_options(source, client_id, password.as_ref(), tls.as_ref());
    options
        .set_clean_start(true)
        .set_session_expiry_interval(None);
    let (client, events) = AsyncClient::new(options, 16);
    Ok((client, events, tls))
}

async fn wait_connected(events: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            return Ok(());
        }
    }
}

/// Subscribes to every topic of the source and reads the broker's answer for each.
async fn subscribe(client: &AsyncClient, events: &mut EventLoop, source: &MqttSource) -> Check {
    let topics: Vec<&str> = source.topics.iter().map(|t| t.as_str()).collect();
    let filters = topics.iter().map(|t| Filter::new(*t, QoS::AtLeastOnce));
    if let Err(e) = client.try_subscribe_many(filters) {
        return Check::fail("", format!("cannot subscribe: {e}"), "run doctor again");
    }
    let codes = loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::SubAck(ack))) => break ack.return_codes,
            Ok(_) => {}
            Err(e) => {
                return Check::fail(
                    "",
                    format!("{} dropped the connection after SUBSCRIBE: {e}", source.url),
                    acl_fix(source),
                )
            }
        }
    };
    let refused: Vec<String> = topics
        .iter()
        .zip(&codes)
        .filter(|(_, code)| !matches!(code, SubscribeReasonCode::Success(_)))
        .map(|(topic, code)| format!("{topic} ({code:?})"))
        .collect();
    let user = who(source);
    if refused.is_empty() && codes.len() == topics.len() {
        Check::ok(
            "",
            format!(
                "connected to {} {user}, {}; subscribed to {}",
                source.url,
                transport(source),
                topics.join(", ")
            ),
        )
    } else {
        Check::fail(
            "",
            format!(
                "{} refuses {user} the subscription to {}",
                source.url,
                refused.join(", ")
            ),
            acl_fix(source),
        )
    }
}

fn acl_fix(source: &MqttSource) -> String {
    let topics: Vec<&str> = source.topics.iter().map(|t| t.as_str()).collect();
    let (account, section) = match &source.username {
        Some(user) => (format!("user {user}"), format!("under `user {user}`")),
        None => (
            "anonymous clients".to_string(),
            "before any `user` line".to_string(),
        ),
    };
    format!(
        "let {account} read {} in the broker's ACL (mosquitto: `topic read {}` {section}, as in config/mosquitto.sahool-gateway.acl)",
        topics.join(", "),
        topics.first().copied().unwrap_or("#")
    )
}

/// Why the connection failed, with what to do about it.
/// `tls_problem`: what the handshake saw, which the client may report as a mere I/O error.
fn refused(source: &MqttSource, e: &ConnectionError, tls_problem: Option<String>) -> Check {
    let at = &source.url;
    if let Some(problem) = tls_problem {
        return tls_failed(at, &problem);
    }
    match e {
        ConnectionError::ConnectionRefused(code) => Check::fail(
            "",
            format!("{at} refuses the connection {}: {code:?}", who(source)),
            "check username and password (or password_file) against the broker's users, and that the broker lets this client in",
        ),
        ConnectionError::Tls(tls) => tls_failed(at, &tls.to_string()),
        other => Check::fail(
            "",
            format!("cannot reach {at}: {other}"),
            "see that the broker runs and its port is reachable from here (firewall, address, port)",
        ),
    }
}

fn tls_failed(at: &crate::config::ServerUrl, problem: &str) -> Check {
    Check::fail(
        "",
        format!("TLS with {at} failed: {problem}"),
        "check tls_ca_file (the CA that signed the broker's certificate), tls_server_name, and the client certificate if the broker requires one",
    )
}

fn who(source: &MqttSource) -> String {
    match &source.username {
        Some(user) => format!("as user {user}"),
        None => "anonymously".into(),
    }
}

fn transport(source: &MqttSource) -> &'static str {
    if source.url.tls {
        "TLS"
    } else {
        "plaintext"
    }
}
