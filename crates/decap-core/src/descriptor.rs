//! `project.json`, the project descriptor, and `managedRefRegex` matching.
//!
//! The original Decap fields are kept as they were (`buildImage` required,
//! `repoManager`, `repoUrl`, `repoDescription`, `managedRefRegex`); Decap adds
//! `buildTimeoutSeconds`, `env` and `resources`. Unknown fields are rejected so
//! that a typo (`managed-branch-regex`, the issue-era spelling) is reported
//! instead of silently building every ref.

use std::collections::BTreeMap;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The build timeout when `project.json` does not set one.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The longest build timeout a descriptor may ask for.
pub const MAX_BUILD_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// What the build may use. Every executor enforces them: the local one
/// with cgroups and a workspace of that size, the Kubernetes one as the
/// pod's requests and limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CPU, in Kubernetes quantity syntax (`500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory, in Kubernetes quantity syntax (`1Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Processes and threads at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// The workspace's size (sources, artifacts, home and `/tmp`), in
    /// Kubernetes quantity syntax (`10Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// Whether a build reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Network {
    /// Outbound connections (clones, package installs), but no route to the
    /// host's own services.
    #[default]
    Outbound,
    /// No network at all (Decap's own channel keeps working).
    None,
}

/// A parsed `project.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Descriptor {
    /// The container image the build runs in (required, as in the original,
    /// unless `language` names a preset, whose image is then the default).
    #[serde(default)]
    pub build_image: String,
    /// The project's language: with it the project needs no `build.sh`
    /// (see [`crate::preset`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<crate::preset::Language>,
    /// Which repository manager serves the project's refs (`github`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_manager: Option<String>,
    /// The project's repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_url: Option<String>,
    /// A line about the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_description: Option<String>,
    /// Refs that webhook-triggered builds run for; every ref when absent.
    /// Matched against the whole short ref name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_ref_regex: Option<String>,
    /// How long a build may run before it is stopped as `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_timeout_seconds: Option<u64>,
    /// Extra environment for the build (never secrets: this file is in git).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Resource requests for the build container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Whether the build reaches the network (`outbound`, the default, or
    /// `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// On Kubernetes, the build container's `securityContext` when the
    /// project needs more than the `restricted` Pod Security level allows
    /// (checked by the Kubernetes executor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<serde_json::Value>,
    /// On Kubernetes, the service account the build pod runs as, with its
    /// token mounted: for builds that use the Kubernetes API. Builds get no
    /// token without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// A descriptor together with its compiled ref matcher.
#[derive(Debug, Clone)]
pub struct ProjectDescriptor {
    /// The descriptor as written.
    pub descriptor: Descriptor,
    matcher: Option<Regex>,
}

/// Environment names a descriptor may not override (nor a secret take),
/// since Decap sets them.
pub(crate) const RESERVED_ENV: &[&str] = &[
    "BUILD_ID",
    "PROJECT_KEY",
    "BRANCH_TO_BUILD",
    "BUILD_LOCK_KEY",
    "COMMIT_SHA",
    "ARTIFACTS_DIR",
    "DECAP_URL",
    "DECAP_BUILD_TOKEN",
];

impl ProjectDescriptor {
    /// Parses and validates `project.json`.
    pub fn parse(json: &[u8]) -> Result<Self> {
        let descriptor: Descriptor = serde_json::from_slice(json)
            .map_err(|e| Error::invalid("project.json", e.to_string()))?;
        if descriptor.build_image.trim().is_empty() && descriptor.language.is_none() {
            return Err(Error::invalid(
                "project.json",
                "buildImage must not be empty (or name a language, whose preset has an image)",
            ));
        }
        if let Some(secs) = descriptor.build_timeout_seconds
            && (secs == 0 || Duration::from_secs(secs) > MAX_BUILD_TIMEOUT)
        {
            return Err(Error::invalid(
                "project.json",
                format!(
                    "buildTimeoutSeconds must be between 1 and {}",
                    MAX_BUILD_TIMEOUT.as_secs()
                ),
            ));
        }
        for name in descriptor.env.keys() {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(Error::invalid(
                    "project.json",
                    format!("env name {name:?} is not a valid variable name"),
                ));
            }
            if RESERVED_ENV.contains(&name.as_str()) {
                return Err(Error::invalid(
                    "project.json",
                    format!("env name {name} is set by Decap and cannot be overridden"),
                ));
            }
        }
        if let Some(sa) = &descriptor.service_account_name {
            let valid = !sa.is_empty()
                && sa.len() <= 253
                && sa.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && sa.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && sa.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')
                });
            if !valid {
                return Err(Error::invalid(
                    "project.json",
                    format!("serviceAccountName {sa:?} is not a Kubernetes name"),
                ));
            }
        }
        if let Some(r) = &descriptor.resources {
            crate::limits::check_resources(r)
                .map_err(|e| Error::invalid("project.json", e.to_string()))?;
        }
        if descriptor
            .security_context
            .as_ref()
            .is_some_and(|v| !v.is_object())
        {
            return Err(Error::invalid(
                "project.json",
                "securityContext must be an object (a Kubernetes SecurityContext)",
            ));
        }
        let matcher = match &descriptor.managed_ref_regex {
            None => None,
            Some(re) => Some(compile_ref_regex(re)?),
        };
        Ok(ProjectDescriptor {
            descriptor,
            matcher,
        })
    }

    /// Whether a webhook for this ref (short name) should build. Manual builds
    /// ignore this and may build any ref.
    pub fn manages(&self, ref_name: &str) -> bool {
        self.matcher.as_ref().is_none_or(|re| re.is_match(ref_name))
    }

    /// The build timeout.
    pub fn timeout(&self) -> Duration {
        self.descriptor
            .build_timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_BUILD_TIMEOUT)
    }
}

/// Compiles `managedRefRegex` anchored at both ends, so that `main` does not
/// also manage `not-main-really`.
pub fn compile_ref_regex(re: &str) -> Result<Regex> {
    if re.len() > 4096 {
        return Err(Error::invalid(
            "managedRefRegex",
            "longer than 4096 characters",
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| Error::invalid("managedRefRegex", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_original_descriptor() {
        let d = ProjectDescriptor::parse(
            br#"{
                "buildImage": "ae6rt/decap-build-base:latest",
                "repoManager": "github",
                "managedRefRegex": "master|develop|issue/.*",
                "repoUrl": "https://github.com/ae6rt/dynamodb-lab.git",
                "repoDescription": "AWS DynamoDb lab"
            }"#,
        )
        .expect("valid");
        assert!(d.manages("master"));
        assert!(d.manages("issue/12"));
        assert!(!d.manages("feature/x"));
        assert!(!d.manages("master-old"), "the regex is anchored");
        assert_eq!(d.timeout(), DEFAULT_BUILD_TIMEOUT);
    }

    #[test]
    fn no_regex_manages_everything() {
        let d = ProjectDescriptor::parse(br#"{"buildImage": "x", "buildTimeoutSeconds": 5}"#)
            .expect("valid");
        assert!(d.manages("anything/at-all"));
        assert_eq!(d.timeout(), Duration::from_secs(5));
    }

    #[test]
    fn rejects_broken_descriptors_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "EOF"),
            (br#"{"repoUrl": "x"}"#, "buildImage"),
            (br#"{"buildImage": " "}"#, "buildImage"),
            (
                br#"{"buildImage": "x", "managedRefRegex": "(unclosed"}"#,
                "managedRefRegex",
            ),
            (
                br#"{"buildImage": "x", "managed-branch-regex": "x"}"#,
                "unknown field",
            ),
            (
                br#"{"buildImage": "x", "buildTimeoutSeconds": 0}"#,
                "buildTimeoutSeconds",
            ),
            (
                br#"{"buildImage": "x", "env": {"BUILD_ID": "1"}}"#,
                "BUILD_ID",
            ),
            (br#"{"buildImage": "x", "env": {"A-B": "1"}}"#, "A-B"),
            (
                br#"{"buildImage": "x", "resources": {"memory": "lots"}}"#,
                "resources.memory",
            ),
            (
                br#"{"buildImage": "x", "resources": {"cpu": "fast"}}"#,
                "resources.cpu",
            ),
            (
                br#"{"buildImage": "x", "resources": {"pids": 0}}"#,
                "resources.pids",
            ),
            (br#"{"buildImage": "x", "network": "host"}"#, "outbound"),
            (
                br#"{"buildImage": "x", "serviceAccountName": "Not_A_Name"}"#,
                "serviceAccountName",
            ),
        ];
        for (json, needle) in cases {
            let err = ProjectDescriptor::parse(json)
                .expect_err("must fail")
                .to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }
}
