//! `[fleet] config_bucket`: the tenant's KV bucket exists, this user may open it and read the
//! gateway's key (the requests the gateway makes, see [`crate::fleet::remote::kv`]), and the
//! key's latest revision is one the gateway would take ([`vet`], as a revision arriving).

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{Context, ErrorCode};

use super::nats::unless_denied;
use super::{Check, Verdict};
use crate::config::Config;
use crate::fleet::remote::core::vet;
use crate::fleet::remote::kv::{self, KvError};
use crate::uplink::nats::Link;

const NAME: &str = "config_bucket";

/// Where the permissions a gateway needs for its key are shipped.
const TEMPLATE: &str = "config/nats-server.gateway-user.template";

pub(super) async fn check(js: &Context, link: &Link, config: &Config, bucket: &str) -> Check {
    let key = config.gateway.id.as_str();
    let open_api = kv::open_api(bucket);
    let Some(opened) = unless_denied(link, &open_api, js.get_stream(kv::stream_name(bucket))).await
    else {
        return denied(&open_api);
    };
    let stream = match opened {
        Ok(s) => s,
        Err(e) if is_missing(&e) => {
            return Check::fail(
                NAME,
                format!("bucket {bucket} does not exist"),
                format!("have the platform create it: nats kv add {bucket} --history 5"),
            )
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot open bucket {bucket}: {e}"),
                format!("see that this user may publish to {open_api}"),
            )
        }
    };
    if !stream.cached_info().config.allow_direct {
        return Check::with_fix(
            Verdict::Warn,
            NAME,
            format!("bucket {bucket} exists, without direct gets: doctor cannot read key {key} with per-key permissions"),
            format!("nats stream edit {} --allow-direct", kv::stream_name(bucket)),
        );
    }
    let latest_api = kv::latest_api(bucket, key);
    let Some(latest) = unless_denied(link, &latest_api, kv::latest(&stream, bucket, key)).await
    else {
        return denied(&latest_api);
    };
    latest_check(latest, config, bucket, key)
}

/// What the key's latest revision says.
fn latest_check(
    latest: Result<Option<kv::Revision>, KvError>,
    config: &Config,
    bucket: &str,
    key: &str,
) -> Check {
    let put = format!("put a corrected revision: nats kv put {bucket} {key} \"$(cat gateway.toml)\" (check it first with `sahool-gateway validate --config gateway.toml`)");
    match latest {
        Err(e) => Check::fail(NAME, format!("bucket {bucket}: {e}"), format!("see that this user may publish to {}", kv::latest_api(bucket, key))),
        Ok(None) => Check::ok(NAME, format!("bucket {bucket} has no key {key} yet: the gateway runs its local file")),
        Ok(Some(kv::Revision { revision, text: None })) => Check::ok(
            NAME,
            format!("bucket {bucket}: key {key} deleted at revision {revision}; the gateway keeps its last known good config"),
        ),
        Ok(Some(kv::Revision { revision, text: Some(text) })) => match vet(&text, config) {
            Ok(_) => Check::ok(NAME, format!("bucket {bucket}: key {key} revision {revision} validates")),
            Err(refusal) => Check::fail(
                NAME,
                format!("bucket {bucket}: key {key} revision {revision} would be refused ({}): {}", refusal.check, refusal.reason),
                put,
            ),
        },
    }
}

fn is_missing(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn denied(api: &str) -> Check {
    Check::fail(
        NAME,
        format!("this user may not publish to {api}"),
        format!("give the gateway's user the remote config lines of {TEMPLATE}"),
    )
}
