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
