//! NATS decentralized auth without `nsc`: operator, account and user NKeys made with the nkeys
//! crate, and the JWTs that chain them (base64url JSON claims signed with ed25519 by the
//! issuer's NKey, as nats-server expects them), plus `.creds` files for users.
#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::KeyPair;
use serde_json::{json, Value};

/// An identity with its signed JWT.
pub struct Signed {
    pub key: KeyPair,
    pub jwt: String,
}

impl Signed {
    fn new(key: KeyPair, jwt: impl FnOnce(&KeyPair) -> String) -> Self {
        let jwt = jwt(&key);
        Self { key, jwt }
    }

    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    pub fn seed(&self) -> String {
        self.key.seed().expect("seed of a generated key")
    }

    /// A `.creds` file as `nsc` writes it: the user JWT, then the user's seed.
    pub fn creds(&self) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n",
            self.jwt,
            self.seed()
        )
    }
}

/// A self-signed operator.
pub fn operator(name: &str) -> Signed {
    let key = KeyPair::new_operator();
    let jwt = sign(
        &key,
        &key.public_key(),
        name,
        json!({ "type": "operator", "version": 2 }),
    );
    Signed { key, jwt }
}

/// An account signed by `operator`, with JetStream and no other limits.
pub fn account(operator: &Signed, name: &str) -> Signed {
    let key = KeyPair::new_account();
    let jwt = sign(
        &operator.key,
        &key.public_key(),
        name,
        json!({
            "type": "account",
            "version": 2,
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            },
            "default_permissions": { "pub": {}, "sub": {} }
        }),
    );
    Signed { key, jwt }
}

/// A user of `account`; `permissions` is `(publish allow, subscribe allow)`, or all when `None`.
pub fn user(account: &Signed, name: &str, permissions: Option<(&[&str], &[&str])>) -> Signed {
    let key = KeyPair::new_user();
    let (publish, subscribe) = match permissions {
        Some((p, s)) => (json!({ "allow": p }), json!({ "allow": s })),
        None => (json!({}), json!({})),
    };
    let jwt = sign(
        &account.key,
        &key.public_key(),
        name,
        json!({
            "type": "user",
            "version": 2,
            "pub": publish,
            "sub": subscribe,
            "subs": -1, "data": -1, "payload": -1
        }),
    );
    Signed { key, jwt }
}

/// Server config lines for operator mode: `account` and a system account (JetStream needs one)
/// preloaded in a memory resolver.
pub fn server_config(dir: &std::path::Path, operator: &Signed, account: &Signed) -> String {
    let op = dir.join("operator.jwt");
    std::fs::write(&op, &operator.jwt).expect("write operator JWT");
    let system = Signed::new(KeyPair::new_account(), |key| {
        sign(
            &operator.key,
            &key.public_key(),
            "SYS",
            json!({ "type": "account", "version": 2 }),
        )
    });
    format!(
        "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
        op.display(),
        system.public_key(),
        system.public_key(),
        system.jwt,
        account.public_key(),
        account.jwt
    )
}

fn sign(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = json!({
        // The server does not check how the id was made.
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = json!({ "typ": "JWT", "alg": "ed25519-nkey" });
    let head = URL_SAFE_NO_PAD.encode(header.to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = issuer
        .sign(format!("{head}.{body}").as_bytes())
        .expect("sign JWT");
    format!("{head}.{body}.{}", URL_SAFE_NO_PAD.encode(signature))
}
