//! Secrets of builds: where they belong ([`SecretScope`]), what they may be
//! called ([`SecretName`]) and what they may hold ([`SecretValue`]).
//!
//! A secret becomes an environment variable of the builds of its scope, so
//! its name must be a variable name that Decap does not set itself, and its
//! value text that an environment can carry. Both are checked here, once:
//! the [`crate::ports::SecretStore`] port takes only these types, so no
//! adapter ever sees a name or a value that a build could not use.
//!
//! A value can be read only through [`SecretValue::expose`]: it has no
//! `Display`, its `Debug` prints `SecretValue(***)`, and its memory is wiped
//! when it is dropped.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};
use crate::names::{ProjectKey, validate_name};

/// The longest secret name accepted.
pub const MAX_SECRET_NAME_LEN: usize = 128;
/// The largest secret value accepted, in bytes.
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// Names starting with this are kept for Decap's own variables.
pub const RESERVED_PREFIX: &str = "DECAP_";

/// Whose builds a secret is given to.
///
/// A team's secrets are given to every project of the team; a project's
/// secret overrides a team secret of the same name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretScope {
    /// Every project of a team (a name checked by [`validate_name`]; build
    /// it with [`SecretScope::team`]).
    Team(String),
    /// One project.
    Project(ProjectKey),
}

impl SecretScope {
    /// A team's scope, checking the name.
    pub fn team(team: &str) -> Result<Self> {
        validate_name("team", team)?;
        Ok(SecretScope::Team(team.to_owned()))
    }

    /// A project's scope, checking the names.
    pub fn project(team: &str, project: &str) -> Result<Self> {
        Ok(SecretScope::Project(ProjectKey::new(team, project)?))
    }

    /// The team the scope belongs to.
    pub fn team_name(&self) -> &str {
        match self {
            SecretScope::Team(t) => t,
            SecretScope::Project(p) => &p.team,
        }
    }

    /// The project, for a project's scope.
    pub fn project_name(&self) -> Option<&str> {
        match self {
            SecretScope::Team(_) => None,
            SecretScope::Project(p) => Some(&p.project),
        }
    }

    /// The scope as one stable, unambiguous text: `team:acme` or
    /// `project:acme/widgets`. Adapters may bind what they store to it.
    pub fn id(&self) -> String {
        match self {
            SecretScope::Team(t) => format!("team:{t}"),
            SecretScope::Project(p) => format!("project:{p}"),
        }
    }
}

impl fmt::Display for SecretScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretScope::Team(t) => write!(f, "team {t}"),
            SecretScope::Project(p) => write!(f, "project {p}"),
        }
    }
}

/// A secret's name: the environment variable builds see it as.
///
/// `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_SECRET_NAME_LEN`] characters, none
/// of the variables Decap sets in builds, not starting with
/// [`RESERVED_PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

impl SecretName {
    /// Checks a name.
    pub fn new(name: &str) -> Result<Self> {
        const WHAT: &str = "secret name";
        if name.is_empty() {
            return Err(Error::invalid(WHAT, "must not be empty"));
        }
        if name.len() > MAX_SECRET_NAME_LEN {
            return Err(Error::invalid(
                WHAT,
                format!("longer than {MAX_SECRET_NAME_LEN} characters"),
            ));
        }
        let valid = !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::invalid(
                WHAT,
                format!(
                    "{name:?} is not an environment variable name: letters, digits and '_', \
                     not starting with a digit"
                ),
            ));
        }
        if crate::descriptor::RESERVED_ENV.contains(&name) || BUILD_ENV.contains(&name) {
            return Err(Error::invalid(
                WHAT,
                format!("{name} is set by Decap in every build and cannot be a secret"),
            ));
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(Error::invalid(
                WHAT,
                format!(
                    "{name} starts with {RESERVED_PREFIX}, which is kept for Decap's own variables"
                ),
            ));
        }
        Ok(SecretName(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SecretName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Variables of a build's environment that its scripts rely on besides
/// Decap's own ([`crate::descriptor`]'s reserved ones): a secret of the same
/// name would break every build of its scope.
const BUILD_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG"];

/// A secret's value: non-empty UTF-8 text without NUL of at most
/// [`MAX_SECRET_VALUE_BYTES`] bytes (it becomes an environment variable).
///
/// It cannot be printed: `Debug` shows `SecretValue(***)` and there is no
/// `Display`; [`SecretValue::expose`] is the one way to the text. Its memory
/// is wiped when it is dropped.
#[derive(Clone)]
pub struct SecretValue(SecretString);

impl SecretValue {
    /// Checks a value.
    pub fn new(value: String) -> Result<Self> {
        const WHAT: &str = "secret value";
        // Wrapped at once, so the text is wiped on every path out.
        let value = SecretString::from(value);
        let text = value.expose_secret();
        if text.is_empty() {
            return Err(Error::invalid(WHAT, "must not be empty"));
        }
        if text.len() > MAX_SECRET_VALUE_BYTES {
            return Err(Error::invalid(
                WHAT,
                format!(
                    "{} bytes is more than the {MAX_SECRET_VALUE_BYTES} bytes allowed",
                    text.len()
                ),
            ));
        }
        if text.contains('\0') {
            return Err(Error::invalid(
                WHAT,
                "contains a NUL byte, which an environment variable cannot hold",
            ));
        }
        Ok(SecretValue(value))
    }

    /// Checks a value given as bytes (a request body, a decrypted record).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        match String::from_utf8(bytes) {
            Ok(text) => SecretValue::new(text),
            Err(e) => {
                // Wipe what was given before refusing it.
                drop(secrecy::SecretSlice::from(e.into_bytes()));
                Err(Error::invalid(
                    "secret value",
                    "is not UTF-8 text, which an environment variable needs",
                ))
            }
        }
    }

    /// The value. Call it only where the value goes to a build (or to the
    /// store that keeps it), never where it could be shown or logged.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// Always false: a value is never empty.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

impl PartialEq for SecretValue {
    /// Compares every byte of values of one length, without stopping at the
    /// first difference.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for SecretValue {}

/// Merges a team's secrets with a project's: the project's win on a shared
/// name; the result is sorted by name. For adapters implementing
/// [`crate::ports::SecretStore::for_build`].
pub fn merge_for_build(
    team: Vec<(String, SecretValue)>,
    project: Vec<(String, SecretValue)>,
) -> Vec<(String, SecretValue)> {
    let mut merged: std::collections::BTreeMap<String, SecretValue> = team.into_iter().collect();
    merged.extend(project);
    merged.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> SecretValue {
        SecretValue::new(s.to_owned()).expect("valid")
    }

    #[test]
    fn names_are_variable_names() {
        for ok in ["NPM_TOKEN", "a", "_x", "Key_2", &"K".repeat(128)] {
            SecretName::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "1X",
            "A-B",
            "A B",
            "A.B",
            "É",
            "A=B",
            "A\0",
            &"K".repeat(129),
        ] {
            let e = SecretName::new(bad).expect_err(bad);
            assert!(matches!(e, Error::Invalid { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names_decap_sets_are_refused() {
        for reserved in [
            "BUILD_ID",
            "PROJECT_KEY",
            "BRANCH_TO_BUILD",
            "DECAP_BUILD_TOKEN",
            "DECAP_URL",
            "DECAP_ANYTHING",
            "PATH",
            "HOME",
        ] {
            let e = SecretName::new(reserved).expect_err(reserved);
            assert!(e.to_string().contains(reserved), "{e}");
        }
        // Only the exact prefix is kept.
        SecretName::new("DECAPITATE").expect("not reserved");
        SecretName::new("decap_x").expect("lower case is not reserved");
    }

    #[test]
    fn values_are_bounded_text() {
        assert_eq!(value("x").len(), 1);
        SecretValue::new("a".repeat(MAX_SECRET_VALUE_BYTES)).expect("at the limit");
        SecretValue::new("multi\nline\n".into()).expect("newlines are kept");
        for (bad, why) in [
            (String::new(), "empty"),
            ("a".repeat(MAX_SECRET_VALUE_BYTES + 1), "bytes"),
            ("a\0b".into(), "NUL"),
        ] {
            let e = SecretValue::new(bad).expect_err(why);
            assert!(matches!(e, Error::Invalid { .. }), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = SecretValue::from_bytes(vec![0xff, 0xfe]).expect_err("not UTF-8");
        assert!(e.to_string().contains("UTF-8"), "{e}");
        assert_eq!(
            SecretValue::from_bytes(b"s3cr3t".to_vec())
                .expect("valid")
                .expose(),
            "s3cr3t"
        );
    }

    #[test]
    fn values_never_print() {
        let v = value("hunter2");
        assert_eq!(format!("{v:?}"), "SecretValue(***)");
        assert_eq!(format!("{:?}", ("N", &v)), "(\"N\", SecretValue(***))");
        let e = SecretValue::new("a\0hunter2".into()).expect_err("NUL");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn values_compare_by_content() {
        assert_eq!(value("abc"), value("abc"));
        assert_ne!(value("abc"), value("abd"));
        assert_ne!(value("abc"), value("abcd"));
    }

    #[test]
    fn scopes_name_their_team_and_are_distinct() {
        let team = SecretScope::team("acme").expect("valid");
        let project = SecretScope::project("acme", "widgets").expect("valid");
        assert_eq!(team.team_name(), "acme");
        assert_eq!(project.team_name(), "acme");
        assert_eq!(project.project_name(), Some("widgets"));
        assert_eq!(team.project_name(), None);
        assert_eq!(team.id(), "team:acme");
        assert_eq!(project.id(), "project:acme/widgets");
        assert_eq!(project.to_string(), "project acme/widgets");
        assert!(SecretScope::team("../x").is_err());
        assert!(SecretScope::team("a/b").is_err());
        assert!(SecretScope::project("acme", "").is_err());
    }

    #[test]
    fn a_project_secret_overrides_the_team_one() {
        let merged = merge_for_build(
            vec![("B".into(), value("team-b")), ("A".into(), value("team-a"))],
            vec![("C".into(), value("proj-c")), ("A".into(), value("proj-a"))],
        );
        let shown: Vec<(&str, &str)> = merged
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(
            shown,
            [("A", "proj-a"), ("B", "team-b"), ("C", "proj-c")],
            "sorted, the project winning"
        );
    }
}
