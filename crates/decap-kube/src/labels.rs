//! Label values for build pods.
//!
//! A label value is at most 63 characters of `[A-Za-z0-9._-]`, beginning and
//! ending with a letter or digit. Team and project names already fit; branch
//! names often do not (`feature/login`, long names). A value that does not
//! fit is sanitized and given a hash of the original as a suffix, so two
//! branches that sanitize alike (`a/b`, `a-b`) still get different labels.
//! The full values are kept as annotations.

use sha2::{Digest, Sha256};

/// The longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;
/// Hex digits of the hash suffix.
const HASH_LEN: usize = 10;

/// Whether Kubernetes accepts `value` as a label value as it is.
pub fn is_valid_label_value(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    let bytes = value.as_bytes();
    value.len() <= MAX_LABEL_VALUE
        && bytes.first().copied().is_some_and(alnum)
        && bytes.last().copied().is_some_and(alnum)
        && bytes
            .iter()
            .all(|&c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
}

/// `value` as a valid label value: unchanged when it is one already, else
/// sanitized, shortened and suffixed with a hash of the original.
pub fn label_value(value: &str) -> String {
    if is_valid_label_value(value) {
        return value.to_owned();
    }
    let hash = hex::encode(Sha256::digest(value.as_bytes()));
    let hash = &hash[..HASH_LEN];
    let sanitized: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL_VALUE - HASH_LEN - 1)
        .collect();
    let trimmed = sanitized.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        hash.to_owned()
    } else {
        format!("{trimmed}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_values_are_kept() {
        for v in [
            "main",
            "release-1.2",
            "a",
            "",
            "v1_2",
            "x".repeat(63).as_str(),
        ] {
            assert_eq!(label_value(v), v);
        }
    }

    #[test]
    fn invalid_values_become_valid_and_distinct() {
        let cases = [
            "feature/login",
            "feature-login-",
            "-leading",
            "ü-branch",
            "////",
            &"y".repeat(64),
            &"z/".repeat(100),
        ];
        let mut seen = std::collections::HashSet::new();
        for raw in cases {
            let v = label_value(raw);
            assert!(is_valid_label_value(&v), "{raw:?} gave {v:?}");
            assert!(v.len() <= MAX_LABEL_VALUE);
            assert!(seen.insert(v.clone()), "{raw:?} collided as {v:?}");
        }
        // Sanitizing alike does not collide: the hash tells them apart.
        assert_ne!(label_value("a/b"), label_value("a+b"));
        assert!(label_value("feature/login").starts_with("feature-login-"));
    }
}
