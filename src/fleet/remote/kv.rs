//! The KV requests remote config makes, each on a subject that names the gateway's key, so
//! a NATS user can be allowed exactly its own key (`config/nats-server.gateway-user.template`):
//! - the bucket's stream info (`$JS.API.STREAM.INFO.KV_<bucket>`), to open it;
//! - the key's watch: an ordered push consumer created with a name, so its create subject
//!   carries the filter (`$JS.API.CONSUMER.CREATE.KV_<bucket>.<name>.$KV.<bucket>.<key>`;
//!   the client's own `watch` creates it nameless, on a subject that names no key); its
//!   flow-control replies go to `$JS.FC.KV_<bucket>.>`;
//! - the latest revision (`doctor`): a direct get by subject
//!   (`$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`; the bucket needs `allow_direct`,
//!   which KV buckets made by nats-server 2.9 and later have).

use async_nats::jetstream::{self, consumer, stream::Stream};
use async_nats::HeaderMap;

/// The stream that holds a bucket.
pub(crate) fn stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject a key's revisions are stored under.
pub(crate) fn key_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The request subject of [`open`], for telling a denial apart.
pub(crate) fn open_api(bucket: &str) -> String {
    format!("$JS.API.STREAM.INFO.{}", stream_name(bucket))
}

/// The request subject of [`latest`], for telling a denial apart.
pub(crate) fn latest_api(bucket: &str, key: &str) -> String {
    format!(
        "$JS.API.DIRECT.GET.{}.{}",
        stream_name(bucket),
        key_subject(bucket, key)
    )
}

/// One revision of the key: a put with its text, or a delete or purge (no text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revision {
    pub(crate) revision: u64,
    /// `None` for a delete or purge marker.
    pub(crate) text: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum KvError {
    #[error("KV bucket `{bucket}` not available: {error}")]
    Bucket { bucket: String, error: String },
    #[error("cannot watch the key: {0}")]
    Watch(String),
    #[error("cannot read the key: {0}")]
    Read(String),
}

/// Opens the bucket's stream (its info request is the only bucket-wide one).
pub(crate) async fn open(js: &jetstream::Context, bucket: &str) -> Result<Stream, KvError> {
    js.get_stream(stream_name(bucket))
        .await
        .map_err(|e| KvError::Bucket {
            bucket: bucket.to_string(),
            error: e.to_string(),
        })
}

/// The key's revisions, the newest first, then each new one, until the link is lost.
pub(crate) async fn watch(
    client: &async_nats::Client,
    stream: &Stream,
    bucket: &str,
    key: &str,
) -> Result<consumer::push::Ordered, KvError> {
    let inbox = client.new_inbox();
    // Unique per watch: an ordered consumer is ephemeral and recreated under this name.
    let unique = inbox.rsplit('.').next().unwrap_or("watch");
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            name: Some(format!("cfg-{unique}")),
            deliver_subject: inbox,
            description: Some("sahool-gateway remote config watch".into()),
            filter_subject: key_subject(bucket, key),
            replay_policy: consumer::ReplayPolicy::Instant,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| KvError::Watch(e.to_string()))?;
    consumer
        .messages()
        .await
        .map_err(|e| KvError::Watch(e.to_string()))
}

/// A watched message as a revision.
pub(crate) fn revision_of(message: &jetstream::Message) -> Result<Revision, KvError> {
    let revision = message
        .info()
        .map_err(|e| KvError::Watch(e.to_string()))?
        .stream_sequence;
    Ok(Revision {
        revision,
        text: text_of(message.headers.as_ref(), &message.payload),
    })
}

/// The key's latest revision, `None` when it has none.
pub(crate) async fn latest(
    stream: &Stream,
    bucket: &str,
    key: &str,
) -> Result<Option<Revision>, KvError> {
    match stream
        .direct_get_last_for_subject(key_subject(bucket, key))
        .await
    {
        Ok(m) => Ok(Some(Revision {
            revision: m.sequence,
            text: text_of(Some(&m.headers), &m.payload),
        })),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(KvError::Read(e.to_string())),
    }
}

/// A put's text; `None` for a delete or purge marker.
fn text_of(headers: Option<&HeaderMap>, payload: &[u8]) -> Option<String> {
    let marker = headers
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
    (!marker).then(|| String::from_utf8_lossy(payload).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_have_no_text_and_puts_keep_theirs() {
        let mut del = HeaderMap::new();
        del.insert("KV-Operation", "DEL");
        assert_eq!(text_of(Some(&del), b""), None);
        let mut purge = HeaderMap::new();
        purge.insert("KV-Operation", "PURGE");
        assert_eq!(text_of(Some(&purge), b""), None);
        assert_eq!(text_of(None, b"[nats]").as_deref(), Some("[nats]"));
        assert_eq!(
            key_subject("sahool_gateway_config_t", "gw-1"),
            "$KV.sahool_gateway_config_t.gw-1"
        );
    }
}
