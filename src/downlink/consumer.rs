//! The gateway's durable pull consumer on the commands stream: found (or created, with
//! `create_consumer`) and checked before any command is taken, so a consumer reading another
//! gateway's subject, or one the operator has yet to create, is a clear error, not silence.
//!
//! Least privilege: finding the consumer needs only `$JS.API.CONSUMER.INFO.<stream>.<name>`;
//! creating it `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` (see
//! `config/nats-server.least-privilege.conf`). Nothing here reads stream info.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, ErrorCode};

use crate::config::{Commands, Gateway};

/// How long the server waits for an ack before delivering a command again. An ack follows the
/// inbox commit (milliseconds); a redelivery after a lost ack is acked and ignored.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Commands delivered and not yet acked; commands are few, this only bounds a backlog's burst.
const MAX_ACK_PENDING: i64 = 256;

/// Where this gateway's commands come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub(crate) stream: String,
    pub(crate) consumer: String,
    pub(crate) filter: String,
    pub(crate) create: bool,
}

impl Source {
    pub(crate) fn new(commands: &Commands, gateway: &Gateway) -> Self {
        Self {
            stream: commands.stream.as_str().to_string(),
            consumer: commands.consumer_name(gateway),
            filter: commands.filter_subject(gateway),
            create: commands.create_consumer,
        }
    }

    /// The consumer's configuration when the gateway creates it: every command kept until
    /// acked (no `max_deliver`), delivered from the first one the stream holds.
    fn config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.consumer.clone()),
            filter_subject: self.filter.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: MAX_ACK_PENDING,
            description: Some("sahool-gateway: actuator commands for one gateway".into()),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    #[error("the commands stream `{stream}` does not exist on the NATS server: the platform keeps commands in it (subjects sahool.commands.>); create it, or name the right one in [commands] stream")]
    StreamMissing { stream: String },
    #[error("the durable consumer `{consumer}` does not exist on stream `{stream}`, and [commands] create_consumer = false: create it with filter subject `{filter}` and explicit acks (README, \"Driving actuators\"), or set create_consumer = true")]
    ConsumerMissing {
        stream: String,
        consumer: String,
        filter: String,
    },
    #[error("the consumer `{consumer}` on stream `{stream}` filters `{found}`, not this gateway's `{expected}`: it would take another gateway's commands; delete it or point [commands] consumer at this gateway's own")]
    WrongFilter {
        stream: String,
        consumer: String,
        found: String,
        expected: String,
    },
    #[error("JetStream refused {what} `{consumer}` on stream `{stream}`: {detail}")]
    Refused {
        what: &'static str,
        stream: String,
        consumer: String,
        detail: String,
    },
}

/// Finds the consumer (creating it if allowed and missing) and checks its filter.
pub(crate) async fn bind(
    js: &jetstream::Context,
    source: &Source,
) -> Result<PullConsumer, BindError> {
    let found = js
        .get_consumer_from_stream::<pull::Config, _, _>(&source.consumer, &source.stream)
        .await;
    let mut consumer = match found {
        Ok(consumer) => consumer,
        Err(e) => match not_found(&e) {
            Some(Missing::Stream) => return Err(source.stream_missing()),
            Some(Missing::Consumer) if source.create => create(js, source).await?,
            Some(Missing::Consumer) => return Err(source.consumer_missing()),
            None => return Err(source.refused("a lookup of consumer", &e)),
        },
    };
    let info = consumer
        .info()
        .await
        .map_err(|e| source.refused("a lookup of consumer", &e))?;
    let found = info.config.filter_subject.clone();
    if found != source.filter {
        return Err(BindError::WrongFilter {
            stream: source.stream.clone(),
            consumer: source.consumer.clone(),
            found,
            expected: source.filter.clone(),
        });
    }
    Ok(consumer)
}

async fn create(js: &jetstream::Context, source: &Source) -> Result<PullConsumer, BindError> {
    tracing::info!(stream = %source.stream, consumer = %source.consumer, filter = %source.filter, "creating the commands consumer");
    js.create_consumer_on_stream(source.config(), &source.stream)
        .await
        .map_err(|e| match not_found(&e) {
            Some(Missing::Stream) => source.stream_missing(),
            _ => source.refused("the creation of consumer", &e),
        })
}

enum Missing {
    Stream,
    Consumer,
}

fn not_found(e: &async_nats::jetstream::stream::ConsumerError) -> Option<Missing> {
    match e.kind() {
        ConsumerErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            Some(Missing::Stream)
        }
        ConsumerErrorKind::JetStream(js) if js.error_code() == ErrorCode::CONSUMER_NOT_FOUND => {
            Some(Missing::Consumer)
        }
        _ => None,
    }
}

impl Source {
    fn stream_missing(&self) -> BindError {
        BindError::StreamMissing {
            stream: self.stream.clone(),
        }
    }

    fn consumer_missing(&self) -> BindError {
        BindError::ConsumerMissing {
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            filter: self.filter.clone(),
        }
    }

    fn refused(&self, what: &'static str, e: &dyn std::fmt::Display) -> BindError {
        BindError::Refused {
            what,
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            detail: e.to_string(),
        }
    }
}
