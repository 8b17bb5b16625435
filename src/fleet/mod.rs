//! What the platform sees of a fleet of gateways (DESIGN §9). For now the heartbeat
//! ([`heartbeat`]); remote config and its events come later.

pub(crate) mod heartbeat;
