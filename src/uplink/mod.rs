//! The way out: buffered rows rendered as SAHOOL events and published to JetStream in order,
//! deleted only after their PubAck, over NATS links this module opens and watches.

pub mod event;
pub(crate) mod forward;
pub(crate) mod nats;
