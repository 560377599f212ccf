//! Who may do what: the API token, loopback in `--insecure-local` mode, the
//! per-build token, and webhook signatures.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, header};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::controller::token_hash;
use crate::error::ApiError;

/// The server's credentials.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// `DECAP_API_TOKEN`: required for mutating calls.
    pub api_token: Option<SecretString>,
    /// Let loopback clients mutate without a token (local use only).
    pub insecure_local: bool,
    /// Webhook secrets; several at once during rotation.
    pub webhook_secrets: Vec<SecretString>,
    /// Reading needs the token too: pages, the API's reads, logs and
    /// artifacts (health, metrics, the login page and its assets stay open).
    pub private_reads: bool,
}

/// Who a call on a build's behalf came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The build itself, with its own token.
    Build,
    /// An operator (the API token, or a local client with
    /// `--insecure-local`).
    Operator,
}

/// The client's address, when the server was started with connect info.
pub fn peer<B>(req: &Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl AuthConfig {
    /// Whether `given` is the API token (compared in constant time); false
    /// when none is configured.
    pub fn token_matches(&self, given: &str) -> bool {
        self.api_token
            .as_ref()
            .is_some_and(|t| same(t.expose_secret(), given))
    }

    /// Checks a mutating API call.
    pub fn authorize(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        if let (Some(token), Some(given)) = (&self.api_token, bearer(headers)) {
            if same(token.expose_secret(), given) {
                return Ok(());
            }
            return Err(ApiError::unauthorized("the API token is wrong"));
        }
        if self.insecure_local && peer.is_some_and(|p| p.ip().is_loopback()) {
            return Ok(());
        }
        if self.api_token.is_none() {
            return Err(ApiError::unauthorized(
                "this call changes state and needs the API token, but none is configured: set DECAP_API_TOKEN, or start with --insecure-local to allow loopback clients",
            ));
        }
        Err(ApiError::unauthorized(
            "this call changes state: send Authorization: Bearer <DECAP_API_TOKEN>",
        ))
    }

    /// Checks a call from a build's bctool: its own build token, or what
    /// [`AuthConfig::authorize`] accepts. Says which it was.
    pub fn authorize_build(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
        token_sha256: Option<&str>,
    ) -> Result<Caller, ApiError> {
        if let (Some(expected), Some(given)) = (token_sha256, bearer(headers))
            && same(expected, &token_hash(given))
        {
            return Ok(Caller::Build);
        }
        self.authorize(headers, peer)
            .map(|()| Caller::Operator)
            .map_err(|_| {
                ApiError::unauthorized(
                    "this call needs the build's own token (DECAP_BUILD_TOKEN) or the API token",
                )
            })
    }

    /// Checks `X-Hub-Signature-256` against every configured secret, in
    /// constant time per secret.
    pub fn verify_signature(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
        let sig = headers
            .get("x-hub-signature-256")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing X-Hub-Signature-256"))?;
        let hex_sig = sig
            .strip_prefix("sha256=")
            .ok_or_else(|| ApiError::unauthorized("X-Hub-Signature-256 must be sha256=<hex>"))?;
        let given = hex::decode(hex_sig)
            .map_err(|_| ApiError::unauthorized("X-Hub-Signature-256 is not hex"))?;
        for secret in &self.webhook_secrets {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            else {
                continue;
            };
            mac.update(body);
            if mac.verify_slice(&given).is_ok() {
                return Ok(());
            }
        }
        Err(ApiError::unauthorized(
            "the webhook signature does not match",
        ))
    }
}

/// Signs a body as GitHub does (for tests and load generators).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| {
        // HMAC takes keys of any length; this cannot fail.
        unreachable!("HMAC accepts any key length")
    });
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
