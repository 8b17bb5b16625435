//! The MQTT protocol of one listener connection, without I/O (the connection task does the
//! reading, writing and committing).
//!
//! Bytes in become [`Inbound`] packets, decoded by rumqttc's codecs: MQTT 5 or 3.1.1, whichever
//! the CONNECT names. [`Outbound`] replies become bytes in the same version. On top of the codec
//! it enforces what an ingest endpoint needs:
//! - the first packet is a CONNECT, and there is only one;
//! - a packet larger than the limit is refused from its header, before its body is buffered;
//! - PUBLISH topics are valid names (UTF-8, no wildcards, no MQTT 5 topic aliases);
//! - packets only a broker sends (acks of publishes we never sent, CONNACK, SUBACK, ...) and
//!   enhanced authentication are protocol errors;
//! - QoS 2: a packet id is remembered from its PUBREC until the PUBREL, so a resend in between
//!   is recognised.
//!
//! Every error ends the connection; [`Violation`] says why, and what MQTT 5 clients are told.

use std::collections::HashSet;
use std::fmt;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::{Error as Error5, QoS as QoS5};

use crate::common::trace::TraceContext;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1
    V4,
    V5,
}

/// The MQTT specification's names for the three levels.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

/// A CONNECT, whichever version sent it.
#[derive(Clone)]
pub struct Connect {
    pub client_id: String,
    pub(crate) username: Option<String>,
    pub password: Option<String>,
    /// Seconds; 0 means the client sends no PINGREQs.
    pub keep_alive: u16,
    pub(crate) clean_start: bool,
    /// MQTT 5 enhanced authentication, which this endpoint does not offer.
    pub(crate) auth_method: Option<String>,
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("keep_alive", &self.keep_alive)
            .field("clean_start", &self.clean_start)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Publish {
    pub topic: Bytes,
    pub payload: Bytes,
    pub(crate) qos: Qos,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub(crate) dup: bool,
    /// MQTT 5 only: the W3C trace context of its user properties.
    pub trace: Option<TraceContext>,
}

/// What a client sent.
#[derive(Debug, Clone)]
pub enum Inbound {
    Connect(Connect),
    Publish(Publish),
    /// QoS 2, second step.
    PubRel(u16),
    Subscribe {
        pkid: u16,
        filters: usize,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    PingReq,
    Disconnect,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    UnsupportedVersion,
    BadClientId,
    BadCredentials,
    ServerBusy,
    BadAuthMethod,
}

/// Why the gateway ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Not MQTT 3.1.1 or 5: answered with CONNACK "unacceptable protocol version".
    UnsupportedVersion,
    Malformed,
    Protocol,
    PacketTooLarge,
    /// MQTT 3.1.1 has no negative PUBACK: a publish to a topic not accepted closes the connection.
    TopicNotAccepted,
    KeepAliveTimeout,
    ShuttingDown,
    /// Another connection with the same client id took over.
    TakenOver,
}

/// A packet the session cannot accept; the connection ends with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub close: Close,
    pub detail: String,
}

impl Violation {
    fn new(close: Close, detail: impl Into<String>) -> Self {
        Self {
            close,
            detail: detail.into(),
        }
    }
}

/// What the CONNACK of an accepted connection announces (MQTT 5; 3.1.1 has no properties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub session_present: bool,
    pub(crate) receive_maximum: u16,
    pub(crate) max_packet_size: u32,
    /// Set when the client's keep-alive was outside the bounds.
    pub(crate) server_keep_alive: Option<u16>,
    /// Set when the client sent an empty client id.
    pub(crate) assigned_client_id: Option<String>,
}

/// A reply to the client.
#[derive(Debug, Clone)]
pub(crate) enum Outbound<'a> {
    ConnAck(Result<&'a Grant, Refusal>),
    /// `accepted: false` only for MQTT 5: the topic is not one the listener accepts.
    PubAck {
        pkid: u16,
        accepted: bool,
    },
    PubRec {
        pkid: u16,
        accepted: bool,
    },
    PubComp(u16),
    /// Every filter refused: this endpoint ingests, it does not forward.
    SubAck {
        pkid: u16,
        filters: usize,
    },
    UnsubAck {
        pkid: u16,
        filters: usize,
    },
    PingResp,
    /// MQTT 5 only; a 3.1.1 connection is just closed.
    Disconnect(&'a Violation),
}

/// Protocol state of one connection.
pub struct Session {
    /// Set by the CONNECT.
    version: Option<Version>,
    max_packet_size: usize,
    /// QoS 2 packet ids between PUBREC and PUBREL.
    awaiting_release: HashSet<u16>,
}

const SUBSCRIBE_REFUSED: &str =
    "this is an ingest endpoint: devices publish here, subscriptions are not offered";

impl Session {
    /// `max_packet_size` bounds a packet's remaining length.
    pub fn new(max_packet_size: usize) -> Self {
        Self {
            version: None,
            max_packet_size,
            awaiting_release: HashSet::new(),
        }
    }

    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// Takes the next complete packet off `buf`: `Ok(None)` until one is complete.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, Violation> {
        match self.version {
            None => self.decode_connect(buf),
            Some(Version::V4) => self.decode_v4(buf),
            Some(Version::V5) => self.decode_v5(buf),
        }
    }

    /// The framing of both versions is the same: the fixed header, from MQTT 5's codec.
    fn frame(&self, buf: &BytesMut) -> Result<Option<v5::FixedHeader>, Violation> {
        let limit = u32::try_from(self.max_packet_size).unwrap_or(u32::MAX);
        match v5::check(buf.iter(), Some(limit)) {
            Ok(header) => Ok(Some(header)),
            Err(Error5::InsufficientBytes(_)) => Ok(None),
            Err(Error5::PayloadSizeLimitExceeded { pkt_size, max }) => Err(Violation::new(
                Close::PacketTooLarge,
                format!("packet of {pkt_size} bytes exceeds max_packet_size {max}"),
            )),
            Err(e) => Err(Violation::new(Close::Malformed, e.to_string())),
        }
    }

    fn decode_connect(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, Violation> {
        let Some(header) = self.frame(buf)? else {
            return Ok(None);
        };
        if !matches!(header.packet_type(), Ok(v5::PacketType::Connect)) {
            return Err(Violation::new(
                Close::Protocol,
                "the first packet must be CONNECT",
            ));
        }
        let mut frame = buf.split_to(header.frame_length());
        // MQTT 5's reader refuses other protocol levels without consuming anything we need:
        // it reads a copy, and 3.1.1's reader takes the original.
        let mut copy = frame.clone();
        let connect = match v5::Packet::read(&mut copy, None) {
            Ok(v5::Packet::Connect(c, _will, login)) => {
                self.version = Some(Version::V5);
                let props = c.properties.unwrap_or_else(v5::ConnectProperties::new);
                Connect {
                    client_id: c.client_id,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| l.password),
                    keep_alive: c.keep_alive,
                    clean_start: c.clean_start,
                    auth_method: props.authentication_method,
                }
            }
            Ok(_) => return Err(Violation::new(Close::Malformed, "malformed CONNECT")),
            Err(Error5::InvalidProtocolLevel(4)) => {
                match v4::Packet::read(&mut frame, usize::MAX) {
                    Ok(v4::Packet::Connect(c))
                        if c.protocol == rumqttc::mqttbytes::Protocol::V4 =>
                    {
                        self.version = Some(Version::V4);
                        Connect {
                            client_id: c.client_id,
                            username: c.login.as_ref().map(|l| l.username.clone()),
                            password: c.login.map(|l| l.password),
                            keep_alive: c.keep_alive,
                            clean_start: c.clean_session,
                            auth_method: None,
                        }
                    }
                    Ok(_) => return Err(Violation::new(Close::Malformed, "malformed CONNECT")),
                    Err(e) => {
                        return Err(Violation::new(Close::Malformed, format!("CONNECT: {e}")))
                    }
                }
            }
            Err(Error5::InvalidProtocolLevel(level)) => {
                return Err(Violation::new(
                    Close::UnsupportedVersion,
                    format!(
                        "MQTT protocol level {level} is not supported; use MQTT 3.1.1 (4) or 5"
                    ),
                ))
            }
            Err(Error5::InvalidProtocol) => {
                return Err(Violation::new(
                    Close::UnsupportedVersion,
                    "not an MQTT 3.1.1 or 5 CONNECT (protocol name is not \"MQTT\")",
                ))
            }
            Err(e) => return Err(Violation::new(Close::Malformed, format!("CONNECT: {e}"))),
        };
        Ok(Some(Inbound::Connect(connect)))
    }

    fn decode_v4(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, Violation> {
        if self.frame(buf)?.is_none() {
            return Ok(None);
        }
        let packet = v4::Packet::read(buf, usize::MAX)
            .map_err(|e| Violation::new(Close::Malformed, e.to_string()))?;
        let inbound = match packet {
            v4::Packet::Publish(p) => {
                let qos = match p.qos {
                    rumqttc::mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
                    rumqttc::mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
                    rumqttc::mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
                };
                let topic = Bytes::from(p.topic.into_bytes());
                check_topic(&topic)?;
                Inbound::Publish(Publish {
                    topic,
                    payload: p.payload,
                    qos,
                    pkid: p.pkid,
                    dup: p.dup,
                    // 3.1.1 has no user properties.
                    trace: None,
                })
            }
            v4::Packet::PubRel(r) => self.release(r.pkid),
            v4::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s.filters.len(),
            },
            v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics.len(),
            },
            v4::Packet::PingReq => Inbound::PingReq,
            v4::Packet::Disconnect => Inbound::Disconnect,
            v4::Packet::Connect(_) => return Err(second_connect()),
            other => return Err(broker_only(&format!("{other:?}"))),
        };
        Ok(Some(inbound))
    }

    fn decode_v5(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, Violation> {
        let Some(header) = self.frame(buf)? else {
            return Ok(None);
        };
        // rumqttc's reader refuses the two-byte DISCONNECT (reason 0 implied) that clients send.
        if matches!(header.packet_type(), Ok(v5::PacketType::Disconnect))
            && header.frame_length() == 2
        {
            let _ = buf.split_to(2);
            return Ok(Some(Inbound::Disconnect));
        }
        let packet = v5::Packet::read(buf, None)
            .map_err(|e| Violation::new(Close::Malformed, e.to_string()))?;
        let inbound = match packet {
            v5::Packet::Publish(p) => {
                if p.properties
                    .as_ref()
                    .is_some_and(|pp| pp.topic_alias.is_some())
                {
                    return Err(Violation::new(
                        Close::Protocol,
                        "topic aliases are not accepted (Topic Alias Maximum is 0)",
                    ));
                }
                check_topic(&p.topic)?;
                let qos = match p.qos {
                    QoS5::AtMostOnce => Qos::AtMostOnce,
                    QoS5::AtLeastOnce => Qos::AtLeastOnce,
                    QoS5::ExactlyOnce => Qos::ExactlyOnce,
                };
                Inbound::Publish(Publish {
                    trace: TraceContext::from_publish(p.properties.as_ref()),
                    topic: p.topic,
                    payload: p.payload,
                    qos,
                    pkid: p.pkid,
                    dup: p.dup,
                })
            }
            v5::Packet::PubRel(r) => self.release(r.pkid),
            v5::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s.filters.len(),
            },
            v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters.len(),
            },
            v5::Packet::PingReq(_) => Inbound::PingReq,
            v5::Packet::Disconnect(_) => Inbound::Disconnect,
            v5::Packet::Connect(..) => return Err(second_connect()),
            v5::Packet::Auth(_) => {
                return Err(Violation::new(
                    Close::Protocol,
                    "enhanced authentication (AUTH) is not offered",
                ))
            }
            other => return Err(broker_only(&format!("{other:?}"))),
        };
        Ok(Some(inbound))
    }

    /// PUBREL: the id is released whether or not it was known (a PUBREC may predate a restart).
    fn release(&mut self, pkid: u16) -> Inbound {
        self.awaiting_release.remove(&pkid);
        Inbound::PubRel(pkid)
    }

    /// True if a QoS 2 PUBLISH with this id was received and PUBREC'd, and not yet released.
    pub(crate) fn awaiting_release(&self, pkid: u16) -> bool {
        self.awaiting_release.contains(&pkid)
    }

    /// Writes a reply. `Err` only if the codec cannot encode it (the connection then ends).
    pub(crate) fn encode(&mut self, out: Outbound<'_>, buf: &mut BytesMut) -> Result<(), String> {
        if let Outbound::PubRec {
            pkid,
            accepted: true,
        } = out
        {
            self.awaiting_release.insert(pkid);
        }
        match self.version {
            Some(Version::V5) => encode_v5(out, buf).map_err(|e| e.to_string()),
            // A refused CONNECT of another version is answered in 3.1.1, as that version's
            // clients (and 3.1's) understand.
            _ => encode_v4(out, buf).map_err(|e| e.to_string()),
        }
        .map(|_| ())
    }
}

fn second_connect() -> Violation {
    Violation::new(Close::Protocol, "a second CONNECT on one connection")
}

fn broker_only(packet: &str) -> Violation {
    let name = packet.split(['(', ' ']).next().unwrap_or(packet);
    Violation::new(
        Close::Protocol,
        format!("{name} is not a packet a client sends to this endpoint"),
    )
}

/// A topic name a PUBLISH may carry: UTF-8, not empty, no wildcards, no NUL.
fn check_topic(topic: &[u8]) -> Result<(), Violation> {
    let Ok(text) = std::str::from_utf8(topic) else {
        return Err(Violation::new(Close::Malformed, "topic name is not UTF-8"));
    };
    if text.is_empty() || text.contains(['+', '#', '\0']) {
        return Err(Violation::new(
            Close::Protocol,
            format!("`{text}` is not a valid topic name for PUBLISH"),
        ));
    }
    Ok(())
}

fn encode_v4(out: Outbound<'_>, buf: &mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error> {
    use v4::ConnectReturnCode as Code;
    let packet = match out {
        Outbound::ConnAck(result) => {
            let (code, session_present) = match result {
                Ok(grant) => (Code::Success, grant.session_present),
                Err(refusal) => (
                    match refusal {
                        Refusal::UnsupportedVersion => Code::RefusedProtocolVersion,
                        Refusal::BadClientId => Code::BadClientId,
                        Refusal::BadCredentials => Code::BadUserNamePassword,
                        Refusal::BadAuthMethod => Code::NotAuthorized,
                        Refusal::ServerBusy => Code::ServiceUnavailable,
                    },
                    false,
                ),
            };
            v4::Packet::ConnAck(v4::ConnAck::new(code, session_present))
        }
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Outbound::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Outbound::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Outbound::SubAck { pkid, filters } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            vec![v4::SubscribeReasonCode::Failure; filters],
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Disconnect(_) => return Ok(0),
    };
    packet.write(buf, usize::MAX)
}

fn encode_v5(out: Outbound<'_>, buf: &mut BytesMut) -> Result<usize, Error5> {
    let packet = match out {
        Outbound::ConnAck(Ok(grant)) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: grant.session_present,
            code: v5::ConnectReturnCode::Success,
            properties: Some(v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(grant.receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(grant.max_packet_size),
                assigned_client_identifier: grant.assigned_client_id.clone(),
                // Absent means 0: clients must not send topic aliases.
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: grant.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Outbound::ConnAck(Err(refusal)) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: match refusal {
                Refusal::UnsupportedVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                Refusal::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                Refusal::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                Refusal::ServerBusy => v5::ConnectReturnCode::ServerBusy,
                Refusal::BadAuthMethod => v5::ConnectReturnCode::BadAuthenticationMethod,
            },
            properties: None,
        }),
        Outbound::PubAck { pkid, accepted } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: if accepted {
                v5::PubAckReason::Success
            } else {
                v5::PubAckReason::NotAuthorized
            },
            properties: None,
        }),
        Outbound::PubRec { pkid, accepted } => v5::Packet::PubRec(v5::PubRec {
            pkid,
            reason: if accepted {
                v5::PubRecReason::Success
            } else {
                v5::PubRecReason::NotAuthorized
            },
            properties: None,
        }),
        Outbound::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        Outbound::SubAck { pkid, filters } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; filters],
            properties: Some(v5::SubAckProperties {
                reason_string: Some(SUBSCRIBE_REFUSED.into()),
                user_properties: Vec::new(),
            }),
        }),
        Outbound::UnsubAck { pkid, filters } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; filters],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect(violation) => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: match violation.close {
                Close::Malformed => v5::DisconnectReasonCode::MalformedPacket,
                Close::Protocol | Close::UnsupportedVersion => {
                    v5::DisconnectReasonCode::ProtocolError
                }
                Close::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                Close::TopicNotAccepted => v5::DisconnectReasonCode::TopicNameInvalid,
                Close::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                Close::ShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
                Close::TakenOver => v5::DisconnectReasonCode::SessionTakenOver,
            },
            properties: Some(v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(violation.detail.chars().take(200).collect()),
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }),
    };
    packet.write(buf, None)
}

/// Feeds `input` through a session as a connection would, for fuzzing: the first byte picks
/// the size of the chunks the rest arrives in; every packet is answered as the listener answers
/// it (publishes acknowledged, subscriptions refused); it stops at the first violation or
/// DISCONNECT. Panics if a reply does not parse with the client side of the codec, which is a
/// bug. Returns the number of packets decoded.
#[doc(hidden)]
pub fn exercise(input: &[u8]) -> usize {
    let Some((&first, rest)) = input.split_first() else {
        return 0;
    };
    let chunk = usize::from(first % 64) + 1;
    let mut session = Session::new(4096);
    let grant = Grant {
        session_present: false,
        receive_maximum: 16,
        max_packet_size: 4096,
        server_keep_alive: Some(30),
        assigned_client_id: None,
    };
    let mut buf = BytesMut::new();
    let mut packets = 0;
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let reply = match session.decode(&mut buf) {
                Ok(None) => break,
                Err(v) => {
                    answer(&mut session, Outbound::Disconnect(&v));
                    return packets;
                }
                Ok(Some(packet)) => {
                    packets += 1;
                    match packet {
                        Inbound::Connect(_) => Outbound::ConnAck(Ok(&grant)),
                        Inbound::Publish(p) => match p.qos {
                            Qos::AtMostOnce => continue,
                            Qos::AtLeastOnce => Outbound::PubAck {
                                pkid: p.pkid,
                                accepted: p.pkid % 2 == 0,
                            },
                            Qos::ExactlyOnce => Outbound::PubRec {
                                pkid: p.pkid,
                                accepted: true,
                            },
                        },
                        Inbound::PubRel(pkid) => Outbound::PubComp(pkid),
                        Inbound::Subscribe { pkid, filters } => Outbound::SubAck { pkid, filters },
                        Inbound::Unsubscribe { pkid, filters } => {
                            Outbound::UnsubAck { pkid, filters }
                        }
                        Inbound::PingReq => Outbound::PingResp,
                        Inbound::Disconnect => return packets,
                    }
                }
            };
            answer(&mut session, reply);
        }
    }
    packets
}

/// Encodes a reply and checks that a client could read it.
fn answer(session: &mut Session, reply: Outbound<'_>) {
    let what = format!("{reply:?}");
    let mut out = BytesMut::new();
    if session.encode(reply, &mut out).is_err() || out.is_empty() {
        return;
    }
    let parsed = match session.version() {
        Some(Version::V5) => v5::Packet::read(&mut out, None)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        _ => v4::Packet::read(&mut out, usize::MAX)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(parsed.is_ok(), "reply {what} does not parse: {parsed:?}");
    assert!(out.is_empty(), "reply {what} has trailing bytes");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_connect(user: Option<(&str, &str)>) -> BytesMut {
        let mut c = v4::Connect::new("dev-1");
        c.keep_alive = 30;
        c.clean_session = false;
        if let Some((u, p)) = user {
            c.set_login(u, p);
        }
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        b
    }

    fn v5_connect() -> BytesMut {
        let c = v5::Connect {
            keep_alive: 0,
            client_id: String::new(),
            clean_start: true,
            properties: None,
        };
        let mut b = BytesMut::new();
        v5::Packet::Connect(c, None, Some(v5::Login::new("u", "p")))
            .write(&mut b, None)
            .unwrap();
        b
    }

    fn v4_publish(topic: &str, qos: rumqttc::mqttbytes::QoS, pkid: u16) -> BytesMut {
        let mut p = v4::Publish::new(topic, qos, b"{\"v\":1}".to_vec());
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b
    }

    fn grant() -> Grant {
        Grant {
            session_present: true,
            receive_maximum: 8,
            max_packet_size: 1024,
            server_keep_alive: None,
            assigned_client_id: Some("auto-1".into()),
        }
    }

    #[test]
    fn mqtt_3_1_1_connect_publish_and_replies() {
        let mut s = Session::new(1024);
        let mut buf = v4_connect(Some(("node", "secret-pass-123")));
        buf.extend_from_slice(&v4_publish("a/b", rumqttc::mqttbytes::QoS::AtLeastOnce, 7));
        let Some(Inbound::Connect(c)) = s.decode(&mut buf).unwrap() else {
            panic!("CONNECT first")
        };
        assert_eq!(s.version(), Some(Version::V4));
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.username.as_deref(), Some("node"));
        assert_eq!(c.password.as_deref(), Some("secret-pass-123"));
        assert!(!format!("{c:?}").contains("secret"), "password masked");
        assert!(!c.clean_start);
        let Some(Inbound::Publish(p)) = s.decode(&mut buf).unwrap() else {
            panic!("PUBLISH next")
        };
        assert_eq!(
            (p.pkid, p.qos, &p.topic[..]),
            (7, Qos::AtLeastOnce, &b"a/b"[..])
        );
        assert!(buf.is_empty());

        let mut out = BytesMut::new();
        s.encode(Outbound::ConnAck(Ok(&grant())), &mut out).unwrap();
        s.encode(
            Outbound::PubAck {
                pkid: 7,
                accepted: true,
            },
            &mut out,
        )
        .unwrap();
        s.encode(
            Outbound::SubAck {
                pkid: 3,
                filters: 2,
            },
            &mut out,
        )
        .unwrap();
        assert!(matches!(
            v4::Packet::read(&mut out, 1 << 20).unwrap(),
            v4::Packet::ConnAck(v4::ConnAck {
                code: v4::ConnectReturnCode::Success,
                session_present: true
            })
        ));
        assert_eq!(
            v4::Packet::read(&mut out, 1 << 20).unwrap(),
            v4::Packet::PubAck(v4::PubAck::new(7))
        );
        let v4::Packet::SubAck(ack) = v4::Packet::read(&mut out, 1 << 20).unwrap() else {
            panic!("SUBACK")
        };
        assert_eq!(ack.return_codes, vec![v4::SubscribeReasonCode::Failure; 2]);
    }

    #[test]
    fn mqtt_5_connect_disconnect_and_refusals() {
        let mut s = Session::new(1024);
        let mut buf = v5_connect();
        buf.extend_from_slice(&[0xE0, 0x00]);
        let Some(Inbound::Connect(c)) = s.decode(&mut buf).unwrap() else {
            panic!("CONNECT")
        };
        assert_eq!(s.version(), Some(Version::V5));
        assert!(c.client_id.is_empty() && c.clean_start);
        assert!(matches!(s.decode(&mut buf), Ok(Some(Inbound::Disconnect))));

        let mut out = BytesMut::new();
        s.encode(Outbound::ConnAck(Ok(&grant())), &mut out).unwrap();
        s.encode(
            Outbound::PubAck {
                pkid: 9,
                accepted: false,
            },
            &mut out,
        )
        .unwrap();
        s.encode(
            Outbound::SubAck {
                pkid: 4,
                filters: 1,
            },
            &mut out,
        )
        .unwrap();
        let v5::Packet::ConnAck(ack) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("CONNACK")
        };
        let props = ack.properties.unwrap();
        assert_eq!(props.receive_max, Some(8));
        assert_eq!(props.max_packet_size, Some(1024));
        assert_eq!(props.assigned_client_identifier.as_deref(), Some("auto-1"));
        let v5::Packet::PubAck(ack) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("PUBACK")
        };
        assert_eq!(ack.reason, v5::PubAckReason::NotAuthorized);
        let v5::Packet::SubAck(ack) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("SUBACK")
        };
        assert_eq!(
            ack.return_codes,
            vec![v5::SubscribeReasonCode::NotAuthorized]
        );
    }

    #[test]
    fn broken_rules_end_the_connection_with_a_reason() {
        let violation = |bytes: &[u8]| {
            let mut s = Session::new(1024);
            let mut buf = v4_connect(None);
            s.decode(&mut buf).unwrap();
            buf.extend_from_slice(bytes);
            s.decode(&mut buf).unwrap_err()
        };
        let wildcard = v4_publish("a/+", rumqttc::mqttbytes::QoS::AtLeastOnce, 1);
        assert_eq!(violation(&wildcard).close, Close::Protocol);
        assert_eq!(
            violation(&v4_connect(None)).close,
            Close::Protocol,
            "second CONNECT"
        );
        assert_eq!(
            violation(&[0x40, 0x02, 0x00, 0x01]).close,
            Close::Protocol,
            "PUBACK"
        );
        assert_eq!(violation(&[0xF0, 0x00]).close, Close::Malformed, "type 15");
        // Only the header of a 1 MiB publish: refused before its body arrives.
        let big = violation(&[0x32, 0x80, 0x80, 0x40]);
        assert_eq!(big.close, Close::PacketTooLarge);

        let mut s = Session::new(1024);
        let mut buf = v4_publish("a/b", rumqttc::mqttbytes::QoS::AtMostOnce, 0);
        assert_eq!(
            s.decode(&mut buf).unwrap_err().close,
            Close::Protocol,
            "CONNECT first"
        );

        // MQTT 3.1 ("MQIsdp", level 3): refused with 3.1.1's "unacceptable protocol version".
        let mut s = Session::new(1024);
        let mut buf = BytesMut::from(
            &[
                0x10, 0x10, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 30, 0, 2, b'i', b'd',
            ][..],
        );
        let v = s.decode(&mut buf).unwrap_err();
        assert_eq!(v.close, Close::UnsupportedVersion, "{v:?}");
        let mut out = BytesMut::new();
        s.encode(
            Outbound::ConnAck(Err(Refusal::UnsupportedVersion)),
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x01]);
    }

    #[test]
    fn mqtt_5_topic_aliases_are_refused() {
        let mut s = Session::new(1024);
        let mut buf = v5_connect();
        s.decode(&mut buf).unwrap();
        let mut p = v5::Publish::new("a/b", QoS5::AtLeastOnce, "x", None);
        p.pkid = 1;
        p.properties = Some(v5::PublishProperties {
            topic_alias: Some(1),
            ..v5::PublishProperties::default()
        });
        v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        assert_eq!(s.decode(&mut buf).unwrap_err().close, Close::Protocol);
    }

    #[test]
    fn mqtt_5_user_properties_give_the_trace_context() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut s = Session::new(1024);
        let mut buf = v5_connect();
        s.decode(&mut buf).unwrap();
        for (user, kept) in [
            (
                vec![("traceparent", traceparent), ("tracestate", "v=1")],
                true,
            ),
            (vec![("traceparent", "00-garbage")], false),
            (vec![], false),
        ] {
            let mut p = v5::Publish::new("a/b", QoS5::AtLeastOnce, "x", None);
            p.pkid = 1;
            p.properties = Some(v5::PublishProperties {
                user_properties: user
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..v5::PublishProperties::default()
            });
            v5::Packet::Publish(p).write(&mut buf, None).unwrap();
            let Ok(Some(Inbound::Publish(p))) = s.decode(&mut buf) else {
                panic!("a publish")
            };
            let stored = p.trace.map(|t| t.stored().as_str().to_string());
            let want = kept.then(|| format!("{traceparent} v=1"));
            assert_eq!(
                stored, want,
                "{user:?}: an invalid one is ignored, the publish kept"
            );
        }
    }

    #[test]
    fn qos_2_ids_wait_for_their_release() {
        let mut s = Session::new(1024);
        let mut buf = v4_connect(None);
        s.decode(&mut buf).unwrap();
        let mut out = BytesMut::new();
        s.encode(
            Outbound::PubRec {
                pkid: 5,
                accepted: true,
            },
            &mut out,
        )
        .unwrap();
        assert!(s.awaiting_release(5));
        v4::PubRel::new(5).write(&mut buf).unwrap();
        assert!(matches!(s.decode(&mut buf), Ok(Some(Inbound::PubRel(5)))));
        assert!(!s.awaiting_release(5));
    }

    #[test]
    fn packets_split_anywhere_decode_the_same() {
        let mut stream = v4_connect(Some(("u", "p")));
        for i in 1..20u16 {
            stream.extend_from_slice(&v4_publish("s/t", rumqttc::mqttbytes::QoS::AtLeastOnce, i));
        }
        for chunk in [1, 2, 3, 7, 64] {
            let mut s = Session::new(1024);
            let mut buf = BytesMut::new();
            let mut ids = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(p) = s.decode(&mut buf).unwrap() {
                    if let Inbound::Publish(p) = p {
                        ids.push(p.pkid);
                    }
                }
            }
            assert_eq!(ids, (1..20).collect::<Vec<_>>(), "chunks of {chunk}");
        }
    }

    /// A quick, deterministic stand-in for the fuzz target: random bytes and mutated valid
    /// streams never panic, and every reply parses.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut valid = vec![3u8];
        valid.extend_from_slice(&v5_connect());
        let mut p = v5::Publish::new("sahool/sensors/a/b", QoS5::AtLeastOnce, "{}", None);
        p.pkid = 1;
        let mut b = BytesMut::new();
        v5::Packet::Publish(p).write(&mut b, None).unwrap();
        valid.extend_from_slice(&b);
        valid.extend_from_slice(&[0x82, 0x09, 0, 2, 0, 0, 3, b'a', b'/', b'#', 1]);
        valid.extend_from_slice(&[0xC0, 0x00]);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let input: Vec<u8> = if round % 2 == 0 {
                (0..next() % 200).map(|_| next() as u8).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % v.len();
                    v[i] = next() as u8;
                }
                v
            };
            exercise(&input);
        }
        assert!(exercise(&valid) >= 3, "the valid stream decodes");
    }
}
