//! Builds' secrets in SQLite, sealed with a key kept in a file of its own.
//!
//! Each value is sealed with ChaCha20-Poly1305 under a fresh random 96-bit
//! nonce, its associated data binding it to its team, project and name: a
//! row copied to another name or scope fails to open. The 256-bit key is
//! not in the database but in a file apart ([`SecretKey`]), so that a copy
//! of the database (or of a backup of it) alone reveals no value.
//!
//! The database also holds one sealed check value, so that a server started
//! with another key than the one its secrets were sealed with says so at
//! start-up rather than at the first build.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use decap_core::names::ProjectKey;
use decap_core::ports::SecretStore;
use decap_core::secrets::{SecretName, SecretScope, SecretValue, merge_for_build};
use decap_core::{Error, Result};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::OptionalExtension;

use crate::db::{SqliteDb, exec, query_row};

/// The key's length in bytes (256 bits).
pub const SECRET_KEY_LEN: usize = 32;

/// What the associated data of every sealed value starts with: the format,
/// so that a later format cannot be confused with this one.
const AAD_PREFIX: &str = "decap-secret/v1";
/// The check value's associated data and text.
const CHECK_AAD: &[u8] = b"decap-secret/v1\0key-check";
const CHECK_TEXT: &[u8] = b"decap secrets key check";

fn key_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::backend("secrets key", format!("{}: {what}", path.display()))
}

/// The key that seals secret values, loaded from (or first made in) a file
/// kept apart from the database.
///
/// The file holds the 32 bytes of the key and nothing else, mode 0600 (or
/// stricter). Back it up apart from the database: without it the stored
/// secrets cannot be opened again.
#[derive(Clone)]
pub struct SecretKey {
    key: Arc<LessSafeKey>,
    path: PathBuf,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// Loads the key at `path`, making a new random one there first when
    /// there is none: its folder is created mode 0700 when missing, the file
    /// mode 0600, written whole under a temporary name and then linked into
    /// place, so that no reader ever sees a partial key and two servers
    /// starting at once agree on one.
    ///
    /// Refuses a file that is not exactly [`SECRET_KEY_LEN`] bytes, or whose
    /// permissions let anyone but its owner read or write it.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::create(path)?;
                Self::load(path)
            }
            Err(e) => Err(key_err(path, format!("cannot read it: {e}"))),
        }
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(path: &Path) -> Result<Self> {
        let meta =
            std::fs::metadata(path).map_err(|e| key_err(path, format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(key_err(path, "is not a file"));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_err(
                path,
                format!(
                    "its permissions {mode:04o} are looser than 0600, so other users may read \
                     or change it; if it is still secret, `chmod 600 {}`",
                    path.display()
                ),
            ));
        }
        let bytes =
            std::fs::read(path).map_err(|e| key_err(path, format!("cannot read it: {e}")))?;
        if bytes.len() != SECRET_KEY_LEN {
            let len = bytes.len();
            wipe(bytes);
            return Err(key_err(
                path,
                format!(
                    "holds {len} bytes, not a {SECRET_KEY_LEN}-byte key: is it the right file? \
                     (A new key is made only where no file exists.)"
                ),
            ));
        }
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| key_err(path, "is not a usable key"))?;
        wipe(bytes);
        Ok(SecretKey {
            key: Arc::new(LessSafeKey::new(unbound)),
            path: path.to_owned(),
            rng: SystemRandom::new(),
        })
    }

    fn create(path: &Path) -> Result<()> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| key_err(path, format!("cannot create {}: {e}", parent.display())))?;
        let mut key = [0u8; SECRET_KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| key_err(path, "the system's random source failed"))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "secrets.key".into());
        let tmp = parent.join(format!(".{file_name}.{}.tmp", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()
        })();
        key.fill(0);
        std::hint::black_box(&key);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(key_err(
                path,
                format!("cannot write {}: {e}", tmp.display()),
            ));
        }
        // A link does not replace a key another server made meanwhile; where
        // the file system has no links, a rename does the same but for that.
        let placed = match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(_) => std::fs::rename(&tmp, path),
        };
        let _ = std::fs::remove_file(&tmp);
        placed.map_err(|e| key_err(path, format!("cannot create it: {e}")))?;
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
        tracing::info!(path = %path.display(), "made a new secrets key: back it up apart from the database");
        Ok(())
    }

    /// Seals `plain`, bound to `aad`: a fresh nonce and the sealed bytes.
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>)> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| Error::backend("secrets", "the system's random source failed"))?;
        // Room for the tag up front, so that no copy of the text is left
        // behind in a reallocated buffer.
        let mut in_out = Vec::with_capacity(plain.len() + CHACHA20_POLY1305.tag_len());
        in_out.extend_from_slice(plain);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut in_out,
            )
            .map_err(|_| Error::backend("secrets", "cannot seal the value"))?;
        Ok((nonce, in_out))
    }

    /// Opens what [`SecretKey::seal`] sealed with the same `aad`; `None`
    /// when the key, the associated data or the bytes differ.
    fn open(&self, aad: &[u8], nonce: &[u8], mut sealed: Vec<u8>) -> Option<Vec<u8>> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut sealed)
            .ok()?
            .len();
        sealed.truncate(len);
        Some(sealed)
    }
}

/// Overwrites bytes that held key material before they are freed (the
/// read through `black_box` keeps the writes from being optimised away).
fn wipe(mut bytes: Vec<u8>) {
    bytes.fill(0);
    std::hint::black_box(&bytes);
}

/// The associated data of a value: the format, the scope and the name,
/// separated by NUL (which none of them can hold).
fn aad(team: &str, project: &str, name: &str) -> Vec<u8> {
    format!("{AAD_PREFIX}\0{team}\0{project}\0{name}").into_bytes()
}

/// The row key of a scope: a team's secrets have the empty project (no
/// project is named so).
fn row_scope(scope: &SecretScope) -> (String, String) {
    (
        scope.team_name().to_owned(),
        scope.project_name().unwrap_or("").to_owned(),
    )
}

fn now_nanos() -> i64 {
    crate::nanos(time::OffsetDateTime::now_utc())
}

/// [`SecretStore`] on [`SqliteDb`], every value sealed with a [`SecretKey`].
#[derive(Clone)]
pub struct SqliteSecretStore {
    db: SqliteDb,
    key: SecretKey,
}

impl SqliteSecretStore {
    /// A store on `db` sealing with `key`. Checks that the key is the one
    /// the database's secrets were sealed with (the first key used is
    /// remembered as a sealed check value); a database with secrets sealed
    /// under another key is refused, naming the key file.
    pub async fn open(db: SqliteDb, key: SecretKey) -> Result<Self> {
        let store = SqliteSecretStore { db, key };
        store.check_key().await?;
        Ok(store)
    }

    async fn check_key(&self) -> Result<()> {
        // The check value is a row of the empty team, which no team is named.
        let check: Option<(Vec<u8>, Vec<u8>)> = self
            .db
            .read(|c| {
                query_row(
                    c,
                    "SELECT nonce, sealed FROM secrets WHERE team = '' AND project = '' AND name = ''",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
            })
            .await?;
        if let Some((nonce, sealed)) = check {
            if self.key.open(CHECK_AAD, &nonce, sealed).as_deref() == Some(CHECK_TEXT) {
                return Ok(());
            }
            let stored: i64 = self
                .db
                .read(|c| {
                    query_row(
                        c,
                        "SELECT COUNT(*) FROM secrets WHERE team <> ''",
                        [],
                        |r| r.get(0),
                    )
                })
                .await?;
            if stored > 0 {
                return Err(Error::backend(
                    "secrets",
                    format!(
                        "the database's {stored} secret(s) were sealed with another key than the one in {}: \
                         restore the key file they were set with (see --secrets-key-file), or, to start \
                         over without them, delete them from the database's secrets table",
                        self.key.path.display()
                    ),
                ));
            }
            tracing::info!(key = %self.key.path.display(), "no secrets are stored: the new key replaces the old one");
        }
        let (nonce, sealed) = self.key.seal(CHECK_AAD, CHECK_TEXT)?;
        let now = now_nanos();
        self.db
            .write(move |c| {
                exec(
                    c,
                    "INSERT INTO secrets (team, project, name, nonce, sealed, updated_at)
                     VALUES ('', '', '', ?1, ?2, ?3)
                     ON CONFLICT (team, project, name) DO UPDATE
                     SET nonce = excluded.nonce, sealed = excluded.sealed, updated_at = excluded.updated_at",
                    rusqlite::params![nonce.as_slice(), sealed, now],
                )
                .map(|_| ())
            })
            .await
    }

    fn undecryptable(&self, scope: &str, name: &str) -> Error {
        Error::backend(
            "secrets",
            format!(
                "cannot open secret {name} of {scope} with the key in {}: it was sealed with another key, \
                 or its row was altered or copied from another name",
                self.key.path.display()
            ),
        )
    }
}

#[async_trait]
impl SecretStore for SqliteSecretStore {
    async fn set(&self, scope: &SecretScope, name: &SecretName, value: &SecretValue) -> Result<()> {
        let (team, project) = row_scope(scope);
        let name = name.as_str().to_owned();
        let (nonce, sealed) = self
            .key
            .seal(&aad(&team, &project, &name), value.expose().as_bytes())?;
        let now = now_nanos();
        self.db
            .write(move |c| {
                exec(
                    c,
                    "INSERT INTO secrets (team, project, name, nonce, sealed, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (team, project, name) DO UPDATE
                     SET nonce = excluded.nonce, sealed = excluded.sealed, updated_at = excluded.updated_at",
                    rusqlite::params![team, project, name, nonce.as_slice(), sealed, now],
                )
                .map(|_| ())
            })
            .await
    }

    async fn names(&self, scope: &SecretScope) -> Result<Vec<String>> {
        let (team, project) = row_scope(scope);
        self.db
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT name FROM secrets WHERE team = ?1 AND project = ?2 ORDER BY name",
                )?;
                let rows = stmt.query_map([&team, &project], |r| r.get::<_, String>(0))?;
                rows.collect()
            })
            .await
    }

    async fn remove(&self, scope: &SecretScope, name: &SecretName) -> Result<bool> {
        let (team, project) = row_scope(scope);
        let name = name.as_str().to_owned();
        self.db
            .write(move |c| {
                exec(
                    c,
                    "DELETE FROM secrets WHERE team = ?1 AND project = ?2 AND name = ?3",
                    [&team, &project, &name],
                )
                .map(|n| n > 0)
            })
            .await
    }

    async fn for_build(&self, project: &ProjectKey) -> Result<Vec<(String, SecretValue)>> {
        let team = project.team.clone();
        let own = project.project.clone();
        let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> = self
            .db
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT project, name, nonce, sealed FROM secrets
                     WHERE team = ?1 AND (project = '' OR project = ?2)",
                )?;
                let rows = stmt.query_map([&team, &own], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?;
                rows.collect()
            })
            .await?;
        let (mut from_team, mut from_project) = (Vec::new(), Vec::new());
        for (row_project, name, nonce, sealed) in rows {
            let scope = if row_project.is_empty() {
                format!("team {}", project.team)
            } else {
                format!("project {project}")
            };
            let plain = self
                .key
                .open(&aad(&project.team, &row_project, &name), &nonce, sealed)
                .ok_or_else(|| self.undecryptable(&scope, &name))?;
            let value = SecretValue::from_bytes(plain).map_err(|e| {
                Error::backend(
                    "secrets",
                    format!("secret {name} of {scope} is unusable: {e}"),
                )
            })?;
            if row_project.is_empty() {
                from_team.push((name, value));
            } else {
                from_project.push((name, value));
            }
        }
        Ok(merge_for_build(from_team, from_project))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_key_is_made_once_private_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config/decap/secrets.key");
        let made = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700, "its folder is private");
        assert_eq!(std::fs::read(&path).unwrap().len(), SECRET_KEY_LEN);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no temporary file is left: {leftovers:?}"
        );

        let bytes = std::fs::read(&path).unwrap();
        let again = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "an existing key is kept"
        );
        let (nonce, sealed) = made.seal(b"aad", b"value").unwrap();
        assert_eq!(
            again.open(b"aad", &nonce, sealed.clone()).as_deref(),
            Some(&b"value"[..]),
            "the loaded key opens what the made one sealed"
        );
        assert_eq!(
            again.open(b"other", &nonce, sealed),
            None,
            "bound to its aad"
        );
        assert!(!format!("{made:?}").contains(&format!("{:?}", &bytes[..4])));
    }

    #[test]
    fn loose_permissions_and_wrong_lengths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        SecretKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretKey::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        SecretKey::load_or_create(&path).expect("stricter than 0600 is fine");

        let short = dir.path().join("short.key");
        std::fs::write(&short, b"too short").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretKey::load_or_create(&short).unwrap_err().to_string();
        assert!(e.contains("9 bytes") && e.contains("short.key"), "{e}");
        assert_eq!(
            std::fs::read(&short).unwrap(),
            b"too short",
            "never replaced"
        );

        let folder = dir.path().join("a-folder");
        std::fs::create_dir(&folder).unwrap();
        let e = SecretKey::load_or_create(&folder).unwrap_err().to_string();
        assert!(e.contains("not a file"), "{e}");
    }

    #[test]
    fn every_seal_has_its_own_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::load_or_create(&dir.path().join("k")).unwrap();
        let (n1, s1) = key.seal(b"a", b"same").unwrap();
        let (n2, s2) = key.seal(b"a", b"same").unwrap();
        assert_ne!(n1, n2);
        assert_ne!(s1, s2);
        assert!(!s1.windows(4).any(|w| w == b"same"), "sealed, not plain");
    }
}
