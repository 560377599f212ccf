//! Who may do what: the API token, this machine's own browser or CLI in
//! `--insecure-local` mode, the per-build token, and webhook signatures.
//!
//! `--insecure-local` trusts a request only when all of these hold (see
//! [`local_request`]):
//!
//! * it came over TCP from a loopback address, not over the build socket
//!   (whose requests carry [`crate::listen::FromBuild`]);
//! * its `Host` is a loopback name (`localhost`, `127.x.y.z`, `[::1]`, with
//!   or without a port), so that a DNS-rebound name of another site does not
//!   count;
//! * its `Origin`, when it has one, is `http://` + that same `Host` (`null`
//!   is not), and the browser did not mark it `Sec-Fetch-Site: cross-site`
//!   or `same-site`: a page of another site open in a local browser cannot
//!   act through it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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

/// The client's address, when the request came over TCP; never for a
/// request from the build socket, even if it carried an address.
pub fn peer<B>(req: &Request<B>) -> Option<SocketAddr> {
    peer_of(req.extensions())
}

/// [`peer`] from a request's extensions.
pub fn peer_of(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    if extensions.get::<crate::listen::FromBuild>().is_some() {
        return None;
    }
    extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// A header's value as shown in a message: at most 100 characters,
/// escaped.
fn shown(v: &axum::http::HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes())
        .chars()
        .take(100)
        .flat_map(char::escape_debug)
        .collect()
}

/// Whether a `Host` (or an origin's host and port) names this machine's
/// loopback: `localhost`, `127.x.y.z` or `[::1]`, with an optional port.
/// Answers the host (lower case) and the port (80 when not given).
fn loopback_host(host: &str) -> Option<(String, u16)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        let ip: std::net::Ipv6Addr = v6.parse().ok()?;
        if !ip.is_loopback() {
            return None;
        }
        (format!("[{ip}]"), port)
    } else {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        };
        let name = name.to_ascii_lowercase();
        let local = name == "localhost"
            || name
                .parse::<Ipv4Addr>()
                .is_ok_and(|ip| IpAddr::V4(ip).is_loopback());
        if !local {
            return None;
        }
        (name, port)
    };
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse().ok().filter(|&p| p != 0)?
        }
        Some(_) => return None,
    };
    Some((name, port))
}

/// Checks that a request comes from this machine's own browser or CLI (see
/// the module's documentation); otherwise says which requests it is one of,
/// as in "requests from another site (Origin https://evil.example)".
pub fn local_request(headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), String> {
    let Some(peer) = peer else {
        return Err(
            "requests that do not come over TCP from this machine (builds' requests included)"
                .into(),
        );
    };
    if !peer.ip().is_loopback() && !peer.ip().to_canonical().is_loopback() {
        return Err(format!("requests from {}", peer.ip()));
    }
    let Some(host_header) = headers.get(header::HOST) else {
        return Err("requests without a Host header".into());
    };
    let Some(host) = host_header.to_str().ok().and_then(loopback_host) else {
        return Err(format!(
            "requests for another host name (Host {}; only localhost, 127.x.y.z and [::1] count)",
            shown(host_header)
        ));
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .and_then(loopback_host)
            .is_some_and(|o| o == host);
        if !same {
            return Err(format!(
                "requests from another site (Origin {})",
                shown(origin)
            ));
        }
    }
    if let Some(site) = headers.get("sec-fetch-site")
        && matches!(site.as_bytes(), b"cross-site" | b"same-site")
    {
        return Err(format!(
            "requests a browser marks as coming from another site (Sec-Fetch-Site: {})",
            shown(site)
        ));
    }
    Ok(())
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

    /// Whether `--insecure-local` lets this request act without a token
    /// (see [`local_request`]).
    pub fn is_local(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> bool {
        self.insecure_local && local_request(headers, peer).is_ok()
    }

    /// Why `--insecure-local` does not trust this request, as a sentence to
    /// add to a refusal; `None` when the mode is off or it does trust it.
    pub fn local_refusal(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<String> {
        if !self.insecure_local {
            return None;
        }
        local_request(headers, peer)
            .err()
            .map(|which| format!("{which} are not trusted as local (--insecure-local)"))
    }

    /// [`Self::local_refusal`] in parentheses after a leading space, to end
    /// a refusal with; empty when there is nothing to say.
    pub fn local_refusal_note(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> String {
        self.local_refusal(headers, peer)
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    }

    /// Checks a mutating API call.
    pub fn authorize(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        if let (Some(token), Some(given)) = (&self.api_token, bearer(headers)) {
            if same(token.expose_secret(), given) {
                return Ok(());
            }
            return Err(ApiError::unauthorized("the API token is wrong"));
        }
        let why_not_local = match self.insecure_local {
            false => None,
            true => match local_request(headers, peer) {
                Ok(()) => return Ok(()),
                Err(which) => Some(which),
            },
        };
        let send = if self.api_token.is_none() {
            "none is configured: set DECAP_API_TOKEN"
        } else {
            "send Authorization: Bearer <DECAP_API_TOKEN>"
        };
        Err(ApiError::unauthorized(match why_not_local {
            Some(which) => format!(
                "this call changes state and needs the API token: {which} are not trusted as local (--insecure-local); {send}"
            ),
            None if self.api_token.is_none() => "this call changes state and needs the API token, but none is configured: set DECAP_API_TOKEN, or start with --insecure-local to trust this machine's own browser and CLI".to_owned(),
            None => format!("this call changes state: {send}"),
        }))
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
                let why = self
                    .local_refusal(headers, peer)
                    .map(|r| format!("; {r}"))
                    .unwrap_or_default();
                ApiError::unauthorized(format!(
                    "this call needs the build's own token (DECAP_BUILD_TOKEN) or the API token{why}"
                ))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn lo() -> Option<SocketAddr> {
        Some("127.0.0.1:50000".parse().unwrap())
    }

    #[test]
    fn loopback_names_with_or_without_a_port() {
        for (host, want) in [
            ("localhost", ("localhost", 80)),
            ("LocalHost:9090", ("localhost", 9090)),
            ("127.0.0.1", ("127.0.0.1", 80)),
            ("127.3.2.1:8080", ("127.3.2.1", 8080)),
            ("[::1]", ("[::1]", 80)),
            ("[::1]:9090", ("[::1]", 9090)),
            ("[0:0:0:0:0:0:0:1]:9090", ("[::1]", 9090)),
        ] {
            assert_eq!(
                loopback_host(host),
                Some((want.0.to_owned(), want.1)),
                "{host}"
            );
        }
        for host in [
            "",
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "0.0.0.0:9090",
            "[::2]",
            "[::1",
            "::1",
            "localhost:",
            "localhost:x",
            "localhost:0",
            "localhost:99999",
            "localhost:9090:1",
            "127.1",
        ] {
            assert_eq!(loopback_host(host), None, "{host:?}");
        }
    }

    #[test]
    fn local_trust_needs_loopback_a_loopback_host_and_no_other_site() {
        let ok = |h: &[(&'static str, &str)], peer| local_request(&headers(h), peer);
        ok(&[("host", "localhost:9090")], lo()).unwrap();
        ok(
            &[
                ("host", "127.0.0.1:9090"),
                ("origin", "http://127.0.0.1:9090"),
                ("sec-fetch-site", "same-origin"),
            ],
            lo(),
        )
        .unwrap();
        ok(
            &[("host", "[::1]:9090")],
            Some("[::1]:4000".parse().unwrap()),
        )
        .unwrap();
        ok(
            &[("host", "localhost")],
            Some("[::ffff:127.0.0.1]:4000".parse().unwrap()),
        )
        .unwrap();

        for (h, peer, why) in [
            (
                vec![("host", "localhost:9090")],
                None,
                "do not come over TCP",
            ),
            (
                vec![("host", "localhost:9090")],
                Some("192.0.2.7:4000".parse().unwrap()),
                "from 192.0.2.7",
            ),
            (vec![], lo(), "without a Host"),
            (
                vec![("host", "evil.example:9090")],
                lo(),
                "Host evil.example:9090",
            ),
            (
                vec![("host", "evil.example"), ("origin", "http://evil.example")],
                lo(),
                "Host evil.example",
            ),
            (
                vec![
                    ("host", "localhost:9090"),
                    ("origin", "https://evil.example"),
                ],
                lo(),
                "Origin https://evil.example",
            ),
            (
                vec![("host", "localhost:9090"), ("origin", "null")],
                lo(),
                "Origin null",
            ),
            (
                vec![
                    ("host", "localhost:9090"),
                    ("origin", "http://localhost:3000"),
                ],
                lo(),
                "Origin http://localhost:3000",
            ),
            (
                vec![
                    ("host", "localhost:9090"),
                    ("origin", "https://localhost:9090"),
                ],
                lo(),
                "another site",
            ),
            (
                vec![
                    ("host", "localhost:9090"),
                    ("origin", "http://127.0.0.1:9090"),
                ],
                lo(),
                "another site",
            ),
            (
                vec![("host", "localhost:9090"), ("sec-fetch-site", "cross-site")],
                lo(),
                "Sec-Fetch-Site: cross-site",
            ),
        ] {
            let e = ok(&h, peer).expect_err(why);
            assert!(e.contains(why), "{h:?}: {e}");
        }
    }

    #[test]
    fn a_refusal_says_why_local_trust_did_not_apply() {
        let auth = AuthConfig {
            api_token: Some(SecretString::from("t")),
            insecure_local: true,
            ..AuthConfig::default()
        };
        auth.authorize(&headers(&[("host", "localhost")]), lo())
            .unwrap();
        let e = auth
            .authorize(
                &headers(&[("host", "localhost"), ("origin", "https://evil.example")]),
                lo(),
            )
            .unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(
            e.message,
            "this call changes state and needs the API token: requests from another site (Origin https://evil.example) are not trusted as local (--insecure-local); send Authorization: Bearer <DECAP_API_TOKEN>"
        );
        // The token works from anywhere.
        auth.authorize(
            &headers(&[("host", "evil.example"), ("authorization", "Bearer t")]),
            None,
        )
        .unwrap();
        // Header values are shown escaped and cut short.
        let e = auth
            .authorize(
                &headers(&[("host", &format!("\"{}", "x".repeat(300)))]),
                lo(),
            )
            .unwrap_err();
        assert!(e.message.contains("Host \\\"xxx"), "{}", e.message);
        assert!(e.message.len() < 400, "{}", e.message);
    }
}
