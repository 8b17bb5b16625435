//! Commands from the platform into the inbox: the gateway's own NATS link, its durable pull
//! consumer ([`super::consumer`]), and for each message: parse, commit the inbox row, ack,
//! hand the command to the driver.
//!
//! # Invariants
//! 1. A message is acked only after its inbox row committed (or after the inbox showed its
//!    `command_id` known, or after a message that cannot be a command was dead-lettered).
//!    A commit that fails leaves the message unacked: JetStream delivers it again.
//! 2. Only a command whose row is new reaches the driver; a redelivery or republish of a known
//!    `command_id` is acked and goes no further.
//! 3. Losing NATS (or the consumer) never stops the driver: deadlines are enforced and queued
//!    commands applied while this loop reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::consumer::{self, Source};
use super::driver::Input;
use super::Command;
use crate::common::backoff::Backoff;
use crate::common::metrics::Metrics;
use crate::ingest::mapping::Reason;
use crate::reading::Timestamp;
use crate::store::{Append, InboxCommand, NewDeadLetter, Received, StoreHandle};
use crate::uplink::nats::Connector;

pub(crate) struct Receiver {
    pub(crate) connector: Connector,
    pub(crate) source: Source,
    pub(crate) gateway_id: String,
    pub(crate) store: StoreHandle,
    pub(crate) driver: mpsc::Sender<Input>,
    /// Where `/readyz` and `status` read the consumer's state.
    pub(crate) metrics: Arc<Metrics>,
}

/// Why the loop left a link; the next link starts after a backoff.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("{0}")]
    Bind(#[from] consumer::BindError),
    #[error("the commands consumer stopped delivering: {0}")]
    Messages(String),
    #[error("the buffer failed: {0}")]
    Store(String),
}

impl Receiver {
    /// Runs until `shutdown`.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let lost = tokio::select! {
                _ = shutdown.changed() => return,
                lost = self.link(&mut backoff) => lost,
            };
            tracing::warn!(error = %lost, "commands: no consumer; reconnecting (deadlines and queued commands go on meanwhile)");
            self.set_state(Err(lost.to_string()));
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One link: connect, bind, take messages until something fails.
    async fn link(&self, backoff: &mut Backoff) -> Lost {
        let link = match self.connector.open().await {
            Ok(link) => link,
            Err(e) => return Lost::Connect(e.to_string()),
        };
        let js = jetstream::new(link.client.clone());
        let consumer = match consumer::bind(&js, &self.source).await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => return Lost::Messages(e.to_string()),
        };
        tracing::info!(stream = %self.source.stream, consumer = %self.source.consumer, "commands: consumer bound; taking commands");
        self.set_state(Ok(()));
        backoff.reset();
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => return Lost::Messages(e.to_string()),
            };
            if let Err(e) = self.take(message).await {
                return e;
            }
        }
        Lost::Messages("the message stream ended".into())
    }

    /// One message: parse, commit, ack, hand over.
    async fn take(&self, message: jetstream::Message) -> Result<(), Lost> {
        let command = match Command::parse(&message.payload, &self.gateway_id) {
            Ok(c) => c,
            Err(e) => {
                self.dead_letter(&message, &e.to_string()).await?;
                // Never a command: delivering it again would not make it one.
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(());
            }
        };
        let row = InboxCommand::new(&command, message.payload.to_vec(), Timestamp::now());
        let received = self
            .store
            .command_received(row)
            .await
            .map_err(|e| Lost::Store(e.to_string()))?;
        if let Err(e) = message.ack().await {
            // Delivered again after ack_wait, then found known: nothing is applied twice.
            tracing::debug!(error = %e, "commands: ack not sent");
        }
        match received {
            Received::New => {
                let _ = self.driver.send(Input::Command(command)).await;
            }
            Received::Known { .. } => {
                tracing::debug!(command_id = %command.command_id, "commands: known command delivered again; acked, not applied");
            }
        }
        Ok(())
    }

    /// A message on the commands subject that is not a command this gateway can take: kept with
    /// its bytes for the operator, as every input that cannot be used is.
    async fn dead_letter(&self, message: &jetstream::Message, why: &str) -> Result<(), Lost> {
        tracing::warn!(subject = %message.subject, error = why, "commands: not a valid command; dead-lettered");
        let append = Append {
            dead_letters: vec![NewDeadLetter {
                source: "commands".into(),
                reason: Reason::Malformed,
                detail: format!("command on {}: {why}", message.subject),
                raw: Arc::from(message.payload.as_ref()),
                topic: Some(message.subject.to_string()),
                device: None,
                sensor_type: None,
            }],
            ..Append::default()
        };
        crate::ingest::intake::append_once(&self.store, append)
            .await
            .map(|_| ())
            .map_err(|e| Lost::Store(e.to_string()))
    }

    fn set_state(&self, state: Result<(), String>) {
        self.metrics.set_commands_consumer(Some(state));
    }
}
