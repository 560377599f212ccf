//! The port contracts on the embedded adapters.

use std::sync::Arc;

use decap_embedded::{
    FileBlobStore, SqliteBuildStore, SqliteDb, SqliteDeferralQueue, SqliteLockStore,
    SqliteStatusLedger,
};

fn db() -> (tempfile::TempDir, SqliteDb) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteDb::open(&dir.path().join("decap.db")).expect("opens");
    (dir, db)
}

#[tokio::test]
async fn sqlite_build_store_keeps_the_contract() {
    let (_dir, db) = db();
    decap_contract_tests::build_store_suite(Arc::new(SqliteBuildStore::new(db))).await;
}

#[tokio::test]
async fn sqlite_run_store_keeps_the_contract() {
    let (_dir, db) = db();
    decap_contract_tests::run_store_suite(
        Arc::new(decap_embedded::SqliteRunStore::new(db.clone())),
        Arc::new(SqliteBuildStore::new(db)),
    )
    .await;
}

#[tokio::test]
async fn sqlite_lock_store_keeps_the_contract() {
    let (_dir, db) = db();
    decap_contract_tests::lock_store_suite(Arc::new(SqliteLockStore::new(db))).await;
}

#[tokio::test]
async fn sqlite_deferral_queue_keeps_the_contract() {
    let (_dir, db) = db();
    decap_contract_tests::deferral_queue_suite(Arc::new(SqliteDeferralQueue::new(db))).await;
}

#[tokio::test]
async fn file_blob_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    decap_contract_tests::blob_store_suite(Arc::new(FileBlobStore::new(dir.path().join("blobs"))))
        .await;
}

#[tokio::test]
async fn the_database_survives_reopening() {
    use decap_core::ports::DeferralQueue;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("decap.db");
    {
        let q = SqliteDeferralQueue::new(SqliteDb::open(&path).expect("opens"));
        q.set_open(false).await.expect("writes");
    }
    let q = SqliteDeferralQueue::new(SqliteDb::open(&path).expect("reopens"));
    assert!(
        !q.is_open().await.expect("reads"),
        "the queue state is durable"
    );
}

#[tokio::test]
async fn sqlite_status_ledger_keeps_the_contract() {
    let (dir, db) = db();
    decap_contract_tests::status_ledger_suite(Arc::new(SqliteStatusLedger::new(db))).await;
    // and it outlives the process
    let again = SqliteDb::open(&dir.path().join("decap.db")).expect("reopens");
    let ledger = SqliteStatusLedger::new(again);
    assert!(
        decap_core::ports::StatusLedger::reported(
            &ledger,
            "acme/widgets@6113728f27ae82c7b1a177c8d03f9e96e0adf246#decap/acme/widgets"
        )
        .await
        .expect("reads")
        .is_some()
    );
}

#[tokio::test]
async fn sqlite_status_hub_keeps_the_contract() {
    let (_dir, db) = db();
    decap_contract_tests::status_hub_suite(Arc::new(decap_embedded::SqliteStatusHub::new(db)))
        .await;
}

#[tokio::test]
async fn file_detail_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    decap_contract_tests::detail_store_suite(Arc::new(decap_embedded::FileDetailStore::new(
        dir.path().join("details"),
    )))
    .await;
}

fn secret_key(dir: &std::path::Path) -> decap_embedded::SecretKey {
    // Apart from the database, as `decap serve` keeps it.
    decap_embedded::SecretKey::load_or_create(&dir.join("config/decap/secrets.key"))
        .expect("makes a key")
}

#[tokio::test]
async fn sqlite_secret_store_keeps_the_contract() {
    let (dir, db) = db();
    let store = decap_embedded::SqliteSecretStore::open(db, secret_key(dir.path()))
        .await
        .expect("opens");
    decap_contract_tests::secret_store_suite(Arc::new(store)).await;
}

/// No file beside the database (the database, its WAL) holds `plain`.
fn assert_not_in_the_clear(db_path: &std::path::Path, plain: &str) {
    let mut seen = 0;
    for file in std::fs::read_dir(db_path.parent().expect("parent")).expect("lists") {
        let file = file.expect("entry").path();
        // The WAL goes when the last connection closes.
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        seen += 1;
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain.as_bytes()),
            "{} holds the value in the clear",
            file.display()
        );
    }
    assert!(seen > 0, "the database is there");
}

#[tokio::test]
async fn secret_values_are_sealed_at_rest_and_open_only_with_their_key() {
    use decap_core::ports::SecretStore;
    use decap_core::secrets::{SecretName, SecretScope, SecretValue};
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = dir.path().join("data/decap.db");
    let key_dir = tempfile::tempdir().expect("tempdir");
    let plain = "very-distinctive-secret-value-4711";
    let widgets = decap_core::ProjectKey::new("acme", "widgets").expect("valid");
    let scope = SecretScope::Project(widgets.clone());
    let name = SecretName::new("TOKEN").expect("valid");
    {
        let store = decap_embedded::SqliteSecretStore::open(
            SqliteDb::open(&db_path).expect("opens"),
            secret_key(key_dir.path()),
        )
        .await
        .expect("opens");
        store
            .set(
                &scope,
                &name,
                &SecretValue::new(plain.into()).expect("valid"),
            )
            .await
            .expect("sets");
        // A copy of the database alone (with its WAL) does not hold it.
        assert_not_in_the_clear(&db_path, plain);
    }

    assert_not_in_the_clear(&db_path, plain);

    // With its key, after reopening: the value, durably.
    let store = decap_embedded::SqliteSecretStore::open(
        SqliteDb::open(&db_path).expect("reopens"),
        secret_key(key_dir.path()),
    )
    .await
    .expect("reopens with its key");
    let got = store.for_build(&widgets).await.expect("opens");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.expose(), plain);
    drop(store);

    // With another key: refused at start-up, naming the key file.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = secret_key(other_dir.path());
    let e = decap_embedded::SqliteSecretStore::open(
        SqliteDb::open(&db_path).expect("reopens"),
        other.clone(),
    )
    .await
    .err()
    .expect("another key is refused")
    .to_string();
    assert!(
        e.contains(&other.path().display().to_string()) && e.contains("another key"),
        "{e}"
    );
    assert!(!e.contains(plain), "{e}");

    // A row copied to another name does not open: the name is bound in.
    let raw = rusqlite::Connection::open(&db_path).expect("opens");
    raw.execute(
        "INSERT INTO secrets (team, project, name, nonce, sealed, updated_at)
         SELECT team, project, 'STOLEN', nonce, sealed, updated_at FROM secrets WHERE name = 'TOKEN'",
        [],
    )
    .expect("copies the row");
    drop(raw);
    let store = decap_embedded::SqliteSecretStore::open(
        SqliteDb::open(&db_path).expect("reopens"),
        secret_key(key_dir.path()),
    )
    .await
    .expect("opens with its key");
    let e = store
        .for_build(&widgets)
        .await
        .expect_err("a copied row fails")
        .to_string();
    assert!(e.contains("STOLEN") && e.contains("secrets.key"), "{e}");
    assert!(!e.contains(plain), "{e}");
    // Nor does a row moved to another project.
    assert!(
        store
            .remove(&scope, &SecretName::new("STOLEN").expect("valid"))
            .await
            .expect("removes")
    );
    let raw = rusqlite::Connection::open(&db_path).expect("opens");
    raw.execute(
        "UPDATE secrets SET project = 'gadgets' WHERE name = 'TOKEN'",
        [],
    )
    .expect("moves the row");
    drop(raw);
    let gadgets = decap_core::ProjectKey::new("acme", "gadgets").expect("valid");
    assert!(
        store.for_build(&gadgets).await.is_err(),
        "bound to its scope"
    );
    assert!(store.for_build(&widgets).await.expect("reads").is_empty());
}

#[tokio::test]
async fn a_new_key_is_taken_while_no_secret_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = dir.path().join("decap.db");
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    decap_embedded::SqliteSecretStore::open(
        SqliteDb::open(&db_path).expect("opens"),
        secret_key(a.path()),
    )
    .await
    .expect("first key");
    decap_embedded::SqliteSecretStore::open(
        SqliteDb::open(&db_path).expect("opens"),
        secret_key(b.path()),
    )
    .await
    .expect("nothing sealed yet: the new key is taken");
    decap_embedded::SqliteSecretStore::open(
        SqliteDb::open(&db_path).expect("opens"),
        secret_key(b.path()),
    )
    .await
    .expect("and kept");
}
