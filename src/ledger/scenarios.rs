//! Table tests: one per rule of the credit model, end to end through `Ledger`.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use crate::ledger::calendar::YearMonth;
use crate::ledger::entity::Plan;
use crate::ledger::entry::{EntryKind, WriteOffReason};
use crate::ledger::ids::{Owner, WalletId};
use crate::ledger::limit::{LimitPeriod, LimitSubject, Limits};
use crate::ledger::lot::{LotKind, LotOrigin};
use crate::ledger::testkit::*;
use crate::ledger::{
    AdjustmentRequest, LedgerConfig, LedgerError, NewApp, PurchaseRequest, Refusal, SettleError, SpendContext,
};

fn local(tz: Tz, text: &str) -> DateTime<Utc> {
    let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap();
    tz.from_local_datetime(&naive).earliest().unwrap().with_timezone(&Utc)
}

fn ctx(key: crate::ledger::ids::KeyId) -> SpendContext<'static> {
    SpendContext { key, end_user: None }
}

/// Holds and settles `cost` on `wallet` with `key`.
fn spend(
    ledger: &crate::ledger::Ledger,
    wallet: WalletId,
    key: crate::ledger::ids::KeyId,
    cost: Decimal,
    now: DateTime<Utc>,
) {
    let hold = ledger.hold(wallet, request(), cost, ctx(key), now).unwrap();
    hold.settle(cost, details(), now).unwrap();
}

fn write_offs(journal: &crate::ledger::journal::MemoryJournal) -> Vec<(WalletId, Decimal, WriteOffReason)> {
    entries(journal)
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::WriteOff { reason } => Some((e.wallet, e.amount, reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn lite_allowance_turns_over_at_local_month_ends() {
    // Proves Lite lots run 00:00 on the 1st to 00:00 on the next 1st in the org's zone,
    // across February of a leap year, and that each remainder is written off, not rolled over.
    for tz in [Tz::UTC, Tz::America__New_York, Tz::Asia__Tokyo] {
        let (ledger, journal) = ledger();
        let created = local(tz, "2028-01-15 12:00:00");
        let org = org(&ledger, tz, None, created);
        let user = user(&ledger, org, Plan::Lite, dec!(10), created);
        let key = key(&ledger, org, Owner::User(user), Limits::NONE, created);
        let wallet = WalletId::Lite(user);
        spend(&ledger, wallet, key, dec!(3), created);
        let steps = [
            ("2028-01-31 23:59:59", dec!(7), YearMonth { year: 2028, month: 1 }),
            ("2028-02-01 00:00:00", dec!(10), YearMonth { year: 2028, month: 2 }),
            ("2028-02-29 23:59:59", dec!(10), YearMonth { year: 2028, month: 2 }),
            ("2028-03-01 00:00:00", dec!(10), YearMonth { year: 2028, month: 3 }),
        ];
        for (when, balance, month) in steps {
            let now = local(tz, when);
            let view = ledger.balance(wallet, now).unwrap();
            assert_eq!(view.balance, balance, "{tz} at {when}");
            assert_eq!(view.lots.len(), 1, "{tz} at {when}: one live lot");
            let lot = &view.lots[0];
            assert_eq!(lot.origin, LotOrigin::LiteMonthly { month }, "{tz} at {when}");
            assert_eq!(lot.expires_at, month.end(tz), "{tz} at {when}: expires next local 1st");
            assert_eq!(view.resets_at, Some(month.end(tz)), "{tz} at {when}: resets next 1st");
        }
        let expired: Vec<Decimal> = write_offs(&journal).into_iter().map(|w| w.1).collect();
        assert_eq!(expired, [dec!(-7), dec!(-10)], "{tz}: January's 7 and February's 10 written off");
        assert_verified(&ledger, &journal);
    }
}

#[test]
fn contract_years_grant_expire_and_renew() {
    // Proves platform and seat lots arrive at each contract-year start and expire at its end,
    // purchases expire at the term's end, a renewal grants its own years, and overlap is refused.
    let tz = Tz::Asia__Tokyo;
    let (ledger, journal) = ledger();
    let start = local(tz, "2027-03-10 09:00:00");
    let org = org(&ledger, tz, Some(term("2027-03-01", 2, dec!(1000), 3, dec!(100))), start);
    let pool = WalletId::Pool(org);
    let view = ledger.balance(pool, start).unwrap();
    assert_eq!(view.balance, dec!(1300));
    let kinds: Vec<LotKind> = view.lots.iter().map(|l| l.origin.kind()).collect();
    assert_eq!(kinds, [LotKind::Platform, LotKind::Seat]);
    assert_eq!(view.lots[0].expires_at, local(tz, "2028-03-01 00:00:00"));

    let receipt = ledger
        .purchase(
            PurchaseRequest {
                org,
                amount: dec!(500),
                expires_at: None,
                reference: Some("inv-1".into()),
                idempotency_key: "p1".into(),
            },
            start,
        )
        .unwrap();
    assert_eq!(receipt.expires_at, local(tz, "2029-03-01 00:00:00"), "purchase expires at term end");

    let steps = [
        // (local time, balance, live lot kinds)
        ("2028-02-29 23:59:59", dec!(1800), 3),
        ("2028-03-01 00:00:00", dec!(1800), 3), // year 2: 1300 written off, 1300 granted
        ("2029-03-01 00:00:00", dec!(0), 0),    // term over: everything expires, nothing granted
    ];
    for (when, balance, lots) in steps {
        let view = ledger.balance(pool, local(tz, when)).unwrap();
        assert_eq!((view.balance, view.lots.len()), (balance, lots), "at {when}");
    }
    let overlap = ledger.renew_contract(
        org,
        term("2028-06-01", 1, dec!(1), 0, dec!(0)),
        local(tz, "2029-03-02 00:00:00"),
    );
    assert!(matches!(overlap, Err(LedgerError::Contract(_))), "overlapping renewal refused");
    ledger
        .renew_contract(org, term("2029-04-01", 1, dec!(2000), 1, dec!(50)), local(tz, "2029-03-02 00:00:00"))
        .unwrap();
    assert_eq!(ledger.balance(pool, local(tz, "2029-03-31 23:59:59")).unwrap().balance, dec!(0));
    let renewed = ledger.balance(pool, local(tz, "2029-04-01 00:00:00")).unwrap();
    assert_eq!(renewed.balance, dec!(2050), "renewal grants its first year at its start");
    let expired: Vec<Decimal> = write_offs(&journal).into_iter().map(|w| w.1).collect();
    assert_eq!(expired, [dec!(-1000), dec!(-300), dec!(-1000), dec!(-300), dec!(-500)]);
    assert_verified(&ledger, &journal);
}

#[test]
fn debits_consume_soonest_expiry_then_kind_then_age() {
    // Proves the draw order across platform, seat, purchase and adjustment lots.
    let (ledger, journal) = ledger();
    let now = at("2027-01-10T00:00:00Z");
    // Two contract years: a purchase expires at the term's end, after the
    // first year's platform and seat lots.
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 2, dec!(10), 1, dec!(10))), now);
    let pool = WalletId::Pool(org);
    let admin = user(&ledger, org, Plan::Pro, dec!(0), now);
    let key = key(&ledger, org, Owner::User(admin), Limits::NONE, now);
    let purchase = |amount, expires: Option<&str>, idem: &str| {
        ledger
            .purchase(
                PurchaseRequest {
                    org,
                    amount,
                    expires_at: expires.map(at),
                    reference: None,
                    idempotency_key: idem.into(),
                },
                now,
            )
            .unwrap()
            .lot
    };
    let bought_early = purchase(dec!(10), Some("2028-06-01T00:00:00Z"), "early");
    let bought_term_end = purchase(dec!(10), None, "term-end");
    let adjusted = ledger
        .adjust(
            AdjustmentRequest {
                org,
                wallet: pool,
                amount: dec!(10),
                reason: "goodwill".into(),
                expires_at: Some(at("2027-02-01T00:00:00Z")),
                idempotency_key: "adj".into(),
            },
            now,
        )
        .unwrap()
        .lot
        .unwrap();
    let view = ledger.balance(pool, now).unwrap();
    let order: Vec<_> = view.lots.iter().map(|l| l.id).collect();
    let platform = view.lots.iter().find(|l| l.origin.kind() == LotKind::Platform).unwrap().id;
    let seat = view.lots.iter().find(|l| l.origin.kind() == LotKind::Seat).unwrap().id;
    assert_eq!(order, [adjusted, platform, seat, bought_early, bought_term_end]);
    // Each step drains exactly one lot, in that order.
    for (step, lot) in order.iter().enumerate() {
        spend(&ledger, pool, key, dec!(10), now);
        let last = entries(&journal).pop().unwrap();
        assert_eq!(last.lots.len(), 1, "step {step}");
        assert_eq!(last.lots[0].lot, *lot, "step {step}");
    }
    assert_verified(&ledger, &journal);
}

/// A ledger, its journal, an org, its pool and a Pro user's key.
type PoolAndKey = (
    crate::ledger::Ledger,
    std::sync::Arc<crate::ledger::journal::MemoryJournal>,
    crate::ledger::ids::OrgId,
    WalletId,
    crate::ledger::ids::KeyId,
);

/// At `now`, an org (UTC) whose pool holds `allocation` for the contract
/// year from 2027-01-01, and a Pro user's key capped by `limits`.
fn pool_with_a_key(now: &str, allocation: Decimal, limits: Limits) -> PoolAndKey {
    let (ledger, journal) = ledger();
    let now = at(now);
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, allocation, 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Pro, dec!(0), now);
    let key = key(&ledger, org, Owner::User(user), limits, now);
    (ledger, journal, org, WalletId::Pool(org), key)
}

/// At 2027-01-10, an org whose pool holds 9 of a year's 10, spent by a Pro
/// user's key. The spend of 1 brings the wallet up to date, so its next
/// event is the year's end.
fn pool_with_nine_of_a_years_ten() -> PoolAndKey {
    let (ledger, journal, org, pool, key) = pool_with_a_key("2027-01-10T00:00:00Z", dec!(10), Limits::NONE);
    spend(&ledger, pool, key, dec!(1), at("2027-01-10T00:00:00Z"));
    (ledger, journal, org, pool, key)
}

#[test]
fn a_lot_that_expires_before_any_other_event_is_written_off_at_its_expiry() {
    // Proves a purchase (or adjustment) whose expiry comes before the
    // wallet's next scheduled event still expires on time: its credit is
    // not spent after its expiry, and its remainder is written off.
    let (ledger, journal, org, pool, key) = pool_with_nine_of_a_years_ten();
    let now = at("2027-01-10T00:00:00Z");
    let request = |amount, expires: &str, idempotency_key: &str| PurchaseRequest {
        org,
        amount,
        expires_at: Some(at(expires)),
        reference: None,
        idempotency_key: idempotency_key.into(),
    };
    ledger.purchase(request(dec!(5), "2027-01-10T01:00:00Z", "short"), now).unwrap();
    let adjustment = AdjustmentRequest {
        org,
        wallet: pool,
        amount: dec!(3),
        reason: "goodwill".into(),
        expires_at: Some(at("2027-01-10T02:00:00Z")),
        idempotency_key: "adj".into(),
    };
    ledger.adjust(adjustment, now).unwrap();
    assert_eq!(ledger.balance(pool, now).unwrap().balance, dec!(17));
    spend(&ledger, pool, key, dec!(2), now);
    // An hour and a half on: the purchase's remainder (3) is gone, the
    // adjustment's is not; half an hour more and that is gone too.
    assert_eq!(ledger.balance(pool, at("2027-01-10T01:30:00Z")).unwrap().balance, dec!(12));
    assert_eq!(ledger.balance(pool, at("2027-01-10T02:30:00Z")).unwrap().balance, dec!(9));
    let expired: Vec<Decimal> = write_offs(&journal)
        .into_iter()
        .filter(|(wallet, _, reason)| *wallet == pool && *reason == WriteOffReason::Expired)
        .map(|(_, amount, _)| amount)
        .collect();
    assert_eq!(expired, [dec!(-3), dec!(-3)]);
    assert_verified(&ledger, &journal);
}

#[test]
fn upgrade_writes_off_lite_and_moves_to_pool() {
    // Proves Lite -> Pro writes off the Lite remainder and the user's keys draw on the pool at once.
    let (ledger, journal) = ledger();
    let now = at("2027-05-10T00:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Lite, dec!(50), now);
    let key = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    let lite = WalletId::Lite(user);
    spend(&ledger, lite, key, dec!(20), now);
    ledger.set_user_plan(org, user, Plan::Pro, now).unwrap();
    assert_eq!(ledger.balance(lite, now).unwrap().balance, dec!(0));
    assert_eq!(write_offs(&journal), [(lite, dec!(-30), WriteOffReason::Upgraded)]);
    let secret_wallet = ledger.resolve_key(&ledger.key(key).unwrap().hash).unwrap().wallet;
    assert_eq!(secret_wallet, WalletId::Pool(org));
    let refused = ledger.hold(lite, request(), dec!(1), ctx(key), now).unwrap_err();
    assert_eq!(refused.code(), "not_a_payer");
    spend(&ledger, WalletId::Pool(org), key, dec!(5), now);
    assert_eq!(ledger.balance(WalletId::Pool(org), now).unwrap().balance, dec!(95));
    // No more monthly grants while on Pro.
    assert_eq!(ledger.balance(lite, at("2027-07-01T00:00:00Z")).unwrap().balance, dec!(0));
    // Nor credit by hand, which a downgrade would make spendable: only taking it back.
    let adjust = |amount: Decimal, expires_at: Option<DateTime<Utc>>| {
        let wallet = lite;
        let (reason, idempotency_key) = ("goodwill".to_owned(), format!("to-lite-{amount}"));
        ledger.adjust(AdjustmentRequest { org, wallet, amount, reason, expires_at, idempotency_key }, now)
    };
    let refused = adjust(dec!(50), Some(at("2027-12-31T00:00:00Z")));
    assert_eq!(refused.unwrap_err(), LedgerError::LiteWalletNotInUse { user });
    assert_eq!(ledger.balance(lite, now).unwrap().balance, dec!(0));
    let taken_back = adjust(dec!(-1), None).unwrap_err();
    assert!(matches!(taken_back, LedgerError::InsufficientAvailable { .. }), "{taken_back:?}");
    assert_verified(&ledger, &journal);
}

#[test]
fn a_reason_may_run_over_lines_but_hold_no_other_control_character() {
    // Proves reasons and references are prose (line breaks pass) while an
    // escape or a bidi override is refused, and that a retry of an
    // adjustment answers its receipt before its text is checked.
    let (ledger, journal) = ledger();
    let now = at("2027-05-10T00:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
    let adjust = |reason: &str, key: &str| {
        ledger.adjust(
            AdjustmentRequest {
                org,
                wallet: WalletId::Pool(org),
                amount: dec!(-1),
                reason: reason.to_owned(),
                expires_at: None,
                idempotency_key: key.to_owned(),
            },
            now,
        )
    };
    adjust("refund\r\nper ticket 42", "lines").unwrap();
    for reason in ["a\u{1b}[31m", "a\u{202e}b", "a\tb"] {
        assert!(
            matches!(adjust(reason, reason), Err(LedgerError::Unprintable { field: "reason" })),
            "{reason:?}"
        );
    }
    assert_verified(&ledger, &journal);
}

#[test]
fn an_upgrade_cut_short_between_its_records_is_completed_by_its_retry() {
    // Proves the write-off is recorded before the plan: a crash after the
    // first record leaves a Lite user with no Lite credit, and the retried
    // upgrade goes through. (Before, the plan came first: a crash left a Pro
    // user whose Lite credit lived on, and the retry was refused as the same
    // plan.)
    let (ledger, journal) = ledger();
    let now = at("2027-05-10T00:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Lite, dec!(50), now);
    let lite = WalletId::Lite(user);
    ledger.set_user_plan(org, user, Plan::Pro, now).unwrap();
    let mut records = journal.records();
    let last = records.pop().unwrap();
    assert!(matches!(last.body, crate::ledger::journal::RecordBody::User(_)), "the plan is the last record");
    let next_journal = std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default());
    let next = crate::ledger::Ledger::restore(LedgerConfig::default(), next_journal, records).unwrap();
    assert_eq!(next.balance(lite, now).unwrap().balance, dec!(0), "nothing to carry over");
    assert_eq!(next.set_user_plan(org, user, Plan::Pro, now).unwrap().plan, Plan::Pro, "the retry completes");
    assert_eq!(next.balance(lite, at("2027-06-01T00:00:00Z")).unwrap().balance, dec!(0));
}

#[test]
fn downgrade_grants_from_next_first_or_pro_rated() {
    // Proves Pro -> Lite waits for the next 1st by default, or grants the pro-rated rest of
    // the month at once when configured (rounded down to the cent).
    for (prorate, tz, now, expected_now) in [
        (false, Tz::UTC, "2027-04-16T00:00:00Z", dec!(0)),
        (true, Tz::UTC, "2027-04-16T00:00:00Z", dec!(15.00)),
        (true, Tz::UTC, "2027-04-21T00:00:00Z", dec!(10.00)),
        (true, Tz::Asia__Tokyo, "2027-04-20T15:00:00Z", dec!(10.00)),
    ] {
        let (ledger, journal) = ledger();
        let now = at(now);
        let org = org(&ledger, tz, None, now);
        let user = user(&ledger, org, Plan::Pro, dec!(30), now);
        ledger.set_lite_allowance(org, user, dec!(30), prorate, now).unwrap();
        let key = key(&ledger, org, Owner::User(user), Limits::NONE, now);
        ledger.set_user_plan(org, user, Plan::Lite, now).unwrap();
        let lite = WalletId::Lite(user);
        assert_eq!(ledger.resolve_key(&ledger.key(key).unwrap().hash).unwrap().wallet, lite);
        assert_eq!(ledger.balance(lite, now).unwrap().balance, expected_now, "prorate {prorate} at {now}");
        let may = YearMonth { year: 2027, month: 5 }.start(tz);
        assert_eq!(ledger.balance(lite, may - TimeDelta::seconds(1)).unwrap().balance, expected_now);
        assert_eq!(ledger.balance(lite, may).unwrap().balance, dec!(30), "full allowance from the 1st");
        assert_verified(&ledger, &journal);
    }
}

#[test]
fn purchases_and_adjustments_are_idempotent() {
    // Proves a replayed key returns the original receipt, and a changed body names the field.
    let (ledger, journal) = ledger();
    let now = at("2027-02-01T00:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(0), 0, dec!(0))), now);
    let request = PurchaseRequest {
        org,
        amount: dec!(100),
        expires_at: None,
        reference: Some("inv-7".into()),
        idempotency_key: "k1".into(),
    };
    let first = ledger.purchase(request.clone(), now).unwrap();
    let again = ledger.purchase(request.clone(), now + TimeDelta::hours(1)).unwrap();
    assert_eq!(first, again, "replay returns the original receipt");
    assert_eq!(ledger.balance(WalletId::Pool(org), now).unwrap().balance, dec!(100), "credited once");
    let conflicts = [
        (PurchaseRequest { amount: dec!(101), ..request.clone() }, "amount"),
        (PurchaseRequest { expires_at: Some(at("2027-06-01T00:00:00Z")), ..request.clone() }, "expires_at"),
        (PurchaseRequest { reference: None, ..request.clone() }, "reference"),
    ];
    for (changed, field) in conflicts {
        let error = ledger.purchase(changed, now).unwrap_err();
        assert_eq!(error, LedgerError::IdempotencyConflict { key: "k1".into(), field });
    }
    let adjustment = AdjustmentRequest {
        org,
        wallet: WalletId::Pool(org),
        amount: dec!(-40),
        reason: "refund".into(),
        expires_at: None,
        idempotency_key: "k1".into(),
    };
    let error = ledger.adjust(adjustment.clone(), now).unwrap_err();
    assert_eq!(error, LedgerError::IdempotencyConflict { key: "k1".into(), field: "operation" });
    let adjustment = AdjustmentRequest { idempotency_key: "k2".into(), ..adjustment };
    let first = ledger.adjust(adjustment.clone(), now).unwrap();
    assert_eq!(ledger.adjust(adjustment.clone(), now).unwrap(), first);
    let error = ledger.adjust(AdjustmentRequest { reason: "other".into(), ..adjustment }, now).unwrap_err();
    assert_eq!(error, LedgerError::IdempotencyConflict { key: "k2".into(), field: "reason" });
    assert_eq!(ledger.balance(WalletId::Pool(org), now).unwrap().balance, dec!(60));
    assert_eq!(entries(&journal).len(), 2, "one purchase and one adjustment entry");
    assert_verified(&ledger, &journal);
}

#[test]
fn nothing_crosses_organizations() {
    // Proves admin calls and holds naming another org's wallet, user or key are refused.
    let (ledger, journal) = ledger();
    let now = at("2027-02-01T00:00:00Z");
    let a = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
    let b = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
    let b_user = user(&ledger, b, Plan::Lite, dec!(10), now);
    let a_user = user(&ledger, a, Plan::Pro, dec!(0), now);
    let a_key = key(&ledger, a, Owner::User(a_user), Limits::NONE, now);
    let adjustment = AdjustmentRequest {
        org: a,
        wallet: WalletId::Lite(b_user),
        amount: dec!(5),
        reason: "oops".into(),
        expires_at: Some(at("2027-03-01T00:00:00Z")),
        idempotency_key: "x".into(),
    };
    assert!(
        matches!(ledger.adjust(adjustment.clone(), now), Err(LedgerError::CrossOrg { target_org, .. }) if target_org == b)
    );
    let to_pool = AdjustmentRequest { wallet: WalletId::Pool(b), ..adjustment };
    assert!(matches!(ledger.adjust(to_pool, now), Err(LedgerError::CrossOrg { .. })));
    let new_key = crate::ledger::NewKey {
        owner: Owner::User(b_user),
        hash: crate::ledger::entity::KeyHash::of_secret("s"),
        label: String::new(),
        limits: Limits::NONE,
    };
    assert!(matches!(ledger.create_key(a, new_key, now), Err(LedgerError::CrossOrg { .. })));
    assert!(matches!(ledger.set_user_plan(a, b_user, Plan::Pro, now), Err(LedgerError::CrossOrg { .. })));
    assert!(matches!(ledger.revoke_key(b, a_key), Err(LedgerError::CrossOrg { .. })));
    let refused = ledger.hold(WalletId::Pool(b), request(), dec!(1), ctx(a_key), now).unwrap_err();
    assert_eq!(refused.code(), "not_a_payer");
    assert_eq!(ledger.balance(WalletId::Pool(b), now).unwrap().balance, dec!(100));
    assert_verified(&ledger, &journal);
}

/// One limit case: which subject carries the cap, the end-user id used, and
/// when the period resets (local to New York).
struct LimitCase {
    name: &'static str,
    period: LimitPeriod,
    on_key: bool,
    on_owner: bool,
    on_end_user: bool,
    reset: &'static str,
}

#[test]
fn each_spending_limit_refuses_and_resets() {
    // Proves key, owner, end-user caps per day, month and contract year refuse with their own
    // reason and reset at the org-local period boundary; per-request caps refuse single big holds.
    let tz = Tz::America__New_York;
    let cases = [
        LimitCase {
            name: "key daily",
            period: LimitPeriod::Day,
            on_key: true,
            on_owner: false,
            on_end_user: false,
            reset: "2027-03-11 00:00:00",
        },
        LimitCase {
            name: "app monthly",
            period: LimitPeriod::Month,
            on_key: false,
            on_owner: true,
            on_end_user: false,
            reset: "2027-04-01 00:00:00",
        },
        LimitCase {
            name: "app yearly",
            period: LimitPeriod::ContractYear,
            on_key: false,
            on_owner: true,
            on_end_user: false,
            reset: "2027-07-01 00:00:00",
        },
        LimitCase {
            name: "end-user daily",
            period: LimitPeriod::Day,
            on_key: false,
            on_owner: false,
            on_end_user: true,
            reset: "2027-03-11 00:00:00",
        },
        LimitCase {
            name: "end-user monthly",
            period: LimitPeriod::Month,
            on_key: false,
            on_owner: false,
            on_end_user: true,
            reset: "2027-04-01 00:00:00",
        },
    ];
    for case in cases {
        let (ledger, journal) = ledger();
        let now = local(tz, "2027-03-10 15:00:00");
        let org = org(&ledger, tz, Some(term("2026-07-01", 2, dec!(1000), 0, dec!(0))), now);
        let cap = |on: bool| {
            let mut limits = Limits::NONE;
            if on {
                match case.period {
                    LimitPeriod::Day => limits.daily = Some(dec!(10)),
                    LimitPeriod::Month => limits.monthly = Some(dec!(10)),
                    LimitPeriod::ContractYear => limits.contract_yearly = Some(dec!(10)),
                    LimitPeriod::Request => limits.per_request = Some(dec!(10)),
                }
            }
            limits
        };
        let app = ledger
            .create_app(
                org,
                NewApp {
                    name: "bot".into(),
                    limits: cap(case.on_owner),
                    end_user_limits: cap(case.on_end_user),
                },
                now,
            )
            .unwrap();
        let key = key(&ledger, org, Owner::App(app.id), cap(case.on_key), now);
        let pool = WalletId::Pool(org);
        let context = SpendContext { key, end_user: Some("eu-1") };
        // 6 settled + 3 open = 9 counted; 2 more would cross 10.
        ledger.hold(pool, request(), dec!(6), context, now).unwrap().settle(dec!(6), details(), now).unwrap();
        let open = ledger.hold(pool, request(), dec!(3), context, now).unwrap();
        let refused = ledger.hold(pool, request(), dec!(2), context, now).unwrap_err();
        let Refusal::SpendingLimit { limit, required, .. } = refused else {
            panic!("{}: expected a spending-limit refusal, got {refused:?}", case.name);
        };
        assert_eq!(
            (limit.period, limit.cap, limit.spent, required),
            (case.period, dec!(10), dec!(9), dec!(2)),
            "{}",
            case.name
        );
        let subject_ok = match &limit.subject {
            LimitSubject::Key(k) => case.on_key && *k == key,
            LimitSubject::App(a) => case.on_owner && *a == app.id,
            LimitSubject::EndUser { app: a, end_user } => {
                case.on_end_user && *a == app.id && end_user == "eu-1"
            }
            LimitSubject::User(_) => false,
        };
        assert!(subject_ok, "{}: refusal names {:?}", case.name, limit.subject);
        assert_eq!(limit.resets_at, Some(local(tz, case.reset)), "{}", case.name);
        if case.on_end_user {
            let other = SpendContext { key, end_user: Some("eu-2") };
            ledger.hold(pool, request(), dec!(2), other, now).unwrap().release(now);
        }
        // Settling below the hold gives room back.
        open.settle(dec!(1), details(), now).unwrap();
        ledger.hold(pool, request(), dec!(2), context, now).unwrap().release(now);
        let reset = local(tz, case.reset);
        let before = reset - TimeDelta::seconds(1);
        ledger
            .hold(pool, request(), dec!(3), context, before)
            .unwrap()
            .settle(dec!(3), details(), before)
            .unwrap();
        assert!(
            ledger.hold(pool, request(), dec!(1), context, before).is_err(),
            "{}: still capped",
            case.name
        );
        ledger.hold(pool, request(), dec!(10), context, reset).unwrap().release(reset);
        assert_verified(&ledger, &journal);
    }
}

#[test]
fn a_full_end_user_table_makes_room_once_a_daily_cap_s_day_is_over() {
    // Proves the end users an application tracks are forgotten when no cap
    // needs them: those capped daily the next day (they were kept until the
    // contract year ended, so one client minting ids locked every new end
    // user out for a year), those whose holds were released at once, and
    // never one whose monthly cap still counts its spend.
    let tz = Tz::UTC;
    let config = LedgerConfig { max_end_users_per_app: 3, ..LedgerConfig::default() };
    let (ledger, journal) = ledger_with(config);
    let now = local(tz, "2027-03-10 15:00:00");
    let org = org(&ledger, tz, Some(term("2026-07-01", 2, dec!(1000), 0, dec!(0))), now);
    let pool = WalletId::Pool(org);
    let app_capped = |limits: Limits| {
        let app = ledger
            .create_app(
                org,
                NewApp { name: "bot".into(), limits: Limits::NONE, end_user_limits: limits },
                now,
            )
            .unwrap();
        (app.id, key(&ledger, org, Owner::App(app.id), Limits::NONE, now))
    };
    let spend_as = |key, end_user: &str, at| {
        let context = SpendContext { key, end_user: Some(end_user) };
        ledger
            .hold(pool, request(), dec!(1), context, at)
            .map(|hold| hold.settle(dec!(1), details(), at).unwrap())
    };
    let refused_for_room =
        |result: Result<_, Refusal>| matches!(result, Err(Refusal::EndUserCapacity { .. }));

    let (daily_app, daily) = app_capped(Limits { daily: Some(dec!(5)), ..Limits::NONE });
    for end_user in ["eu-1", "eu-2", "eu-3"] {
        spend_as(daily, end_user, now).unwrap();
    }
    assert!(refused_for_room(spend_as(daily, "eu-4", now)), "today the table is full");
    let tomorrow = local(tz, "2027-03-11 00:00:01");
    spend_as(daily, "eu-4", tomorrow).expect("yesterday's end users are no longer needed");
    // eu-1 was forgotten with the others: its day starts from nothing.
    for _ in 0..5 {
        spend_as(daily, "eu-1", tomorrow).unwrap();
    }
    assert!(matches!(spend_as(daily, "eu-1", tomorrow), Err(Refusal::SpendingLimit { .. })), "still capped");

    let (_, released) = app_capped(Limits { daily: Some(dec!(5)), ..Limits::NONE });
    for end_user in ["r-1", "r-2", "r-3"] {
        let context = SpendContext { key: released, end_user: Some(end_user) };
        ledger.hold(pool, request(), dec!(1), context, now).unwrap().release(now);
    }
    spend_as(released, "r-4", now).expect("end users who spent nothing are not kept");

    let (_, monthly) = app_capped(Limits { monthly: Some(dec!(5)), ..Limits::NONE });
    for end_user in ["m-1", "m-2", "m-3"] {
        spend_as(monthly, end_user, now).unwrap();
    }
    assert!(refused_for_room(spend_as(monthly, "m-4", tomorrow)), "this month's spend still counts");
    let next_month = local(tz, "2027-04-01 00:00:01");
    spend_as(monthly, "m-4", next_month).expect("last month's end users are no longer needed");

    // A cap set on a period none was set on counts every end user from
    // then, those kept and those already forgotten alike: eu-4 (kept, 1
    // spent this month) and eu-2 (forgotten) may each spend the new 3.
    let april = local(tz, "2027-04-02 12:00:00");
    spend_as(daily, "eu-4", april).unwrap();
    let both = Limits { daily: Some(dec!(5)), monthly: Some(dec!(3)), ..Limits::NONE };
    ledger.set_app_limits(org, daily_app, Limits::NONE, both).unwrap();
    for end_user in ["eu-4", "eu-2"] {
        for _ in 0..3 {
            spend_as(daily, end_user, april).unwrap();
        }
        assert!(
            matches!(spend_as(daily, end_user, april), Err(Refusal::SpendingLimit { .. })),
            "{end_user} is capped at the new 3"
        );
    }
    assert_verified(&ledger, &journal);
}

#[test]
fn per_request_and_user_caps_refuse() {
    // Proves a per-request cap refuses one large hold and a user cap covers all the user's keys.
    let (ledger, _journal) = ledger();
    let now = at("2027-03-10T12:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(1000), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Pro, dec!(0), now);
    ledger
        .set_user_limits(
            org,
            user,
            Limits { monthly: Some(dec!(20)), per_request: Some(dec!(8)), ..Limits::NONE },
        )
        .unwrap();
    let k1 = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    let k2 = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    let pool = WalletId::Pool(org);
    let refused = ledger.hold(pool, request(), dec!(9), ctx(k1), now).unwrap_err();
    assert!(
        matches!(refused, Refusal::SpendingLimit { ref limit, .. } if limit.period == LimitPeriod::Request && limit.resets_at.is_none())
    );
    spend(&ledger, pool, k1, dec!(8), now);
    spend(&ledger, pool, k2, dec!(8), now);
    let refused = ledger.hold(pool, request(), dec!(5), ctx(k2), now).unwrap_err();
    assert!(
        matches!(refused, Refusal::SpendingLimit { ref limit, .. } if limit.subject == LimitSubject::User(user) && limit.period == LimitPeriod::Month)
    );
}

#[test]
fn holds_reserve_and_settles_debit_real_cost() {
    // Proves available = balance - holds, overruns go below zero only by the overrun and block
    // the next hold, releases free the hold, and settles are idempotent per request id.
    let (ledger, journal) = ledger();
    let now = at("2027-03-10T12:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(10), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Pro, dec!(0), now);
    let key = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    let pool = WalletId::Pool(org);
    let first = ledger.hold(pool, request(), dec!(6), ctx(key), now).unwrap();
    let view = ledger.balance(pool, now).unwrap();
    assert_eq!((view.balance, view.available, view.held), (dec!(10), dec!(4), dec!(6)));
    let refused = ledger.hold(pool, request(), dec!(5), ctx(key), now).unwrap_err();
    let Refusal::InsufficientFunds { wallet, required } = refused else { panic!("{refused:?}") };
    assert_eq!(
        (wallet.balance, wallet.available, required, wallet.resets_at),
        (dec!(10), dec!(4), dec!(5), None)
    );
    let second = ledger.hold(pool, request(), dec!(4), ctx(key), now).unwrap();
    let second_id = second.request_id();
    let settled = first.settle(dec!(9), details(), now).unwrap();
    assert_eq!(
        (settled.debited, settled.released, settled.overrun, settled.balance_after),
        (dec!(9), dec!(0), dec!(0), dec!(1))
    );
    let settled = second.settle(dec!(4), details(), now).unwrap();
    assert_eq!(
        (settled.overrun, settled.balance_after),
        (dec!(3), dec!(-3)),
        "below zero by the overrun only"
    );
    let again = ledger.settle_request(pool, second_id, dec!(100), details(), now).unwrap();
    assert_eq!(again, settled, "a second settle returns the first result");
    let refused = ledger.hold(pool, request(), dec!(0.01), ctx(key), now).unwrap_err();
    assert_eq!(refused.code(), "insufficient_funds");
    let dup = ledger.hold(pool, second_id, dec!(0), ctx(key), now).unwrap_err();
    assert_eq!(dup.code(), "duplicate_request");
    // A purchase pays the overrun back first.
    ledger
        .purchase(
            PurchaseRequest {
                org,
                amount: dec!(5),
                expires_at: None,
                reference: None,
                idempotency_key: "p".into(),
            },
            now,
        )
        .unwrap();
    let view = ledger.balance(pool, now).unwrap();
    assert_eq!((view.balance, view.lots[0].remaining), (dec!(2), dec!(2)));
    let released = ledger.hold(pool, request(), dec!(2), ctx(key), now).unwrap().release(now);
    assert_eq!(released, dec!(2));
    assert_eq!(ledger.balance(pool, now).unwrap().available, dec!(2));
    assert_verified(&ledger, &journal);
}

#[test]
fn holds_expire_after_their_ttl_only_when_orphaned() {
    // Proves the TTL never voids a hold whose request still runs (its token is alive: voiding it
    // would let the wallet spend the same credit twice), voids an orphaned one (freeing the
    // money), a late settle by id still debits, the open-hold bound refuses by name, and
    // zero-cost settles write no entry.
    let config =
        LedgerConfig { hold_ttl_ms: 60_000, max_open_holds_per_wallet: 2, ..LedgerConfig::default() };
    let (ledger, journal) = ledger_with(config);
    let now = at("2027-03-10T12:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(10), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Pro, dec!(0), now);
    let key = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    let pool = WalletId::Pool(org);
    let running = ledger.hold(pool, request(), dec!(4), ctx(key), now).unwrap();
    let zero = ledger.hold(pool, request(), dec!(4), ctx(key), now).unwrap();
    let refused = ledger.hold(pool, request(), dec!(1), ctx(key), now).unwrap_err();
    assert!(matches!(refused, Refusal::TooManyOpenHolds { limit: 2, .. }));
    let entries_before = entries(&journal).len();
    assert_eq!(zero.settle(dec!(0), details(), now).unwrap().entry, None);
    assert_eq!(entries(&journal).len(), entries_before, "zero cost writes nothing");
    assert_eq!(
        ledger.void_expired_holds(now + TimeDelta::seconds(60)),
        0,
        "a running request keeps its hold"
    );
    let later = now + TimeDelta::seconds(3600);
    assert_eq!(ledger.void_expired_holds(later), 0, "however long it runs");
    assert_eq!(ledger.balance(pool, later).unwrap().available, dec!(6), "its credit stays reserved");
    let settled = running.settle(dec!(3), details(), later).unwrap();
    assert!(!settled.late);
    assert_eq!(settled.balance_after, dec!(7));

    let orphan_id = request();
    let orphan = ledger.hold(pool, orphan_id, dec!(4), ctx(key), later).unwrap();
    drop(orphan);
    assert_eq!(ledger.void_expired_holds(later + TimeDelta::seconds(59)), 0);
    assert_eq!(ledger.void_expired_holds(later + TimeDelta::seconds(60)), 1, "an orphan is voided");
    let after = later + TimeDelta::seconds(61);
    assert_eq!(ledger.balance(pool, after).unwrap().available, dec!(7));
    let late = ledger.settle_request(pool, orphan_id, dec!(2), details(), after).unwrap_err();
    assert!(matches!(late, SettleError::UnknownRequest { .. }), "a voided hold is forgotten: {late:?}");
    let unknown = ledger.settle_request(pool, request(), dec!(1), details(), after).unwrap_err();
    assert!(matches!(unknown, SettleError::UnknownRequest { .. }));
    // A settle refused before it took the hold leaves it orphaned, voided by
    // its TTL. (Before, the token counted as spent: the hold stayed held
    // until a restart.)
    let refused = ledger.hold(pool, request(), dec!(4), ctx(key), after).unwrap();
    assert!(matches!(refused.settle(dec!(-1), details(), after), Err(SettleError::InvalidCost { .. })));
    assert_eq!(ledger.balance(pool, after).unwrap().available, dec!(3), "held until its TTL");
    assert_eq!(ledger.void_expired_holds(after + TimeDelta::seconds(60)), 1, "then voided");
    assert_eq!(ledger.balance(pool, after + TimeDelta::seconds(61)).unwrap().available, dec!(7));
    // The count the metrics show takes a hold voided by the wallet's own next
    // operation as well as those the periodic sweep voids.
    assert_eq!(ledger.holds_voided(), 2);
    let last = after + TimeDelta::seconds(61);
    drop(ledger.hold(pool, request(), dec!(1), ctx(key), last).unwrap());
    assert_eq!(ledger.balance(pool, last + TimeDelta::seconds(60)).unwrap().open_holds, 0);
    assert_eq!(ledger.holds_voided(), 3);
    assert_verified(&ledger, &journal);
}

#[test]
fn refusals_follow_their_precedence() {
    // Proves the documented order: invalid amount, unknown wallet, not a payer, then limits before funds.
    let (ledger, _journal) = ledger();
    let now = at("2027-03-10T12:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(1), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Pro, dec!(0), now);
    let key =
        key(&ledger, org, Owner::User(user), Limits { per_request: Some(dec!(5)), ..Limits::NONE }, now);
    let pool = WalletId::Pool(org);
    let missing = WalletId::Lite(crate::ledger::ids::UserId(9999));
    let code =
        |wallet, amount, key| ledger.hold(wallet, request(), amount, ctx(key), now).unwrap_err().code();
    assert_eq!(code(missing, dec!(-1), key), "invalid_amount");
    assert_eq!(code(missing, dec!(1), key), "unknown_wallet");
    assert_eq!(code(pool, dec!(100), crate::ledger::ids::KeyId(9999)), "not_a_payer");
    assert_eq!(code(pool, dec!(100), key), "spending_limit");
    assert_eq!(code(pool, dec!(2), key), "insufficient_funds");
    ledger.revoke_key(org, key).unwrap();
    assert_eq!(code(pool, dec!(1), key), "not_a_payer");
    assert!(ledger.resolve_key(&ledger.key(key).unwrap().hash).is_none());
}

#[test]
fn audit_catches_a_tampered_entry() {
    // Proves verify() reports an entry whose amount no longer matches its balance chain.
    let (ledger, journal) = ledger();
    let now = at("2027-03-10T12:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(10), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Pro, dec!(0), now);
    let key = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    spend(&ledger, WalletId::Pool(org), key, dec!(2), now);
    let mut tampered = entries(&journal);
    tampered[1].amount = dec!(-1);
    let report = ledger.verify(&tampered);
    assert!(!report.is_clean());
    assert!(report.mismatches.iter().all(|m| m.wallet == Some(WalletId::Pool(org))));
}

#[test]
fn new_lite_user_gets_current_month_in_full() {
    // Proves a Lite user created mid-month is granted that month's whole allowance at once.
    let (ledger, _journal) = ledger();
    let now = at("2028-02-29T23:00:00Z");
    let org = org(&ledger, Tz::UTC, None, now);
    let user = user(&ledger, org, Plan::Lite, dec!(12.5), now);
    let view = ledger.balance(WalletId::Lite(user), now).unwrap();
    assert_eq!(view.balance, dec!(12.5));
    assert_eq!(view.lots[0].effective_at, at("2028-02-01T00:00:00Z"));
    let _ = NaiveDate::from_ymd_opt(2028, 2, 29).unwrap();
}

#[test]
fn an_allowance_raised_mid_month_is_granted_next_month_also_after_a_restart() {
    // Proves a Lite allowance changed mid-month starts on the next 1st, live
    // and after a restart from the journal or a checkpoint. A month granted
    // at 0 writes no entry, so a restart used to grant it again at the new
    // allowance: credit from nothing.
    let (ledger, journal) = ledger();
    let created = at("2027-03-03T00:00:00Z");
    let org = org(&ledger, Tz::UTC, None, created);
    let zero = user(&ledger, org, Plan::Lite, dec!(0), created);
    // A second user: 5 granted in March, then 0, then 8, all in March.
    let five = user(&ledger, org, Plan::Lite, dec!(5), created);
    let changed = at("2027-03-10T00:00:00Z");
    ledger.set_lite_allowance(org, zero, dec!(10), false, changed).unwrap();
    ledger.set_lite_allowance(org, five, dec!(0), false, changed).unwrap();
    ledger.set_lite_allowance(org, five, dec!(8), false, changed).unwrap();
    let later = at("2027-03-20T00:00:00Z");
    let april = at("2027-04-01T00:00:00Z");
    let fresh = || std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default());
    let restored =
        crate::ledger::Ledger::restore(LedgerConfig::default(), fresh(), journal.records()).unwrap();
    let checkpoint: crate::ledger::snapshot::LedgerSnapshot =
        serde_json::from_slice(&serde_json::to_vec(&restored.snapshot(u64::MAX)).unwrap()).unwrap();
    let from_checkpoint =
        crate::ledger::Ledger::restore_from(LedgerConfig::default(), fresh(), Some(&checkpoint), Vec::new())
            .unwrap();
    for (name, ledger) in
        [("live", &ledger), ("restored", &restored), ("from a checkpoint", &from_checkpoint)]
    {
        let balance = |user, at| ledger.balance(WalletId::Lite(user), at).unwrap().balance;
        assert_eq!(balance(zero, later), dec!(0), "{name}: March stays at the old 0");
        assert_eq!(balance(five, later), dec!(5), "{name}: March stays at the old 5");
        assert_eq!(balance(zero, april), dec!(10), "{name}: the new allowance from April");
        assert_eq!(balance(five, april), dec!(8), "{name}");
    }
    assert_verified(&ledger, &journal);
}

#[test]
fn moving_between_plans_within_a_month_never_grants_its_allowance_twice() {
    // Proves a downgrade's pro-rated grant is skipped for a month already granted: a Lite
    // user who spent April's 30, upgraded and downgraded again got 15 more, and each
    // Pro -> Lite -> Pro round trip minted another share.
    let (ledger, journal) = ledger();
    let april = at("2027-04-01T00:00:00Z");
    let org = org(&ledger, Tz::UTC, None, april);
    let spender = user(&ledger, org, Plan::Lite, dec!(30), april);
    ledger.set_lite_allowance(org, spender, dec!(30), true, april).unwrap();
    let key = key(&ledger, org, Owner::User(spender), Limits::NONE, april);
    let lite = WalletId::Lite(spender);
    spend(&ledger, lite, key, dec!(30), april);
    let mid = at("2027-04-16T00:00:00Z");
    ledger.set_user_plan(org, spender, Plan::Pro, mid).unwrap();
    ledger.set_user_plan(org, spender, Plan::Lite, mid).unwrap();
    assert_eq!(ledger.balance(lite, mid).unwrap().balance, dec!(0), "April was granted once, and spent");
    assert_eq!(ledger.balance(lite, at("2027-05-01T00:00:00Z")).unwrap().balance, dec!(30), "May comes");

    let pro = user(&ledger, org, Plan::Pro, dec!(30), april);
    ledger.set_lite_allowance(org, pro, dec!(30), true, april).unwrap();
    let wallet = WalletId::Lite(pro);
    ledger.set_user_plan(org, pro, Plan::Lite, mid).unwrap();
    assert_eq!(ledger.balance(wallet, mid).unwrap().balance, dec!(15.00), "the rest of April, once");
    ledger.set_user_plan(org, pro, Plan::Pro, mid).unwrap();
    ledger.set_user_plan(org, pro, Plan::Lite, mid).unwrap();
    assert_eq!(ledger.balance(wallet, mid).unwrap().balance, dec!(0), "no second share of April");
    assert_verified(&ledger, &journal);
}

#[test]
fn a_create_retried_after_a_restart_answers_what_the_first_call_created() {
    // Proves the idempotency key of an org or a user lives in its record, so a
    // retry after a restart finds it, and that a user's key is scoped to its org.
    let (ledger, journal) = ledger();
    let now = at("2027-05-10T00:00:00Z");
    let contract = Some(term("2027-01-01", 1, dec!(100), 0, dec!(0)));
    let new_org = || crate::ledger::admin::NewOrg {
        name: "acme".into(),
        time_zone: Tz::UTC,
        contract: contract.clone(),
    };
    let new_user = || crate::ledger::admin::NewUser {
        name: "lee".into(),
        plan: Plan::Lite,
        lite_monthly_allowance: dec!(5),
        prorate_on_downgrade: false,
        limits: Limits::NONE,
    };
    let org = ledger.create_org_once(new_org(), Some("org-1".into()), now).unwrap();
    let user = ledger.create_user_once(org.id, new_user(), Some("user-1".into()), now).unwrap();
    let restored = crate::ledger::Ledger::restore(
        LedgerConfig::default(),
        std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default()),
        journal.records(),
    )
    .unwrap();
    assert_eq!(restored.create_org_once(new_org(), Some("org-1".into()), now).unwrap(), org);
    assert_eq!(restored.create_user_once(org.id, new_user(), Some("user-1".into()), now).unwrap(), user);
    assert_eq!(restored.orgs().len(), 1);
    assert_eq!(restored.balance(WalletId::Pool(org.id), now).unwrap().balance, dec!(100), "granted once");
    assert_eq!(restored.balance(WalletId::Lite(user.id), now).unwrap().balance, dec!(5), "granted once");
    let other = restored.create_org_once(new_org(), Some("org-2".into()), now).unwrap();
    let theirs = restored.create_user_once(other.id, new_user(), Some("user-1".into()), now).unwrap();
    assert_ne!(theirs.id, user.id, "a user's key belongs to its org");
    let renamed = crate::ledger::admin::NewOrg { name: "acme2".into(), ..new_org() };
    let refused = restored.create_org_once(renamed, Some("org-1".into()), now).unwrap_err();
    assert_eq!(refused, LedgerError::IdempotencyConflict { key: "org-1".into(), field: "name" });
    assert_verified(&ledger, &journal);
}

#[test]
fn a_change_read_before_midnight_and_made_after_the_tick_reckons_the_month_from_the_wallet() {
    // Proves an admin change whose time was read before a month ended, and
    // which runs after the tick moved the wallet into the next month, starts
    // the new allowance the month after the wallet's: April was granted (at
    // 0) before the change, so a restart must not grant it again at 10; and
    // a downgrade then grants April once, not in full and pro-rated too.
    let (ledger, journal) = ledger();
    let march = at("2027-03-03T00:00:00Z");
    let org = org(&ledger, Tz::UTC, None, march);
    let zero = user(&ledger, org, Plan::Lite, dec!(0), march);
    let was_lite = user(&ledger, org, Plan::Lite, dec!(30), march);
    ledger.set_lite_allowance(org, was_lite, dec!(30), true, march).unwrap();
    ledger.set_user_plan(org, was_lite, Plan::Pro, march).unwrap();
    let (read, tick) = (at("2027-03-31T23:59:59.900Z"), at("2027-04-01T00:00:00.300Z"));
    ledger.tick(tick);
    ledger.set_lite_allowance(org, zero, dec!(10), false, read).unwrap();
    ledger.set_user_plan(org, was_lite, Plan::Lite, read).unwrap();
    let restored = crate::ledger::Ledger::restore(
        LedgerConfig::default(),
        std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default()),
        journal.records(),
    )
    .unwrap();
    let april = at("2027-04-02T00:00:00Z");
    for (name, ledger) in [("live", &ledger), ("restored", &restored)] {
        let balance = |user| ledger.balance(WalletId::Lite(user), april).unwrap().balance;
        assert_eq!(balance(zero), dec!(0), "{name}: April was granted at 0 before the change");
        let downgraded = balance(was_lite);
        assert!(downgraded <= dec!(30) && downgraded >= dec!(29.99), "{name}: one April: {downgraded}");
    }
    assert_verified(&ledger, &journal);
}

/// [`pool_with_nine_of_a_years_ten`] with 5 bought at `bought` that expire
/// at 01:00, and the ledger's tick past that expiry: the 5 are written off.
/// Returns the ledger, its journal, the pool and the key.
fn pool_past_a_purchase_expiry(
    bought: &str,
) -> (
    crate::ledger::Ledger,
    std::sync::Arc<crate::ledger::journal::MemoryJournal>,
    WalletId,
    crate::ledger::ids::KeyId,
) {
    let (ledger, journal, org, pool, key) = pool_with_nine_of_a_years_ten();
    let short = PurchaseRequest {
        org,
        amount: dec!(5),
        expires_at: Some(at("2027-01-10T01:00:00Z")),
        reference: None,
        idempotency_key: "short".into(),
    };
    ledger.purchase(short, at(bought)).unwrap();
    ledger.tick(at("2027-01-10T01:00:05Z"));
    assert_eq!(ledger.balance(pool, at("2027-01-10T01:00:05Z")).unwrap().balance, dec!(9));
    (ledger, journal, pool, key)
}

#[test]
fn a_debit_posted_after_an_expiry_it_settled_before_is_paid_by_the_expired_credit() {
    // Proves a debit recorded late (a cluster replica's settle, posted by
    // the treasurer after it wrote the lot off) draws on the credit that was
    // live when it settled: the write-off gives back what the debit needs,
    // up to what was written off, and only for debits settled while the
    // lot was live. The memory of the write-off survives a restart from the
    // journal and a checkpoint.
    // The treasurer's tick passes the expiry before the debits arrive.
    let (ledger, journal, pool, key) = pool_past_a_purchase_expiry("2027-01-10T00:10:00Z");
    let post = |ledger, cost, settled| post_late(ledger, pool, key, cost, settled);
    // Settled a minute before the expiry: the expired purchase pays all 2.
    assert_eq!(post(&ledger, dec!(2), "2027-01-10T00:59:00Z"), dec!(9));
    let taken_back = |journal: &crate::ledger::journal::MemoryJournal| -> Vec<Decimal> {
        let entries = entries(journal);
        let reversed = entries.iter().filter(|e| matches!(e.kind, EntryKind::WriteOffReversed { .. }));
        reversed.map(|e| e.amount).collect()
    };
    assert_eq!(taken_back(&journal), [dec!(2)]);

    // A ledger rebuilt from the journal, and one from a checkpoint, remember
    // that 3 of the write-off is left to give back.
    let restored_journal = std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default());
    let restored =
        crate::ledger::Ledger::restore(LedgerConfig::default(), restored_journal.clone(), journal.records())
            .unwrap();
    // Through the checkpoint file's JSON, as a restart reads it.
    let checkpoint: crate::ledger::snapshot::LedgerSnapshot =
        serde_json::from_slice(&serde_json::to_vec(&restored.snapshot(u64::MAX)).unwrap()).unwrap();
    assert!(
        checkpoint.wallets.iter().any(|wallet| !wallet.expired.is_empty()),
        "the checkpoint keeps the write-off"
    );
    let from_checkpoint_journal = std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default());
    let from_checkpoint = crate::ledger::Ledger::restore_from(
        LedgerConfig::default(),
        from_checkpoint_journal.clone(),
        Some(&checkpoint),
        Vec::new(),
    )
    .unwrap();
    for (ledger, journal) in
        [(&ledger, &journal), (&restored, &restored_journal), (&from_checkpoint, &from_checkpoint_journal)]
    {
        // 4 settled before the expiry: 3 left of the write-off, then 1 of the year's credit.
        assert_eq!(post(ledger, dec!(4), "2027-01-10T00:59:30Z"), dec!(8));
        // Nothing is left to give back, and a debit settled after the
        // expiry has nothing to take back: both are charged to live credit.
        assert_eq!(post(ledger, dec!(1), "2027-01-10T00:59:40Z"), dec!(7));
        assert_eq!(post(ledger, dec!(1), "2027-01-10T01:00:01Z"), dec!(6));
        assert_eq!(ledger.balance(pool, at("2027-01-10T01:00:06Z")).unwrap().balance, dec!(6));
        let this_run: Vec<Decimal> = taken_back(journal);
        assert!(this_run.ends_with(&[dec!(3)]), "3 more given back, once: {this_run:?}");
        assert_eq!(this_run.iter().filter(|amount| **amount == dec!(3)).count(), 1);
    }
    assert_verified(&ledger, &journal);
}

/// Posts a debit of `cost` for a new request settled at `settled`; the
/// balance after.
fn post_late(
    ledger: &crate::ledger::Ledger,
    pool: WalletId,
    key: crate::ledger::ids::KeyId,
    cost: Decimal,
    settled: &str,
) -> Decimal {
    let posted =
        ledger.post_debit(pool, request(), key, None, cost, cost, details(), at(settled), at(settled));
    posted.unwrap().balance_after
}

#[test]
fn a_checkpoint_written_before_write_offs_were_remembered_still_restores() {
    // Proves an old checkpoint (no `expired` field) reads, remembering none.
    let (ledger, _journal, pool, key) = pool_past_a_purchase_expiry("2027-01-10T00:10:00Z");
    let mut old = serde_json::to_value(ledger.snapshot(u64::MAX)).unwrap();
    for wallet in old["wallets"].as_array_mut().unwrap() {
        assert!(wallet.as_object_mut().unwrap().remove("expired").is_some());
    }
    let old: crate::ledger::snapshot::LedgerSnapshot = serde_json::from_value(old).unwrap();
    let journal = std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default());
    let restored =
        crate::ledger::Ledger::restore_from(LedgerConfig::default(), journal, Some(&old), Vec::new())
            .unwrap();
    assert_eq!(
        post_late(&restored, pool, key, dec!(2), "2027-01-10T00:59:00Z"),
        dec!(7),
        "nothing to take back"
    );
}

#[test]
fn a_write_off_is_taken_back_for_31_days_only() {
    // Proves the memory's bound: a debit posted more than 31 days after
    // the expiry it settled before is charged to live credit.
    let (ledger, journal, pool, key) = pool_past_a_purchase_expiry("2027-01-10T00:10:00Z");
    ledger.tick(at("2027-02-10T01:00:01Z"));
    assert_eq!(post_late(&ledger, pool, key, dec!(2), "2027-01-10T00:59:00Z"), dec!(7));
    assert!(entries(&journal).iter().all(|e| !matches!(e.kind, EntryKind::WriteOffReversed { .. })));
    assert_verified(&ledger, &journal);
}

#[test]
fn a_wallet_in_deficit_repays_it_from_the_taken_back_credit_first() {
    // Proves the take-back in a wallet with a deficit: like any credit it
    // repays the deficit first, the debit records the rest as overrun, and
    // the balance is what it would have been had the debit been in time.
    let (ledger, journal, pool, key) = pool_past_a_purchase_expiry("2027-01-10T00:10:00Z");
    // Spend the year's 9 and 1 more: a deficit of 1.
    let hold = ledger.hold(pool, request(), dec!(9), ctx(key), at("2027-01-10T01:01:00Z")).unwrap();
    hold.settle(dec!(10), details(), at("2027-01-10T01:01:00Z")).unwrap();
    assert_eq!(ledger.balance(pool, at("2027-01-10T01:01:00Z")).unwrap().balance, dec!(-1));
    // 2 settled before the expiry: the expired purchase paid them then.
    assert_eq!(post_late(&ledger, pool, key, dec!(2), "2027-01-10T00:59:00Z"), dec!(-1));
    let debit = entries(&journal).into_iter().last().unwrap();
    let EntryKind::Debit(debit) = debit.kind else { panic!("the debit comes last") };
    assert_eq!(
        debit.overrun,
        dec!(1),
        "the taken-back 2 repaid the deficit of 1: the debit overran by as much"
    );
    assert_verified(&ledger, &journal);
}

#[test]
fn a_posting_cut_short_between_the_take_back_and_its_debit_takes_it_back_again() {
    // Proves a treasurer that recorded the take-back but not its debit
    // (it stopped between the two) leaves the next one able to post the
    // debit from the expired credit: the recreated lot expires again and
    // is remembered as live from the original's start. The debit needs
    // the whole write-off, so only the recreated lot can pay it.
    let (ledger, journal, pool, key) = pool_past_a_purchase_expiry("2027-01-10T00:10:00Z");
    let request = request();
    let settled = at("2027-01-10T00:59:00Z");
    let post = |ledger: &crate::ledger::Ledger| {
        ledger.post_debit(pool, request, key, None, dec!(5), dec!(5), details(), settled, settled)
    };
    assert_eq!(post(&ledger).unwrap().balance_after, dec!(9));
    let mut records = journal.records();
    let last = records.pop().unwrap();
    assert!(
        matches!(&last.body, crate::ledger::journal::RecordBody::Entry(e) if matches!(e.kind, EntryKind::Debit(_)))
    );
    let next_journal = std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default());
    let next =
        crate::ledger::Ledger::restore(LedgerConfig::default(), next_journal.clone(), records).unwrap();
    next.tick(at("2027-01-10T01:00:10Z"));
    assert_eq!(next.balance(pool, at("2027-01-10T01:00:10Z")).unwrap().balance, dec!(9), "written off again");
    assert_eq!(post(&next).unwrap().balance_after, dec!(9), "the expired credit paid after all");
}

#[test]
fn a_late_debit_settled_before_a_lot_existed_takes_nothing_back() {
    // Proves the take-back is bounded by when the lot was live: a debit
    // settled before the purchase was made is charged to the lasting credit.
    let (ledger, journal, pool, key) = pool_past_a_purchase_expiry("2027-01-10T00:30:00Z");
    assert_eq!(post_late(&ledger, pool, key, dec!(2), "2027-01-10T00:20:00Z"), dec!(7));
    assert!(entries(&journal).iter().all(|e| !matches!(e.kind, EntryKind::WriteOffReversed { .. })));
    assert_verified(&ledger, &journal);
}

#[test]
fn a_call_held_before_its_credit_expires_is_paid_by_that_credit() {
    // Proves a call held just before its credit expired (a Lite month's end, the contract
    // term's) settles on that credit: the write-off gives back what the call cost. Before, the
    // whole lot was written off held part and all, and the call was paid again from the next
    // month's allowance, or left the pool in deficit.
    let tz = Tz::UTC;
    let (ledger, journal) = ledger();
    let created = at("2028-01-15T12:00:00Z");
    let org = org(&ledger, tz, Some(term("2027-02-01", 1, dec!(10), 0, dec!(0))), created);
    let lite_user = user(&ledger, org, Plan::Lite, dec!(10), created);
    let pro_user = user(&ledger, org, Plan::Pro, dec!(0), created);
    let lite_key = key(&ledger, org, Owner::User(lite_user), Limits::NONE, created);
    let pro_key = key(&ledger, org, Owner::User(pro_user), Limits::NONE, created);
    let (lite, pool) = (WalletId::Lite(lite_user), WalletId::Pool(org));
    spend(&ledger, lite, lite_key, dec!(8), created);
    spend(&ledger, pool, pro_key, dec!(6), created);
    let before = at("2028-01-31T23:59:50Z");
    let lite_hold = ledger.hold(lite, request(), dec!(2), ctx(lite_key), before).unwrap();
    let pool_hold = ledger.hold(pool, request(), dec!(4), ctx(pro_key), before).unwrap();
    let after = at("2028-02-01T00:00:10Z");
    // The term ended with the month: no more credit for the pool.
    assert_eq!(ledger.balance(pool, after).unwrap().balance, dec!(0));
    lite_hold.settle(dec!(1.5), details(), after).unwrap();
    pool_hold.settle(dec!(3), details(), after).unwrap();
    let lite_view = ledger.balance(lite, after).unwrap();
    assert_eq!(lite_view.balance, dec!(10), "February's allowance is whole");
    assert_eq!(lite_view.totals.written_off, dec!(0.5), "January wrote off what the call left");
    let pool_view = ledger.balance(pool, after).unwrap();
    assert_eq!(pool_view.balance, dec!(0), "no deficit: the expired term paid its own call");
    assert_eq!(pool_view.totals.written_off, dec!(1));
    assert_verified(&ledger, &journal);
}

#[test]
fn a_call_held_before_an_upgrade_settles_on_the_lite_credit_it_was_held_from() {
    // Proves a Lite call still open when its user moves to Pro is paid from the written-off
    // Lite remainder, not left as a deficit that the user's next Lite allowance would repay.
    let (ledger, journal) = ledger();
    let now = at("2027-05-10T00:00:00Z");
    let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
    let user = user(&ledger, org, Plan::Lite, dec!(50), now);
    let key = key(&ledger, org, Owner::User(user), Limits::NONE, now);
    let lite = WalletId::Lite(user);
    let hold = ledger.hold(lite, request(), dec!(20), ctx(key), now).unwrap();
    let later = now + TimeDelta::seconds(5);
    // One more taken in the very instant of the upgrade, just before it.
    let at_once = ledger.hold(lite, request(), dec!(10), ctx(key), later).unwrap();
    ledger.set_user_plan(org, user, Plan::Pro, later).unwrap();
    hold.settle(dec!(15), details(), later + TimeDelta::seconds(5)).unwrap();
    at_once.settle(dec!(5), details(), later + TimeDelta::seconds(5)).unwrap();
    let view = ledger.balance(lite, later + TimeDelta::seconds(5)).unwrap();
    assert_eq!((view.balance, view.totals.written_off), (dec!(0), dec!(30)));
    assert_eq!(ledger.balance(WalletId::Pool(org), later).unwrap().balance, dec!(100));
    assert_verified(&ledger, &journal);
}

#[test]
fn holds_open_at_midnight_count_against_the_new_day_until_they_settle() {
    // Proves a daily cap is not passed twice over at midnight: holds taken just before it stay
    // counted after it, so new holds see them; each call counts in the day it settles in.
    let (ledger, journal, _, pool, key) = pool_with_a_key(
        "2027-03-10T12:00:00Z",
        dec!(1000),
        Limits { daily: Some(dec!(100)), ..Limits::NONE },
    );
    let before = at("2027-03-10T23:59:50Z");
    let open = ledger.hold(pool, request(), dec!(100), ctx(key), before).unwrap();
    let after = at("2027-03-11T00:00:01Z");
    let refused = ledger.hold(pool, request(), dec!(1), ctx(key), after).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "yesterday's open call counts today");
    open.settle(dec!(60), details(), after).unwrap();
    let refused = ledger.hold(pool, request(), dec!(41), ctx(key), after).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "its 60 count in the day it settled in");
    ledger.hold(pool, request(), dec!(40), ctx(key), after).unwrap().release(after);
    assert_verified(&ledger, &journal);
}

#[test]
fn calls_in_flight_across_a_plan_change_count_against_the_caps_that_move() {
    // Proves a user's and a key's counters that move with a plan change count the calls
    // in flight at their holds: a Lite key capped at 10 a day with 6 in flight could
    // take 6 more on the pool after an upgrade (the moved counters forgot the 6, and
    // its settle on the Lite wallet counted nowhere), 12 against 10.
    let now = at("2027-05-10T12:00:00Z");
    for capped in ["key", "user"] {
        let (ledger, journal) = ledger();
        let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), now);
        let lee = user(&ledger, org, Plan::Lite, dec!(50), now);
        let daily = Limits { daily: Some(dec!(10)), ..Limits::NONE };
        let (key_limits, user_limits) =
            if capped == "key" { (daily, Limits::NONE) } else { (Limits::NONE, daily) };
        ledger.set_user_limits(org, lee, user_limits).unwrap();
        let key = key(&ledger, org, Owner::User(lee), key_limits, now);
        let in_flight = ledger.hold(WalletId::Lite(lee), request(), dec!(6), ctx(key), now).unwrap();
        ledger.set_user_plan(org, lee, Plan::Pro, now).unwrap();
        let pool = WalletId::Pool(org);
        let refused = ledger.hold(pool, request(), dec!(6), ctx(key), now).unwrap_err();
        assert_eq!(refused.code(), "spending_limit", "{capped}: the 6 in flight still count");
        in_flight.settle(dec!(2), details(), now).unwrap();
        // Counted at its hold until the day ends: 4 more fit, 5 do not.
        assert_eq!(
            ledger.hold(pool, request(), dec!(5), ctx(key), now).unwrap_err().code(),
            "spending_limit"
        );
        ledger
            .hold(pool, request(), dec!(4), ctx(key), now)
            .unwrap()
            .settle(dec!(4), details(), now)
            .unwrap();
        let tomorrow = at("2027-05-11T12:00:00Z");
        ledger.hold(pool, request(), dec!(10), ctx(key), tomorrow).unwrap().release(tomorrow);
        assert_verified(&ledger, &journal);
    }
}

#[test]
fn a_key_holds_a_bounded_scope_and_a_revoked_one_keeps_none_and_takes_no_change() {
    // Proves what one key may keep in memory for good is bounded: its scope
    // holds at most 4 KiB, a revoked key drops it and takes no later change,
    // and a change that changes nothing writes no record. (An org token could
    // create, scope at 36 KB and revoke keys, 200 a minute, and keep every one.)
    use crate::ledger::entity::KeyScope;
    let (ledger, journal, org, _, key) = pool_with_a_key("2027-03-10T12:00:00Z", dec!(10), Limits::NONE);
    let long = KeyScope { routes: (0..64).map(|n| format!("/v1/{n:0>100}")).collect(), models: Vec::new() };
    let refused = ledger.set_key_scope(org, key, long).unwrap_err();
    assert!(matches!(refused, LedgerError::TooLong { field: "scope", .. }), "{refused:?}");
    let scope = KeyScope { routes: vec!["/v1".into()], models: vec!["gpt-4o-mini".into()] };
    ledger.set_key_scope(org, key, scope.clone()).unwrap();
    let written = journal.records().len();
    assert_eq!(ledger.set_key_scope(org, key, scope).unwrap().scope.models, ["gpt-4o-mini"]);
    assert_eq!(journal.records().len(), written, "the same scope again writes nothing");
    let revoked = ledger.revoke_key(org, key).unwrap();
    assert!(revoked.revoked && revoked.scope == KeyScope::default(), "{revoked:?}");
    let written = journal.records().len();
    assert!(ledger.revoke_key(org, key).unwrap().revoked, "a repeated revocation answers the key");
    let changed = ledger.set_key_limits(org, key, Limits { daily: Some(dec!(1)), ..Limits::NONE });
    assert_eq!(changed.unwrap_err(), LedgerError::KeyRevoked { key });
    let rescoped =
        ledger.set_key_scope(org, key, KeyScope { routes: vec!["/v2".into()], models: Vec::new() });
    assert_eq!(rescoped.unwrap_err(), LedgerError::KeyRevoked { key });
    let same = ledger.set_key_scope(org, key, KeyScope::default()).unwrap_err();
    assert_eq!(same, LedgerError::KeyRevoked { key }, "not even an unchanged one");
    assert_eq!(journal.records().len(), written, "nothing written for a revoked key");
    assert_verified(&ledger, &journal);
}

#[test]
fn a_call_held_before_midnight_whose_user_changes_plan_after_it_counts_in_the_new_day() {
    // Proves the counters that move are brought into the current periods before they
    // count the calls in flight: held at 23:59:50, moved at 00:00:10, the 6 count
    // against the new day (as a hold still open at midnight does), so 6 more do not fit
    // a cap of 10. Before, the move forgot them and 16 could settle on the new day.
    for (from, to) in [(Plan::Lite, Plan::Pro), (Plan::Pro, Plan::Lite)] {
        let (ledger, journal) = ledger();
        let before = at("2027-05-10T23:59:50Z");
        let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), before);
        let lee = user(&ledger, org, from, dec!(50), before);
        let daily = Limits { daily: Some(dec!(10)), ..Limits::NONE };
        let key = key(&ledger, org, Owner::User(lee), daily, before);
        let wallet = |plan| if plan == Plan::Lite { WalletId::Lite(lee) } else { WalletId::Pool(org) };
        let in_flight = ledger.hold(wallet(from), request(), dec!(6), ctx(key), before).unwrap();
        let after = at("2027-05-11T00:00:10Z");
        ledger.set_user_plan(org, lee, to, after).unwrap();
        let refused = ledger.hold(wallet(to), request(), dec!(6), ctx(key), after).unwrap_err();
        assert_eq!(refused.code(), "spending_limit", "{from:?} -> {to:?}: the 6 held before midnight count");
        // 4 more fit the cap (a Lite wallet just downgraded to may have no credit yet).
        match ledger.hold(wallet(to), request(), dec!(4), ctx(key), after) {
            Ok(hold) => {
                hold.release(after);
            }
            Err(refused) => assert_eq!(refused.code(), "insufficient_funds", "{from:?} -> {to:?}"),
        }
        in_flight.settle(dec!(6), details(), after).unwrap();
        assert_verified(&ledger, &journal);
    }
}

#[test]
fn a_limit_change_keeps_the_open_holds_counted_so_no_cap_is_passed() {
    // Proves changes to a key (its scope, its caps) keep its open holds
    // counted: raised to 150 with 80 in flight, it takes 70 more, not 80, and
    // lowered to 50 with 90 in flight it takes nothing, so the day's debits
    // stay within the cap in force. (Before, a cap change forgot the open
    // holds: lowered from 100 to 50 with 90 in flight, it took another 50,
    // and the day's spend was 140 against 50.)
    let (ledger, journal, org, pool, key) = pool_with_a_key(
        "2027-03-10T12:00:00Z",
        dec!(1000),
        Limits { daily: Some(dec!(100)), ..Limits::NONE },
    );
    let daily = |cap| Limits { daily: Some(cap), ..Limits::NONE };
    let now = at("2027-03-10T12:00:00Z");
    let first = ledger.hold(pool, request(), dec!(80), ctx(key), now).unwrap();
    let scope = crate::ledger::entity::KeyScope { routes: vec!["/v1".into()], models: Vec::new() };
    ledger.set_key_scope(org, key, scope).unwrap();
    let refused = ledger.hold(pool, request(), dec!(80), ctx(key), now).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "a scope change keeps the open hold counted");
    ledger.set_key_limits(org, key, daily(dec!(150))).unwrap();
    let refused = ledger.hold(pool, request(), dec!(80), ctx(key), now).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "the open 80 counts against the raised cap");
    let second = ledger.hold(pool, request(), dec!(70), ctx(key), now).unwrap();
    first.settle(dec!(80), details(), now).unwrap();
    let refused = ledger.hold(pool, request(), dec!(1), ctx(key), now).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "80 settled and 70 still held fill the 150");
    second.release(now);
    ledger.hold(pool, request(), dec!(70), ctx(key), now).unwrap().release(now);

    // The next day: 90 in flight, the cap lowered to 50.
    let tomorrow = at("2027-03-11T12:00:00Z");
    let long = ledger.hold(pool, request(), dec!(90), ctx(key), tomorrow).unwrap();
    ledger.set_key_limits(org, key, daily(dec!(50))).unwrap();
    let refused = ledger.hold(pool, request(), dec!(50), ctx(key), tomorrow).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "the open 90 is over the lowered cap already");
    long.settle(dec!(90), details(), tomorrow).unwrap();
    let refused = ledger.hold(pool, request(), dec!(1), ctx(key), tomorrow).unwrap_err();
    assert_eq!(refused.code(), "spending_limit");

    // The same for a user's cap.
    let owner = user(&ledger, org, Plan::Pro, dec!(0), tomorrow);
    ledger.set_user_limits(org, owner, daily(dec!(100))).unwrap();
    let users_key = crate::ledger::testkit::key(&ledger, org, Owner::User(owner), Limits::NONE, tomorrow);
    let long = ledger.hold(pool, request(), dec!(90), ctx(users_key), tomorrow).unwrap();
    ledger.set_user_limits(org, owner, daily(dec!(50))).unwrap();
    let refused = ledger.hold(pool, request(), dec!(50), ctx(users_key), tomorrow).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "the user's open 90 still counts");
    long.settle(dec!(90), details(), tomorrow).unwrap();
    assert_verified(&ledger, &journal);
}

#[test]
fn a_cap_changed_on_one_key_leaves_the_open_holds_counted_against_every_other_cap() {
    // Proves a limit change forgets the open holds of that subject only: a key
    // capped at 100 with 80 held still refuses another 80 after another key's
    // cap changed, and a user's cap likewise. (Before, any cap change in the
    // wallet forgot every counter's open holds, and each cap could then be
    // passed by what was in flight.) A key capped while holds it made were
    // open counts from then, and those holds take nothing back from it.
    let daily = |cap| Limits { daily: Some(cap), ..Limits::NONE };
    let (ledger, journal, org, pool, capped) =
        pool_with_a_key("2027-03-10T12:00:00Z", dec!(1000), daily(dec!(100)));
    let now = at("2027-03-10T12:00:00Z");
    let capped_user = user(&ledger, org, Plan::Pro, dec!(0), now);
    ledger.set_user_limits(org, capped_user, daily(dec!(100))).unwrap();
    let users_key = key(&ledger, org, Owner::User(capped_user), Limits::NONE, now);
    let other_user = user(&ledger, org, Plan::Pro, dec!(0), now);
    let other = key(&ledger, org, Owner::User(other_user), daily(dec!(500)), now);
    let uncapped = key(&ledger, org, Owner::User(other_user), Limits::NONE, now);
    let in_flight = [
        ledger.hold(pool, request(), dec!(80), ctx(capped), now).unwrap(),
        ledger.hold(pool, request(), dec!(80), ctx(users_key), now).unwrap(),
    ];
    let early = ledger.hold(pool, request(), dec!(50), ctx(uncapped), now).unwrap();
    ledger.set_key_limits(org, other, daily(dec!(400))).unwrap();
    ledger.set_user_limits(org, other_user, daily(dec!(900))).unwrap();
    for key in [capped, users_key] {
        let refused = ledger.hold(pool, request(), dec!(80), ctx(key), now).unwrap_err();
        assert_eq!(refused.code(), "spending_limit", "key {key}: 80 still held against its 100");
    }
    // Capped now, with 50 of its own in flight: the cap counts from here.
    ledger.set_key_limits(org, uncapped, daily(dec!(100))).unwrap();
    let late = ledger.hold(pool, request(), dec!(80), ctx(uncapped), now).unwrap();
    early.settle(dec!(50), details(), now).unwrap();
    let refused = ledger.hold(pool, request(), dec!(30), ctx(uncapped), now).unwrap_err();
    assert_eq!(refused.code(), "spending_limit", "the earlier hold took back none of the 80 held");
    late.release(now);
    for hold in in_flight {
        hold.settle(dec!(80), details(), now).unwrap();
    }
    ledger.hold(pool, request(), dec!(20), ctx(capped), now).unwrap().release(now);
    assert_verified(&ledger, &journal);
}

#[test]
fn a_caps_version_is_its_records_number_on_every_ledger_that_reads_it() {
    // Proves the version cluster mode orders caps by: the number of the record
    // that set them, rising with every change, the same on a ledger rebuilt from
    // the records, and no older on one restored from a checkpoint.
    let daily = |cap| Limits { daily: Some(cap), ..Limits::NONE };
    let (ledger, journal, org, pool, key) =
        pool_with_a_key("2027-03-10T12:00:00Z", dec!(1000), daily(dec!(10)));
    let now = at("2027-03-10T12:00:00Z");
    let versions = |ledger: &crate::ledger::Ledger| -> Vec<(Decimal, u64)> {
        ledger.period_caps(pool, ctx(key), now).iter().map(|cap| (cap.cap, cap.version)).collect()
    };
    let key_record = |journal: &crate::ledger::journal::MemoryJournal| {
        let records = journal.records();
        let last = records.iter().rev().find(|record| {
            matches!(&record.body, crate::ledger::journal::RecordBody::Key(version) if version.id == key)
        });
        last.map(|record| record.seq).unwrap()
    };
    let first = versions(&ledger);
    assert_eq!(first, [(dec!(10), key_record(&journal))]);
    ledger.set_key_limits(org, key, daily(dec!(4))).unwrap();
    let second = versions(&ledger);
    assert_eq!(second, [(dec!(4), key_record(&journal))]);
    assert!(second[0].1 > first[0].1, "{first:?} then {second:?}");

    let replayed = crate::ledger::Ledger::restore(
        LedgerConfig::default(),
        std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default()),
        journal.records(),
    )
    .unwrap();
    assert_eq!(versions(&replayed), second, "a replay reads the same version");
    let checkpoint = replayed.snapshot(journal.records().iter().map(|record| record.seq).max().unwrap());
    let from_checkpoint = crate::ledger::Ledger::restore_from(
        LedgerConfig::default(),
        std::sync::Arc::new(crate::ledger::journal::MemoryJournal::default()),
        Some(&checkpoint),
        Vec::new(),
    )
    .unwrap();
    let restored = versions(&from_checkpoint);
    assert_eq!(restored[0].0, dec!(4));
    assert!(restored[0].1 >= second[0].1, "a checkpoint's caps are no older: {restored:?}");
}
