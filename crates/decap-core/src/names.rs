//! Validation of the names that Decap turns into paths, lock keys and labels.
//!
//! Team and project names come from webhooks, URLs and the build-scripts repo;
//! branch names come from webhooks and users. They end up in file paths, SQL
//! keys, Kubernetes labels and environment variables, so they are checked once,
//! here, and every other layer can rely on them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest team or project name accepted (GitHub allows 100 characters).
pub const MAX_NAME_LEN: usize = 100;
/// The longest branch or tag name accepted.
pub const MAX_BRANCH_LEN: usize = 255;

/// Checks a team or project name: ASCII letters, digits, `.`, `-`, `_`; not
/// starting with `.` or `-` (no hidden files, no option injection); at most
/// [`MAX_NAME_LEN`] characters.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            what,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(Error::invalid(
            what,
            format!("{name:?} must not start with '.' or '-'"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(Error::invalid(
            what,
            format!("{name:?} contains {c:?}; only letters, digits, '.', '-' and '_' are allowed"),
        ));
    }
    Ok(())
}

/// The invisible formatting characters: Unicode's general category Cf
/// (Unicode 15.1). Among them the bidirectional embeddings, overrides and
/// isolates (U+202A–U+202E, U+2066–U+2069), the directional marks (U+200E,
/// U+200F, U+061C), the zero-width characters (U+200B–U+200D, U+2060,
/// U+FEFF) and the tag characters (U+E0000 block): each can make a name
/// display as something else than what it is.
const FORMAT_CHARACTERS: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFF9}', '\u{FFFB}'),
    ('\u{110BD}', '\u{110BD}'),
    ('\u{110CD}', '\u{110CD}'),
    ('\u{13430}', '\u{1343F}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0001}', '\u{E0001}'),
    ('\u{E0020}', '\u{E007F}'),
];

/// Whether `c` is a control character (Cc) or an invisible formatting
/// character (Cf).
pub fn is_control_or_format(c: char) -> bool {
    c.is_control()
        || FORMAT_CHARACTERS
            .iter()
            .any(|&(first, last)| (first..=last).contains(&c))
}

/// Refuses a name holding a control or formatting character (see
/// [`is_control_or_format`]), naming the character as `U+XXXX`: such a name
/// shows as something other than what it is (`main`, U+202E RIGHT-TO-LEFT
/// OVERRIDE, `tset` reads `maintest`), or hides part of itself.
pub fn refuse_invisible(what: &'static str, name: &str) -> Result<()> {
    let Some(c) = name.chars().find(|&c| is_control_or_format(c)) else {
        return Ok(());
    };
    let kind = if c.is_control() {
        "a control character"
    } else if matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
    {
        "a bidirectional formatting character"
    } else {
        "an invisible formatting character"
    };
    Err(Error::invalid(
        what,
        format!(
            "{name:?} contains U+{:04X}, {kind}, which could make it display as something else",
            u32::from(c)
        ),
    ))
}

/// Checks a branch or tag name with git's own rules (`git check-ref-format`)
/// plus a few of Decap's: no leading `-`, no control, formatting (bidi,
/// zero-width) or space characters, no `..` path component, at most
/// [`MAX_BRANCH_LEN`] bytes.
pub fn validate_branch(branch: &str) -> Result<()> {
    let what = "branch";
    if branch.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if branch.len() > MAX_BRANCH_LEN {
        return Err(Error::invalid(
            what,
            format!("longer than {MAX_BRANCH_LEN} bytes"),
        ));
    }
    refuse_invisible(what, branch)?;
    if branch.starts_with('-') || branch.starts_with('/') || branch.ends_with('/') {
        return Err(Error::invalid(
            what,
            format!("{branch:?} must not start with '-' or '/' nor end with '/'"),
        ));
    }
    if branch.ends_with('.') || branch.ends_with(".lock") {
        return Err(Error::invalid(
            what,
            format!("{branch:?} must not end with '.' or '.lock'"),
        ));
    }
    if branch.contains("..") || branch.contains("//") || branch.contains("@{") || branch == "@" {
        return Err(Error::invalid(
            what,
            format!("{branch:?} must not contain '..', '//' or '@{{'"),
        ));
    }
    if let Some(c) = branch.chars().find(|c| {
        c.is_control() || c.is_whitespace() || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return Err(Error::invalid(
            what,
            format!("{branch:?} contains {c:?}, which git does not allow in a ref"),
        ));
    }
    if branch.split('/').any(|part| part.starts_with('.')) {
        return Err(Error::invalid(
            what,
            format!("{branch:?} has a path component starting with '.'"),
        ));
    }
    Ok(())
}

/// A project key, `team/project`: for GitHub, the owner and the repository.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProjectKey {
    /// The team (GitHub owner).
    pub team: String,
    /// The project (GitHub repository).
    pub project: String,
}

impl ProjectKey {
    /// Builds a key from validated names.
    pub fn new(team: &str, project: &str) -> Result<Self> {
        validate_name("team", team)?;
        validate_name("project", project)?;
        Ok(ProjectKey {
            team: team.to_owned(),
            project: project.to_owned(),
        })
    }

    /// Parses `team/project`.
    pub fn parse(key: &str) -> Result<Self> {
        let (team, project) = key
            .split_once('/')
            .ok_or_else(|| Error::invalid("project key", format!("{key:?} is not team/project")))?;
        ProjectKey::new(team, project)
    }

    /// The lock key of a branch of this project.
    pub fn lock_key(&self, branch: &str) -> LockKey {
        LockKey(format!("{}/{}/{}", self.team, self.project, branch))
    }
}

impl fmt::Display for ProjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.team, self.project)
    }
}

/// A lock key, `team/project/branch`: at most one build of a key runs at a
/// time. A pipeline's stage locks `team/project/branch:stage`, or, when it
/// shares a lock across branches, `team/project/:lock`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LockKey(pub String);

impl LockKey {
    /// Parses and validates `team/project/branch` (the branch may contain
    /// `/`), `team/project/branch:stage` or `team/project/:lock`.
    pub fn parse(key: &str) -> Result<Self> {
        let mut parts = key.splitn(3, '/');
        let (Some(team), Some(project), Some(branch)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::invalid(
                "lock key",
                format!("{key:?} is not team/project/branch"),
            ));
        };
        validate_name("team", team)?;
        validate_name("project", project)?;
        match branch.rsplit_once(':') {
            Some(("", lock)) => validate_name("lock", lock)?,
            Some((branch, stage)) => {
                validate_branch(branch)?;
                validate_name("stage", stage)?;
            }
            None => validate_branch(branch)?,
        }
        Ok(LockKey(key.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_github_style_names() {
        for ok in ["acme", "widgets", "my-repo", "my_repo", "repo.js", "A1"] {
            validate_name("team", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn names_reject_traversal_and_odd_characters() {
        for bad in [
            "", ".", "..", ".hidden", "-rf", "a/b", "a b", "a\0b", "é", "a%2f",
        ] {
            assert!(validate_name("team", bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name("team", &"x".repeat(101)).is_err());
    }

    #[test]
    fn branches_follow_git_rules() {
        for ok in [
            "main",
            "feature/x",
            "issue/1",
            "v1.2.3",
            "release-2024_01",
            "a@b",
        ] {
            validate_branch(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "", "../etc", "a/../b", "a..b", "-x", "/a", "a/", "a//b", "a.lock", "a.", "a b",
            "a\nb", "a:b", "a~1", "a^", "a*", "a[", "a\\b", "@", "a@{1}", ".a", "a/.b",
        ] {
            assert!(validate_branch(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn branches_with_invisible_characters_are_refused_by_code_point() {
        for (bad, code) in [
            ("main\u{202E}tset", "U+202E"),
            ("\u{2066}main", "U+2066"),
            ("ma\u{200B}in", "U+200B"),
            ("main\u{200F}", "U+200F"),
            ("main\u{061C}", "U+061C"),
            ("soft\u{00AD}hyphen", "U+00AD"),
            ("\u{FEFF}main", "U+FEFF"),
            ("tag\u{E0041}", "U+E0041"),
            ("a\u{7F}b", "U+007F"),
            ("a\u{85}b", "U+0085"),
            ("a\tb", "U+0009"),
        ] {
            let e = validate_branch(bad).expect_err(bad).to_string();
            assert!(e.contains(code), "{bad:?}: {e}");
        }
        let e = validate_branch("main\u{202E}")
            .expect_err("a bidi override")
            .to_string();
        assert!(e.contains("bidirectional"), "{e}");
        // Letters of other scripts stay fine, right-to-left ones too.
        for ok in ["feature/ñandú", "תכונה", "功能/分支", "émoji-✓"] {
            validate_branch(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(LockKey::parse("acme/widgets/main\u{202E}").is_err());
    }

    #[test]
    fn project_and_lock_keys_parse() {
        let key = ProjectKey::parse("acme/widgets").expect("valid");
        assert_eq!(key.to_string(), "acme/widgets");
        assert_eq!(key.lock_key("feature/x").as_str(), "acme/widgets/feature/x");
        assert!(ProjectKey::parse("acme").is_err());
        assert!(ProjectKey::parse("../widgets").is_err());
        assert!(LockKey::parse("acme/widgets/feature/x").is_ok());
        assert!(LockKey::parse("acme/widgets").is_err());
        assert!(LockKey::parse("acme/widgets/../x").is_err());
        assert!(LockKey::parse("acme/widgets/main:test").is_ok());
        assert!(LockKey::parse("acme/widgets/:production").is_ok());
        assert!(LockKey::parse("acme/widgets/main:").is_err());
        assert!(LockKey::parse("acme/widgets/:").is_err());
    }
}
