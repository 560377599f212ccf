//! The IAM identities Decap runs as: a user or a role holding Decap's
//! policy of least privilege, and a user holding bctool's, each created and
//! deleted idempotently (`decap aws-resources create|delete --iam-…`).
//!
//! Policies are inline (one named `decap` per identity), so deleting the
//! identity deletes its policy and nothing is left attached elsewhere.
//! Access keys are never created here (they would have to be printed);
//! `aws iam create-access-key --user-name NAME` makes one when wanted, and
//! `delete` removes a user's keys before the user.

use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use decap_core::{Error, Result};
use serde_json::json;

/// The name of the inline policy on each identity.
pub const POLICY_NAME: &str = "decap";

/// Which identities to create or delete.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    /// A user for the server (holding Decap's policy).
    pub user: Option<String>,
    /// A role for the server and its trust policy (who may assume it).
    pub role: Option<(String, serde_json::Value)>,
    /// A user for bctool's direct path (holding bctool's policy).
    pub bctool_user: Option<String>,
    /// An IAM endpoint instead of AWS.
    pub endpoint: Option<String>,
}

impl Identities {
    /// Whether there is anything to do.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.role.is_none() && self.bctool_user.is_none()
    }
}

/// The trust policy of a role for a Kubernetes service account on EKS (IAM
/// roles for service accounts): `provider` is the cluster's OIDC issuer
/// without `https://` (`oidc.eks.eu-west-1.amazonaws.com/id/ABC…`),
/// `service_account` is `namespace/name`.
pub fn service_account_trust_policy(
    account: &str,
    provider: &str,
    service_account: &str,
) -> Result<serde_json::Value> {
    let provider = provider
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if provider.is_empty() || provider.contains(char::is_whitespace) {
        return Err(Error::invalid(
            "OIDC provider",
            format!("{provider:?} is not an issuer host and path"),
        ));
    }
    let Some((namespace, name)) = service_account.split_once('/') else {
        return Err(Error::invalid(
            "service account",
            format!("{service_account:?} is not namespace/name"),
        ));
    };
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return Err(Error::invalid(
            "service account",
            format!("{service_account:?} is not namespace/name"),
        ));
    }
    Ok(json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Federated": format!("arn:aws:iam::{account}:oidc-provider/{provider}") },
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": { "StringEquals": {
                format!("{provider}:sub"): format!("system:serviceaccount:{namespace}:{name}"),
                format!("{provider}:aud"): "sts.amazonaws.com",
            }},
        }],
    }))
}

fn client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_iam::Client {
    let mut b = aws_sdk_iam::config::Builder::from(sdk);
    if let Some(url) = endpoint {
        b = b.endpoint_url(url);
    }
    aws_sdk_iam::Client::from_conf(b.build())
}

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::backend("iam", format!("{what}: {e}"))
}

fn code_is<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>, code: &str) -> bool {
    e.as_service_error()
        .and_then(ProvideErrorMetadata::code)
        .is_some_and(|c| c == code)
}

/// A deletion's outcome: what was gone already is fine.
fn unless_gone<T, E>(
    r: std::result::Result<T, SdkError<E, aws_sdk_iam::config::http::HttpResponse>>,
    what: &str,
) -> Result<()>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match r {
        Ok(_) => Ok(()),
        Err(e) if code_is(&e, "NoSuchEntity") => Ok(()),
        Err(e) => Err(fail(what, crate::sdk_message(&e))),
    }
}

/// Creates the identities with their inline policies; an identity that
/// exists is kept and its policies (and a role's trust) are brought up to
/// date. Returns the ARNs.
pub async fn create(
    sdk: &aws_config::SdkConfig,
    ids: &Identities,
    decap_policy: &serde_json::Value,
    bctool_policy: &serde_json::Value,
) -> Result<Vec<String>> {
    let iam = client(sdk, ids.endpoint.as_deref());
    let mut arns = Vec::new();
    let users = [
        (ids.user.as_ref(), decap_policy),
        (ids.bctool_user.as_ref(), bctool_policy),
    ];
    for (user, policy) in users {
        let Some(user) = user else { continue };
        let arn = match iam.create_user().user_name(user).send().await {
            Ok(out) => out.user().map(|u| u.arn().to_owned()),
            Err(e) if code_is(&e, "EntityAlreadyExists") => None,
            Err(e) => {
                return Err(fail(
                    &format!("creating user {user}"),
                    crate::sdk_message(&e),
                ));
            }
        };
        let arn = match arn {
            Some(a) => a,
            None => iam
                .get_user()
                .user_name(user)
                .send()
                .await
                .map_err(|e| fail(&format!("reading user {user}"), crate::sdk_message(&e)))?
                .user()
                .map(|u| u.arn().to_owned())
                .unwrap_or_default(),
        };
        iam.put_user_policy()
            .user_name(user)
            .policy_name(POLICY_NAME)
            .policy_document(policy.to_string())
            .send()
            .await
            .map_err(|e| {
                fail(
                    &format!("setting the policy of user {user}"),
                    crate::sdk_message(&e),
                )
            })?;
        arns.push(arn);
    }
    if let Some((role, trust)) = &ids.role {
        let arn = match iam
            .create_role()
            .role_name(role)
            .assume_role_policy_document(trust.to_string())
            .description("Decap's controller")
            .send()
            .await
        {
            Ok(out) => out.role().map(|r| r.arn().to_owned()),
            Err(e) if code_is(&e, "EntityAlreadyExists") => {
                iam.update_assume_role_policy()
                    .role_name(role)
                    .policy_document(trust.to_string())
                    .send()
                    .await
                    .map_err(|e| {
                        fail(
                            &format!("updating the trust of role {role}"),
                            crate::sdk_message(&e),
                        )
                    })?;
                None
            }
            Err(e) => {
                return Err(fail(
                    &format!("creating role {role}"),
                    crate::sdk_message(&e),
                ));
            }
        };
        let arn = match arn {
            Some(a) => a,
            None => iam
                .get_role()
                .role_name(role)
                .send()
                .await
                .map_err(|e| fail(&format!("reading role {role}"), crate::sdk_message(&e)))?
                .role()
                .map(|r| r.arn().to_owned())
                .unwrap_or_default(),
        };
        iam.put_role_policy()
            .role_name(role)
            .policy_name(POLICY_NAME)
            .policy_document(decap_policy.to_string())
            .send()
            .await
            .map_err(|e| {
                fail(
                    &format!("setting the policy of role {role}"),
                    crate::sdk_message(&e),
                )
            })?;
        arns.push(arn);
    }
    Ok(arns)
}

/// Deletes the identities: a user's access keys and policy, then the user;
/// a role's policy, then the role. What is gone already is skipped.
pub async fn delete(sdk: &aws_config::SdkConfig, ids: &Identities) -> Result<()> {
    let iam = client(sdk, ids.endpoint.as_deref());
    for user in [ids.user.as_ref(), ids.bctool_user.as_ref()]
        .into_iter()
        .flatten()
    {
        let keys = match iam.list_access_keys().user_name(user).send().await {
            Ok(k) => k,
            Err(e) if code_is(&e, "NoSuchEntity") => continue,
            Err(e) => {
                return Err(fail(
                    &format!("listing the keys of user {user}"),
                    crate::sdk_message(&e),
                ));
            }
        };
        for key in keys.access_key_metadata() {
            if let Some(id) = key.access_key_id() {
                iam.delete_access_key()
                    .user_name(user)
                    .access_key_id(id)
                    .send()
                    .await
                    .map_err(|e| {
                        fail(
                            &format!("deleting a key of user {user}"),
                            crate::sdk_message(&e),
                        )
                    })?;
            }
        }
        unless_gone(
            iam.delete_user_policy()
                .user_name(user)
                .policy_name(POLICY_NAME)
                .send()
                .await,
            &format!("deleting the policy of user {user}"),
        )?;
        unless_gone(
            iam.delete_user().user_name(user).send().await,
            &format!("deleting user {user}"),
        )?;
    }
    if let Some((role, _)) = &ids.role {
        unless_gone(
            iam.delete_role_policy()
                .role_name(role)
                .policy_name(POLICY_NAME)
                .send()
                .await,
            &format!("deleting the policy of role {role}"),
        )?;
        unless_gone(
            iam.delete_role().role_name(role).send().await,
            &format!("deleting role {role}"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_trust_names_the_issuer_and_the_account() {
        let t = service_account_trust_policy(
            "123456789012",
            "https://oidc.eks.eu-west-1.amazonaws.com/id/ABC/",
            "decap-system/decap",
        )
        .unwrap()
        .to_string();
        assert!(t.contains(
            "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/ABC\""
        ));
        assert!(t.contains("system:serviceaccount:decap-system:decap"));
        for bad in ["decap", "/decap", "ns/", "a/b/c"] {
            assert!(
                service_account_trust_policy("123456789012", "oidc.example/id/x", bad).is_err(),
                "{bad}"
            );
        }
        assert!(service_account_trust_policy("123456789012", "", "a/b").is_err());
    }
}
