//! `[gateway]`: who this gateway is (its id, the default tenant) and where it keeps its data.

use std::path::PathBuf;

use serde::Deserialize;

use super::Ident;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// In every event's `source.gateway_id`; also the root of MQTT client ids.
    pub id: Ident,
    /// Tenant of fields that do not name their own.
    pub tenant_id: Ident,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/sahool-gateway")
}
