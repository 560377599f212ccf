//! IAM identities: created with their inline policies, kept and updated when
//! created again, deleted with their access keys, against the test bed's IAM
//! (moto).
#![allow(clippy::unwrap_used)]

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::Credentials;
use decap_aws::iam::{self, Identities, POLICY_NAME};
use serde_json::json;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the test bed's IAM with `eval \"$(tests/bed/moto.sh start)\"` (tests/run does)")
    })
}

fn decoded(document: &str) -> serde_json::Value {
    // IAM answers policy documents URL-encoded.
    let text = percent_encoding::percent_decode_str(document).decode_utf8_lossy();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn identities_hold_their_policies_and_go_completely() {
    let endpoint = env("DECAP_TEST_IAM_ENDPOINT");
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "decaptest",
            "decaptestsecret",
            None,
            None,
            "decap-test-bed",
        ))
        .load()
        .await;
    let client = aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::config::Builder::from(&sdk)
            .endpoint_url(&endpoint)
            .build(),
    );
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let trust = iam::service_account_trust_policy(
        "123456789012",
        "oidc.example/id/T",
        "decap-system/decap",
    )
    .unwrap();
    let ids = Identities {
        user: Some(format!("decap-{tag}")),
        role: Some((format!("decap-role-{tag}"), trust.clone())),
        bctool_user: Some(format!("bctool-{tag}")),
        endpoint: Some(endpoint.clone()),
    };
    let decap_policy = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::logs/*"]}]});
    let bctool_policy = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::logs/v1/*"]}]});

    let arns = iam::create(&sdk, &ids, &decap_policy, &bctool_policy)
        .await
        .unwrap();
    assert_eq!(arns.len(), 3, "{arns:?}");
    assert!(
        arns.iter()
            .any(|a| a.ends_with(&format!("user/decap-{tag}")))
    );
    assert!(
        arns.iter()
            .any(|a| a.ends_with(&format!("role/decap-role-{tag}")))
    );

    let user_policy = client
        .get_user_policy()
        .user_name(format!("decap-{tag}"))
        .policy_name(POLICY_NAME)
        .send()
        .await
        .unwrap();
    assert_eq!(decoded(user_policy.policy_document()), decap_policy);
    let bctool = client
        .get_user_policy()
        .user_name(format!("bctool-{tag}"))
        .policy_name(POLICY_NAME)
        .send()
        .await
        .unwrap();
    assert_eq!(decoded(bctool.policy_document()), bctool_policy);
    let role = client
        .get_role()
        .role_name(format!("decap-role-{tag}"))
        .send()
        .await
        .unwrap();
    let role_trust = role.role().unwrap().assume_role_policy_document().unwrap();
    assert_eq!(decoded(role_trust), trust);

    // Created again with a changed policy: kept, policy brought up to date.
    let tighter = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::logs/v1/*"]}]});
    let again = iam::create(&sdk, &ids, &tighter, &bctool_policy)
        .await
        .unwrap();
    assert_eq!(again, arns);
    let role_policy = client
        .get_role_policy()
        .role_name(format!("decap-role-{tag}"))
        .policy_name(POLICY_NAME)
        .send()
        .await
        .unwrap();
    assert_eq!(decoded(role_policy.policy_document()), tighter);

    // A user with an access key is deleted all the same, twice.
    client
        .create_access_key()
        .user_name(format!("bctool-{tag}"))
        .send()
        .await
        .unwrap();
    iam::delete(&sdk, &ids).await.unwrap();
    iam::delete(&sdk, &ids).await.unwrap();
    for user in [format!("decap-{tag}"), format!("bctool-{tag}")] {
        let gone = client.get_user().user_name(&user).send().await;
        assert!(gone.is_err(), "{user} is still there");
    }
    assert!(
        client
            .get_role()
            .role_name(format!("decap-role-{tag}"))
            .send()
            .await
            .is_err()
    );
}
