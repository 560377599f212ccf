//! The CI status hub: builds that run on other CI servers report their
//! status to Decap (`POST /api/build_status`, as the original pipeline
//! dashboard accepted it), and Decap shows every project's latest revisions
//! with the state of each build.
//!
//! What is shown is derived, not stored: a build not reported for a revision
//! is `pending`; a build left `building` past the timeout is `pending` again
//! (its CI server died without saying); a `successful` build whose previous
//! revision failed is `fixed`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// What a CI server reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reported {
    /// Running.
    Building,
    /// Passed.
    Successful,
    /// Failed.
    Failed,
}

impl Reported {
    /// Parses the API's word.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "building" => Ok(Reported::Building),
            "successful" => Ok(Reported::Successful),
            "failed" => Ok(Reported::Failed),
            other => Err(Error::invalid(
                "status",
                format!("{other:?} is not one of building, successful, failed"),
            )),
        }
    }

    /// The API's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Reported::Building => "building",
            Reported::Successful => "successful",
            Reported::Failed => "failed",
        }
    }
}

/// What is shown for a build of a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shown {
    /// Not reported for this revision, or building for too long.
    Pending,
    /// Running.
    Building,
    /// Passed.
    Successful,
    /// Failed.
    Failed,
    /// Passed where the previous revision failed.
    Fixed,
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Shown::Pending => "pending",
            Shown::Building => "building",
            Shown::Successful => "successful",
            Shown::Failed => "failed",
            Shown::Fixed => "fixed",
        })
    }
}

/// One build of one revision, as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBuild {
    /// The project (from the repository path).
    pub project: String,
    /// The repository as reported.
    pub repository: String,
    /// The revision.
    pub revision: String,
    /// The build's name (`tests`, `deploy`).
    pub name: String,
    /// The last status reported.
    pub status: Reported,
    /// Where the CI server shows the build.
    pub status_url: Option<String>,
    /// When the revision was first reported (any build of it).
    pub revision_seen_at: OffsetDateTime,
    /// When this status was reported.
    pub updated_at: OffsetDateTime,
}

/// The project a repository path names: its last path segment without
/// `.git` (`git@github.com:acme/pipeline.git` → `pipeline`).
pub fn project_name(repository: &str) -> Result<String> {
    let trimmed = repository.trim().trim_end_matches('/');
    let last = trimmed
        .rsplit(['/', ':'])
        .next()
        .unwrap_or_default()
        .trim_end_matches(".git");
    validate_project_name(last).map_err(|_| {
        Error::invalid(
            "repository",
            format!("{repository:?} does not end in a project name"),
        )
    })?;
    Ok(last.to_owned())
}

/// A project name of the hub: letters, digits, `.`, `_`, `-`, at most 100.
pub fn validate_project_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "project",
            format!("{name:?} is not a project name (letters, digits, '.', '_', '-')"),
        ))
    }
}

/// A build name: printable, 1 to 100 characters, none of them a control or
/// invisible formatting character (bidi overrides and the like, named as
/// `U+XXXX`).
pub fn validate_build_name(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::invalid(
            "name",
            "a build name is 1 to 100 printable characters",
        ));
    }
    crate::names::refuse_invisible("name", name)
}

/// A revision: a git object name, 4 to 64 hex digits.
pub fn validate_revision(revision: &str) -> Result<()> {
    if (4..=64).contains(&revision.len()) && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::invalid(
            "revision",
            format!("{revision:?} is not a git revision (4 to 64 hex digits)"),
        ))
    }
}

/// A status URL: `http` or `https`, at most 2,000 characters.
pub fn validate_status_url(url: &str) -> Result<()> {
    let ok = url.len() <= 2000
        && (url.starts_with("https://") || url.starts_with("http://"))
        && !url.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "status_url",
            "status_url must be an http(s) URL",
        ))
    }
}

/// One build's box in a revision's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildBox {
    /// The build's name.
    pub name: String,
    /// What is shown.
    pub status: Shown,
    /// Where the CI server shows it (never sent to project webhooks).
    #[serde(skip)]
    pub status_url: Option<String>,
}

/// One revision's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevisionRow {
    /// The revision.
    pub hash: String,
    /// Its first six characters.
    pub short_name: String,
    /// One box per build name the project has, in name order.
    pub builds: Vec<BuildBox>,
}

/// A project's latest revisions, newest first: `builds` holds the reported
/// builds of at least the revisions to show and of the one before them (for
/// `fixed`).
pub fn latest_revisions(
    builds: &[ExternalBuild],
    now: OffsetDateTime,
    building_timeout: Duration,
    limit: usize,
) -> Vec<RevisionRow> {
    let names: BTreeSet<&str> = builds.iter().map(|b| b.name.as_str()).collect();
    let mut revisions: Vec<(&str, OffsetDateTime)> = Vec::new();
    let mut by_revision: HashMap<&str, HashMap<&str, &ExternalBuild>> = HashMap::new();
    for b in builds {
        if !by_revision.contains_key(b.revision.as_str()) {
            revisions.push((&b.revision, b.revision_seen_at));
        }
        by_revision
            .entry(&b.revision)
            .or_default()
            .insert(&b.name, b);
    }
    // Newest first; the same instant is broken by the revision, so the
    // order is stable.
    revisions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
    let shown = |b: Option<&&ExternalBuild>| -> Shown {
        match b {
            None => Shown::Pending,
            Some(b) => match b.status {
                Reported::Building if now - b.updated_at > building_timeout => Shown::Pending,
                Reported::Building => Shown::Building,
                Reported::Successful => Shown::Successful,
                Reported::Failed => Shown::Failed,
            },
        }
    };
    revisions
        .iter()
        .enumerate()
        .take(limit)
        .map(|(i, (rev, _))| {
            let this = &by_revision[rev];
            let previous = revisions.get(i + 1).map(|(p, _)| &by_revision[p]);
            let boxes = names
                .iter()
                .map(|name| {
                    let mut status = shown(this.get(name));
                    if status == Shown::Successful
                        && previous.is_some_and(|p| shown(p.get(name)) == Shown::Failed)
                    {
                        status = Shown::Fixed;
                    }
                    BuildBox {
                        name: (*name).to_owned(),
                        status,
                        status_url: this.get(name).and_then(|b| b.status_url.clone()),
                    }
                })
                .collect();
            RevisionRow {
                hash: (*rev).to_owned(),
                short_name: rev.chars().take(6).collect(),
                builds: boxes,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).unwrap()
    }

    fn b(rev: &str, seen: i64, name: &str, status: Reported, updated: i64) -> ExternalBuild {
        ExternalBuild {
            project: "pipeline".into(),
            repository: "git@github.com:acme/pipeline.git".into(),
            revision: rev.into(),
            name: name.into(),
            status,
            status_url: Some(format!("https://ci.example.com/{rev}/{name}")),
            revision_seen_at: at(seen),
            updated_at: at(updated),
        }
    }

    #[test]
    fn project_names_come_from_repository_paths() {
        for (repo, name) in [
            ("git@github.com:acme/pipeline.git", "pipeline"),
            ("https://github.com/acme/pipeline", "pipeline"),
            ("https://github.com/acme/pipeline.git/", "pipeline"),
            ("pipeline", "pipeline"),
        ] {
            assert_eq!(project_name(repo).unwrap(), name);
        }
        for bad in [
            "",
            "git@github.com:acme/..",
            "https://x/y/has space",
            "a/b/ü",
        ] {
            assert!(project_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pending_building_timeout_and_fixed_are_derived() {
        let hour = Duration::from_secs(3600);
        let builds = vec![
            b("aaaa01", 0, "tests", Reported::Failed, 10),
            b("aaaa01", 0, "deploy", Reported::Successful, 20),
            b("bbbb02", 100, "tests", Reported::Successful, 110),
            b("cccc03", 200, "tests", Reported::Building, 210),
        ];
        let rows = latest_revisions(&builds, at(300), hour, 10);
        let view: Vec<(String, Vec<(String, Shown)>)> = rows
            .iter()
            .map(|r| {
                (
                    r.hash.clone(),
                    r.builds
                        .iter()
                        .map(|b| (b.name.clone(), b.status))
                        .collect(),
                )
            })
            .collect();
        let s = |n: &str, st| (n.to_owned(), st);
        assert_eq!(
            view,
            vec![
                (
                    "cccc03".into(),
                    vec![s("deploy", Shown::Pending), s("tests", Shown::Building)]
                ),
                (
                    "bbbb02".into(),
                    vec![s("deploy", Shown::Pending), s("tests", Shown::Fixed)]
                ),
                (
                    "aaaa01".into(),
                    vec![s("deploy", Shown::Successful), s("tests", Shown::Failed)]
                ),
            ]
        );
        assert_eq!(rows[0].short_name, "cccc03");
        // Building for longer than the timeout: pending again.
        let later = latest_revisions(&builds, at(210 + 3601), hour, 1);
        assert_eq!(later[0].builds[1].status, Shown::Pending);
        // The limit keeps the newest.
        assert_eq!(latest_revisions(&builds, at(300), hour, 2).len(), 2);
    }

    #[test]
    fn bad_reports_are_refused_with_reasons() {
        assert!(Reported::parse("passed").is_err());
        assert!(validate_revision("xyz").is_err());
        assert!(validate_revision("abc").is_err());
        assert!(validate_revision("ea75a9c817757f1ebe09be035c807b7fe23499a0").is_ok());
        assert!(validate_status_url("javascript:alert(1)").is_err());
        assert!(validate_status_url("https://ci.example.com/1").is_ok());
        assert!(validate_build_name("").is_err());
        assert!(validate_build_name("tests\n").is_err());
        let bidi = validate_build_name("deploy\u{202E}gnitset").unwrap_err();
        assert!(bidi.to_string().contains("U+202E"), "{bidi}");
        assert!(validate_build_name("unit tests (linux)").is_ok());
    }
}
