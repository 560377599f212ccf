//! [`SecretStore`] on Kubernetes Secrets in the build namespace.
//!
//! Each scope (a team, or one project) is one Secret, named by
//! [`secret_name_for`]: `decap-team-secrets-<team>-<hash>` or
//! `decap-secrets-<team>-<project>-<hash>`, the names lower-cased and
//! sanitized, the hash (of the scope's exact text) keeping apart scopes that
//! sanitize alike (`Acme` and `acme`). Its data keys are the secrets' names,
//! so a build pod can take each one with a `secretKeyRef` and no value is
//! ever written into a pod spec. Each Secret is labelled `type=decap-secrets`
//! with `scope`, `team` and `project`, and annotated with the full scope; a
//! Secret of that name not made so is left alone.
//!
//! Changes are read-modify-write with the Secret's `resourceVersion`, tried
//! again on a conflict, so concurrent changes (from tasks or replicas) are
//! never lost. A scope whose last secret is removed loses its Secret.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use decap_core::names::ProjectKey;
use decap_core::ports::SecretStore;
use decap_core::secrets::{SecretName, SecretScope, SecretValue, merge_for_build};
use decap_core::{Error, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use crate::executor::describe;
use crate::labels::label_value;
use crate::pod::{ANNOTATION_PREFIX, TYPE_LABEL};

/// The `type` label of the Secrets holding builds' secrets.
pub const SECRETS_TYPE: &str = "decap-secrets";
/// The annotation holding a Secret's full scope (`team:acme`,
/// `project:acme/widgets`).
pub const SCOPE_ANNOTATION: &str = "decap.io/secret-scope";
/// Hex digits of the hash suffix of Secret names.
const HASH_LEN: usize = 10;
/// How many times a change meeting concurrent ones is tried.
const ATTEMPTS: u32 = 20;

/// The name of the Secret holding a scope's secrets, in the build namespace:
/// a valid Kubernetes name (lower case, at most 253 characters), the same
/// for the same scope every time, different for different scopes, and a
/// team's never equal to a project's.
pub fn secret_name_for(scope: &SecretScope) -> String {
    fn part(name: &str) -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    }
    let hash = hex::encode(Sha256::digest(scope.id().as_bytes()));
    let hash = &hash[..HASH_LEN];
    // Team and project names are at most 100 characters each, so this is
    // at most 14 + 100 + 1 + 100 + 1 + 10 = 226 characters.
    match scope {
        SecretScope::Team(team) => format!("decap-team-secrets-{}-{hash}", part(team)),
        SecretScope::Project(p) => {
            format!(
                "decap-secrets-{}-{}-{hash}",
                part(&p.team),
                part(&p.project)
            )
        }
    }
}

/// [`SecretStore`] on one Kubernetes Secret per scope in the build
/// namespace. Its service account needs `get`, `create`, `update` and
/// `delete` on `secrets` there (`k8s-resources/rbac.yaml`).
#[derive(Clone)]
pub struct KubeSecretStore {
    api: Api<Secret>,
    namespace: String,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl KubeSecretStore {
    /// A store in `namespace` (the build namespace). Nothing is checked yet:
    /// see [`KubeSecretStore::connect`].
    pub fn new(client: Client, namespace: &str) -> Self {
        KubeSecretStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// A store in `namespace`, checking at once that Secrets there can be
    /// read (a clear error at start-up rather than at the first build).
    pub async fn connect(client: Client, namespace: &str) -> Result<Self> {
        let store = KubeSecretStore::new(client, namespace);
        // No Secret has this name; reading it only proves access.
        store
            .api
            .get_opt("decap-secrets-access-check")
            .await
            .map_err(|e| store.api_err("read", "decap-secrets-access-check", &e))?;
        Ok(store)
    }

    fn api_err(&self, action: &str, name: &str, e: &kube::Error) -> Error {
        let denied = matches!(e, kube::Error::Api(s) if s.code == 403);
        let hint = if denied {
            ": Decap's service account needs get, create, update and delete on secrets in the \
             build namespace (see k8s-resources/rbac.yaml)"
        } else {
            ""
        };
        Error::backend(
            "kubernetes",
            format!(
                "cannot {action} Secret {name} in namespace {}: {}{hint}",
                self.namespace,
                describe(e)
            ),
        )
    }

    /// The scope's Secret, if there is one; refuses a Secret of that name
    /// that Decap did not make for this scope.
    async fn get(&self, scope: &SecretScope, name: &str) -> Result<Option<Secret>> {
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(|e| self.api_err("read", name, &e))?;
        let Some(secret) = secret else {
            return Ok(None);
        };
        let labels = secret.metadata.labels.as_ref();
        let kind = labels.and_then(|l| l.get(TYPE_LABEL.0)).map(String::as_str);
        let held = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SCOPE_ANNOTATION))
            .map(String::as_str);
        if kind != Some(SECRETS_TYPE) || held != Some(scope.id().as_str()) {
            return Err(Error::backend(
                "kubernetes",
                format!(
                    "Secret {name} in namespace {} was not made by Decap for the secrets of {scope} \
                     (its type label is {kind:?}, its scope {held:?}); Decap leaves it alone: \
                     move it away to keep secrets of {scope} here",
                    self.namespace
                ),
            ));
        }
        Ok(Some(secret))
    }

    /// A new Secret for a scope.
    fn fresh(&self, scope: &SecretScope, name: &str) -> Secret {
        let mut labels = BTreeMap::from([
            (TYPE_LABEL.0.to_owned(), SECRETS_TYPE.to_owned()),
            (
                "scope".to_owned(),
                match scope {
                    SecretScope::Team(_) => "team",
                    SecretScope::Project(_) => "project",
                }
                .to_owned(),
            ),
            ("team".to_owned(), label_value(scope.team_name())),
        ]);
        let mut annotations = BTreeMap::from([
            (SCOPE_ANNOTATION.to_owned(), scope.id()),
            (
                format!("{ANNOTATION_PREFIX}team"),
                scope.team_name().to_owned(),
            ),
        ]);
        if let Some(project) = scope.project_name() {
            labels.insert("project".to_owned(), label_value(project));
            annotations.insert(format!("{ANNOTATION_PREFIX}project"), project.to_owned());
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        }
    }

    /// The valid secrets a Secret holds, by name; a key that is not a valid
    /// secret name (written by hand) is left out, with a warning.
    fn values(&self, scope: &SecretScope, secret: Secret) -> Result<Vec<(String, SecretValue)>> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut out = Vec::new();
        for (key, ByteString(bytes)) in secret.data.unwrap_or_default() {
            if SecretName::new(&key).is_err() {
                tracing::warn!(secret = %name, key = %key, "a key of a secrets Secret is not a valid secret name; builds do not get it");
                continue;
            }
            let value = SecretValue::from_bytes(bytes).map_err(|e| {
                Error::backend(
                    "kubernetes",
                    format!(
                        "secret {key} of {scope} (Secret {name} in namespace {}) is unusable: {e}",
                        self.namespace
                    ),
                )
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    async fn pause(attempt: u32) {
        // Short and growing, so that writers meeting each other spread out.
        let ms = 10 * u64::from(attempt + 1) + u64::from(std::process::id() % 7);
        tokio::time::sleep(Duration::from_millis(ms.min(250))).await;
    }

    fn gave_up(&self, name: &str) -> Error {
        Error::backend(
            "kubernetes",
            format!(
                "Secret {name} in namespace {} kept changing under {ATTEMPTS} attempts to change it; try again",
                self.namespace
            ),
        )
    }
}

#[async_trait]
impl SecretStore for KubeSecretStore {
    async fn set(&self, scope: &SecretScope, name: &SecretName, value: &SecretValue) -> Result<()> {
        let secret_name = secret_name_for(scope);
        let pp = PostParams::default();
        for attempt in 0..ATTEMPTS {
            let result = match self.get(scope, &secret_name).await? {
                None => {
                    let mut s = self.fresh(scope, &secret_name);
                    s.data = Some(BTreeMap::from([(
                        name.as_str().to_owned(),
                        ByteString(value.expose().as_bytes().to_vec()),
                    )]));
                    self.api.create(&pp, &s).await.map(|_| ())
                }
                Some(mut s) => {
                    s.metadata.managed_fields = None;
                    s.data.get_or_insert_with(BTreeMap::new).insert(
                        name.as_str().to_owned(),
                        ByteString(value.expose().as_bytes().to_vec()),
                    );
                    self.api.replace(&secret_name, &pp, &s).await.map(|_| ())
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if is_conflict(&e) || is_not_found(&e) => Self::pause(attempt).await,
                Err(e) => return Err(self.api_err("write", &secret_name, &e)),
            }
        }
        Err(self.gave_up(&secret_name))
    }

    async fn names(&self, scope: &SecretScope) -> Result<Vec<String>> {
        let secret_name = secret_name_for(scope);
        let Some(secret) = self.get(scope, &secret_name).await? else {
            return Ok(Vec::new());
        };
        // Data keys come sorted (a BTreeMap); only the valid ones count.
        Ok(secret
            .data
            .unwrap_or_default()
            .into_keys()
            .filter(|k| SecretName::new(k).is_ok())
            .collect())
    }

    async fn remove(&self, scope: &SecretScope, name: &SecretName) -> Result<bool> {
        let secret_name = secret_name_for(scope);
        for attempt in 0..ATTEMPTS {
            let Some(mut s) = self.get(scope, &secret_name).await? else {
                return Ok(false);
            };
            let mut data = s.data.take().unwrap_or_default();
            if data.remove(name.as_str()).is_none() {
                return Ok(false);
            }
            let result = if data.is_empty() {
                // The last one: the Secret goes, unless it changed meanwhile.
                let dp = DeleteParams::default().preconditions(Preconditions {
                    resource_version: s.metadata.resource_version.clone(),
                    uid: s.metadata.uid.clone(),
                });
                self.api.delete(&secret_name, &dp).await.map(|_| ())
            } else {
                s.metadata.managed_fields = None;
                s.data = Some(data);
                self.api
                    .replace(&secret_name, &PostParams::default(), &s)
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => return Ok(true),
                Err(e) if is_conflict(&e) || is_not_found(&e) => Self::pause(attempt).await,
                Err(e) => return Err(self.api_err("change", &secret_name, &e)),
            }
        }
        Err(self.gave_up(&secret_name))
    }

    async fn for_build(&self, project: &ProjectKey) -> Result<Vec<(String, SecretValue)>> {
        let team = SecretScope::Team(project.team.clone());
        let own = SecretScope::Project(project.clone());
        let (team_name, own_name) = (secret_name_for(&team), secret_name_for(&own));
        let (team_secret, own_secret) =
            tokio::try_join!(self.get(&team, &team_name), self.get(&own, &own_name))?;
        let from_team = match team_secret {
            Some(s) => self.values(&team, s)?,
            None => Vec::new(),
        };
        let from_project = match own_secret {
            Some(s) => self.values(&own, s)?,
            None => Vec::new(),
        };
        Ok(merge_for_build(from_team, from_project))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn is_dns_subdomain(name: &str) -> bool {
        name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    }

    #[test]
    fn secret_names_are_valid_stable_and_distinct() {
        let long = "x".repeat(100);
        let scopes = [
            SecretScope::team("acme").unwrap(),
            SecretScope::team("Acme").unwrap(),
            SecretScope::team("acme-widgets").unwrap(),
            SecretScope::team("_x.").unwrap(),
            SecretScope::team(&long).unwrap(),
            SecretScope::project("acme", "widgets").unwrap(),
            SecretScope::project("Acme", "widgets").unwrap(),
            SecretScope::project("acme", "Widgets.js").unwrap(),
            SecretScope::project("acme", "widgets_js").unwrap(),
            SecretScope::project("acme-widgets", "x").unwrap(),
            SecretScope::project("acme", "widgets-x").unwrap(),
            SecretScope::project(&long, &long).unwrap(),
        ];
        let mut seen = std::collections::HashSet::new();
        for scope in &scopes {
            let name = secret_name_for(scope);
            assert!(is_dns_subdomain(&name), "{scope}: {name:?}");
            assert_eq!(secret_name_for(scope), name, "stable");
            assert!(seen.insert(name.clone()), "{scope} collided as {name}");
        }
        assert!(
            secret_name_for(&SecretScope::project("acme", "widgets").unwrap())
                .starts_with("decap-secrets-acme-widgets-")
        );
        assert!(
            secret_name_for(&SecretScope::team("acme").unwrap())
                .starts_with("decap-team-secrets-acme-")
        );
    }
}
