//! A checkpoint written by format version 1 (checked in) is read by this
//! build: every later version must keep reading it, or convert it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use creditgate::ledger::ids::{OrgId, UserId, WalletId};
use creditgate::ledger::journal::NullJournal;
use creditgate::ledger::{Ledger, LedgerConfig, PurchaseRequest};
use creditgate::store::checkpoint;
use rust_decimal_macros::dec;

#[test]
fn the_checked_in_v1_checkpoint_reads_and_restores() {
    // Proves the v1 fixture decodes (header, checksum, body) and restores a
    // ledger with its balances, sums and idempotency keys.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1.cgcp");
    let snapshot = checkpoint::read(&path).unwrap();
    assert_eq!(snapshot.seq, 33, "the fixture covers records up to 33");
    assert_eq!(
        (snapshot.orgs.len(), snapshot.users.len(), snapshot.keys.len(), snapshot.wallets.len()),
        (2, 3, 4, 4)
    );
    let ledger = Ledger::from_snapshot(LedgerConfig::default(), Arc::new(NullJournal), &snapshot).unwrap();
    let now = "2027-03-11T12:00:00Z".parse().unwrap();
    let pool = ledger.balance(WalletId::Pool(OrgId(1)), now).unwrap();
    assert_eq!(
        (pool.balance, pool.totals.granted, pool.totals.debited),
        (dec!(1051.25), dec!(1060), dec!(8.75))
    );
    let upgraded = ledger.balance(WalletId::Lite(UserId(9)), now).unwrap();
    assert_eq!(
        (upgraded.balance, upgraded.totals.written_off),
        (dec!(0), dec!(28.25)),
        "the upgrade's write-off"
    );
    let again = PurchaseRequest {
        org: OrgId(1),
        amount: dec!(40),
        expires_at: None,
        reference: None,
        idempotency_key: "buy-1".into(),
    };
    assert_eq!(ledger.purchase(again, now).unwrap().entry.0, 14, "the idempotency key replays entry 14");
}

#[test]
fn a_damaged_copy_of_the_fixture_is_refused() {
    // Proves the checksum guards the body: one changed digit is refused.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1.cgcp");
    let text = std::fs::read_to_string(&path).unwrap().replacen("991.25", "991.26", 1);
    let error = checkpoint::decode(&path, text.as_bytes()).unwrap_err().to_string();
    assert!(error.contains("checksum"), "{error}");
}
