//! What every input shares between receiving bytes and a committed row: the mapping from
//! payloads to readings, flood protection, the screening that dead-letters rejections with their
//! raw bytes, and the commit queue that acknowledges a sender only after the store committed.

pub(crate) mod admission;
pub(crate) mod flood;
pub mod intake;
pub mod mapping;
