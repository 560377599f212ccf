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

    /// Parses a full ref (`refs/heads/x`, `refs/tags/v1`) or a short name,
    /// which is taken to be a branch.
    pub fn parse(full_or_short: &str) -> Result<Self> {
        if let Some(name) = full_or_short.strip_prefix("refs/heads/") {
            GitRef::branch(name)
        } else if let Some(name) = full_or_short.strip_prefix("refs/tags/") {
            GitRef::tag(name)
        } else {
            GitRef::branch(full_or_short)
        }
    }

    /// The full ref name (`refs/heads/main`).
    pub fn full(&self) -> String {
        match self.kind {
            RefKind::Branch => format!("refs/heads/{}", self.name),
            RefKind::Tag => format!("refs/tags/{}", self.name),
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
    }
}
