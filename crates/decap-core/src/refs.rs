//! Git refs as webhooks and users name them.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::names::validate_branch;

/// Whether a ref names a branch or a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefKind {
    /// `refs/heads/...`
    Branch,
    /// `refs/tags/...`
    Tag,
    /// `refs/pull/N/head`: a pull request's head, built as branch `pull/N`.
    Pull,
}

/// A validated branch or tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GitRef {
    /// Branch or tag.
    pub kind: RefKind,
    /// The short name (`main`, `v1.0`), which is what builds, lock keys and
    /// `managedRefRegex` use.
    pub name: String,
}

impl GitRef {
    /// A branch.
    pub fn branch(name: &str) -> Result<Self> {
        validate_branch(name)?;
        Ok(GitRef {
            kind: RefKind::Branch,
            name: name.to_owned(),
        })
    }

    /// A tag.
    pub fn tag(name: &str) -> Result<Self> {
        validate_branch(name)?;
        Ok(GitRef {
            kind: RefKind::Tag,
            name: name.to_owned(),
        })
    }

    /// A pull request's head.
    pub fn pull(number: u64) -> Self {
        GitRef {
            kind: RefKind::Pull,
            name: format!("pull/{number}"),
        }
    }

    /// Parses a full ref (`refs/heads/x`, `refs/tags/v1`) or a short name,
    /// which is taken to be a branch.
    pub fn parse(full_or_short: &str) -> Result<Self> {
        if let Some(name) = full_or_short.strip_prefix("refs/heads/") {
            GitRef::branch(name)
        } else if let Some(name) = full_or_short.strip_prefix("refs/tags/") {
            GitRef::tag(name)
        } else if let Some(number) = full_or_short
            .strip_prefix("refs/pull/")
            .and_then(|rest| rest.strip_suffix("/head"))
        {
            number.parse::<u64>().map(GitRef::pull).map_err(|_| {
                crate::Error::invalid(
                    "ref",
                    format!("{full_or_short:?} is not a pull request ref"),
                )
            })
        } else {
            GitRef::branch(full_or_short)
        }
    }

    /// The full ref name (`refs/heads/main`).
    pub fn full(&self) -> String {
        match self.kind {
            RefKind::Branch => format!("refs/heads/{}", self.name),
            RefKind::Tag => format!("refs/tags/{}", self.name),
            RefKind::Pull => format!("refs/{}/head", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_refs() {
        let r = GitRef::parse("refs/heads/feature/x").expect("valid");
        assert_eq!((r.kind, r.name.as_str()), (RefKind::Branch, "feature/x"));
        assert_eq!(r.full(), "refs/heads/feature/x");
        let t = GitRef::parse("refs/tags/v1.0").expect("valid");
        assert_eq!((t.kind, t.name.as_str()), (RefKind::Tag, "v1.0"));
        let s = GitRef::parse("main").expect("valid");
        assert_eq!(s.full(), "refs/heads/main");
        assert!(GitRef::parse("refs/heads/../x").is_err());
        assert!(GitRef::parse("refs/heads/").is_err());
        let p = GitRef::parse("refs/pull/12/head").expect("valid");
        assert_eq!(
            (p.kind, p.name.as_str(), p.full()),
            (RefKind::Pull, "pull/12", "refs/pull/12/head".to_owned())
        );
        assert!(GitRef::parse("refs/pull/x/head").is_err());
    }

    #[test]
    fn refs_with_bidi_or_invisible_characters_are_refused() {
        for bad in [
            "refs/heads/main\u{202E}",
            "refs/tags/v1\u{2067}.0",
            "refs/heads/fix\u{200B}",
            "main\u{FEFF}",
        ] {
            let e = GitRef::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("U+"), "{bad:?}: {e}");
        }
        assert!(GitRef::tag("v1\u{200E}").is_err());
        assert!(GitRef::branch("release/\u{2066}x").is_err());
    }
}
