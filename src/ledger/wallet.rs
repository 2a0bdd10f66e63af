//! One wallet's state and the balance changes it can make.
//!
//! A wallet is self-contained: it carries a copy of its org's calendar (zone
//! and contract terms) and, for Lite wallets, the allowance schedule, so that
//! bringing it up to `now` reads nothing but its own state under its own lock.
//!
//! Balance accounting: `balance = sum(lot remainders) - deficit`, where the
//! deficit is the part of debits no lot could cover (a settle above its hold
//! on an exhausted wallet). A new lot pays the deficit back first. Alongside,
//! `granted`, `debited` and `written_off` are summed from the entries as they
//! are made, and `balance == granted - debited - written_off` is asserted on
//! every entry (in debug builds) and checked by [`crate::ledger::Ledger::verify`].

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use parking_lot::Mutex;
use rust_decimal::Decimal;
use smallvec::smallvec;

use crate::ledger::calendar::{self, YearMonth};
use crate::ledger::contract::OrgCalendar;
use crate::ledger::entry::{EntryKind, LedgerEntry, WriteOffReason};
use crate::ledger::hold::{OpenHolds, RecentSettlements};
use crate::ledger::ids::{EntryId, LotId, OrgId, Owner, RequestId, WalletId};
use crate::ledger::journal::{Committer, Record, RecordBody};
use crate::ledger::limit::PeriodEnds;
use crate::ledger::lot::{ExpiredLot, Lot, LotOrigin, LotTouch, LotTouches, Lots};
use crate::ledger::payer::{MovedOwner, Payers};
use crate::ledger::refusal::WalletView;
use crate::ledger::snapshot::WalletSnapshot;
use crate::ledger::Shared;

/// A wallet's lock, and the ledger parts its operations need. Hold tokens
/// keep an `Arc` to it so a settle goes straight to its wallet.
#[derive(Debug)]
pub(crate) struct WalletCell {
    pub shared: Arc<Shared>,
    pub state: Mutex<WalletState>,
}

/// A Lite wallet's allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LiteSchedule {
    /// Granted on each 1st.
    pub allowance: Decimal,
    /// First month granted in full; `None` while the user is on Pro.
    pub allowance_from: Option<YearMonth>,
}

/// Sums of entries by side of the balance identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Grants, purchases and adjustments (signed).
    pub granted: Decimal,
    /// Debits.
    pub debited: Decimal,
    /// Write-offs.
    pub written_off: Decimal,
}

impl Totals {
    /// `granted - debited - written_off`.
    pub fn balance(&self) -> Decimal {
        self.granted - self.debited - self.written_off
    }

    /// Adds one entry's amount to the side its kind belongs to.
    pub fn count(&mut self, kind: &EntryKind, amount: Decimal) {
        match kind {
            EntryKind::Debit(_) => self.debited -= amount,
            EntryKind::WriteOff { .. } | EntryKind::WriteOffReversed { .. } => self.written_off -= amount,
            EntryKind::Grant { .. } | EntryKind::Purchase { .. } | EntryKind::Adjustment { .. } => {
                self.granted += amount
            }
        }
    }
}

/// A recorded entry that does not fit the state it is replayed onto.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("entry {entry} on {wallet}: {problem}")]
pub struct ReplayMismatch {
    /// The entry.
    pub entry: EntryId,
    /// Its wallet.
    pub wallet: WalletId,
    /// What did not fit.
    pub problem: String,
}

#[derive(Debug)]
pub(crate) struct WalletState {
    pub id: WalletId,
    pub org: OrgId,
    pub calendar: OrgCalendar,
    pub lite: Option<LiteSchedule>,
    pub lots: Lots,
    /// Lots written off at their expiry in the last [`ExpiredLot::MEMORY`],
    /// in the order they expired.
    expired: Vec<ExpiredLot>,
    pub deficit: Decimal,
    pub totals: Totals,
    /// Sum of open holds.
    pub held: Decimal,
    /// The latest `now` seen; time never runs backwards inside a wallet.
    pub clock: DateTime<Utc>,
    /// Nothing is due before this instant (expiry, grant, hold TTL), so
    /// most operations skip the catch-up work entirely.
    next_event_at: DateTime<Utc>,
    /// Contract years whose lots were granted (pool wallets).
    granted_years: Vec<(u32, u32)>,
    /// Last month whose allowance (in full or pro-rated) was credited
    /// (Lite wallets): set by the credit alone, so a replay rebuilds it.
    lite_granted_through: Option<YearMonth>,
    pub holds: OpenHolds,
    /// Holds voided by their TTL since this process built the wallet.
    pub holds_voided: u64,
    pub settled: RecentSettlements,
    pub payers: Payers,
    /// Period ends for limits, valid until the day ends.
    period_cache: Option<PeriodEnds>,
}

impl WalletState {
    pub fn new(id: WalletId, org: OrgId, calendar: OrgCalendar, lite: Option<LiteSchedule>) -> Self {
        WalletState {
            id,
            org,
            calendar,
            lite,
            lots: Lots::default(),
            expired: Vec::new(),
            deficit: Decimal::ZERO,
            totals: Totals::default(),
            held: Decimal::ZERO,
            clock: DateTime::<Utc>::MIN_UTC,
            next_event_at: DateTime::<Utc>::MIN_UTC,
            granted_years: Vec::new(),
            lite_granted_through: None,
            holds: OpenHolds::default(),
            holds_voided: 0,
            settled: RecentSettlements::default(),
            payers: Payers::default(),
            period_cache: None,
        }
    }

    pub fn balance(&self) -> Decimal {
        self.lots.total() - self.deficit
    }

    pub fn available(&self) -> Decimal {
        self.balance() - self.held
    }

    /// What a refused caller is told about this wallet.
    pub fn view(&self) -> WalletView {
        WalletView {
            wallet: self.id,
            kind: self.id.kind(),
            balance: self.balance(),
            available: self.available(),
            resets_at: self.resets_at(),
        }
    }

    /// For a Lite wallet on an allowance, the next 1st.
    pub fn resets_at(&self) -> Option<DateTime<Utc>> {
        let lite = self.lite?;
        let from = lite.allowance_from?;
        let current = YearMonth::containing(self.calendar.tz, self.clock);
        Some(current.next().max(from).start(self.calendar.tz))
    }

    /// Replaces the org calendar (renewal, zone change); forces the next
    /// operation to look for newly due grants.
    pub fn set_calendar(&mut self, calendar: OrgCalendar) {
        self.calendar = calendar;
        self.period_cache = None;
        self.next_event_at = DateTime::<Utc>::MIN_UTC;
    }

    /// Replaces the Lite schedule (allowance change, plan change).
    pub fn set_lite(&mut self, lite: LiteSchedule) {
        self.lite = Some(lite);
        self.next_event_at = DateTime::<Utc>::MIN_UTC;
    }

    /// Brings the wallet up to `now`: writes off expired lots, voids holds
    /// past their TTL and grants allocations that became effective. Returns
    /// the wallet's clock, which is `now` unless `now` is in its past.
    pub fn advance(&mut self, now: DateTime<Utc>, committer: &Committer) -> DateTime<Utc> {
        if committer.following() {
            // A follower learns grants and write-offs from the records it
            // replays; making its own would fork the books.
            return now.max(self.clock);
        }
        let now = now.max(self.clock);
        self.clock = now;
        if now < self.next_event_at {
            return now;
        }
        self.expire_lots(now, committer);
        self.void_expired_holds(now);
        match self.id {
            WalletId::Pool(_) => self.grant_contract_years(now, committer),
            WalletId::Lite(_) => self.grant_lite_month(now, committer),
        }
        self.next_event_at = self.next_event(now);
        now
    }

    fn expire_lots(&mut self, now: DateTime<Utc>, committer: &Committer) {
        while let Some(lot) = self.lots.pop_expired(now) {
            if lot.remaining.is_zero() {
                continue;
            }
            self.expired.push(ExpiredLot::written_off(&lot));
            self.totals.written_off += lot.remaining;
            let touch = LotTouch { lot: lot.id, amount: lot.remaining };
            let id = EntryId(committer.next_seq());
            let kind = EntryKind::WriteOff { reason: WriteOffReason::Expired };
            self.emit(committer, id, now, kind, -lot.remaining, smallvec![touch]);
        }
        self.forget_old_expired_lots();
    }

    fn forget_old_expired_lots(&mut self) {
        let horizon = self.clock.checked_sub_signed(ExpiredLot::MEMORY).unwrap_or(DateTime::<Utc>::MIN_UTC);
        self.expired.retain(|lot| lot.expires_at > horizon && !lot.written_off.is_zero());
    }

    /// Takes back, from the write-offs of lots that expired after
    /// `settled_at` but were live then, and no longer ago than
    /// [`ExpiredLot::MEMORY`], what a debit of `cost` settled at
    /// `settled_at` would have drawn from them (soonest expiry first, as a
    /// draw goes). Each part becomes a lot again, already expired, so the
    /// debit drawn right after takes it before any live credit (after a
    /// deficit, which any new credit repays first). A settle recorded in
    /// time finds nothing to take back.
    pub fn take_back_write_offs(
        &mut self,
        committer: &Committer,
        now: DateTime<Utc>,
        settled_at: DateTime<Utc>,
        request_id: RequestId,
        cost: Decimal,
    ) {
        // Whenever the memory was last pruned, the same write-offs qualify.
        let horizon = now.checked_sub_signed(ExpiredLot::MEMORY).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut left = cost;
        for at in 0..self.expired.len() {
            let expired = &mut self.expired[at];
            if left.is_zero() {
                break;
            }
            if expired.written_off.is_zero()
                || expired.expires_at <= horizon
                || !expired.was_live_at(settled_at)
            {
                continue;
            }
            let give = left.min(expired.written_off);
            expired.written_off -= give;
            left -= give;
            let (expired_lot, origin, effective_at, expires_at) =
                (expired.lot, expired.origin, expired.effective_at, expired.expires_at);
            let kind =
                EntryKind::WriteOffReversed { request_id, expired_lot, origin, effective_at, expires_at };
            let id = EntryId(committer.next_seq());
            self.add_lot(id, &kind, give, effective_at);
            self.totals.written_off -= give;
            self.emit(committer, id, now, kind, give, smallvec![LotTouch { lot: LotId(id.0), amount: give }]);
        }
    }

    /// Grants the lots of every contract year in force at `now` not yet
    /// granted. Years that began and ended between two operations are
    /// skipped: nobody could have spent them, and granting only to write
    /// off would fill the ledger with noise.
    fn grant_contract_years(&mut self, now: DateTime<Utc>, committer: &Committer) {
        let calendar = self.calendar.clone();
        for (year, term) in calendar.years() {
            let key = (year.term, year.year);
            if year.start > now || year.end <= now || self.granted_years.contains(&key) {
                continue;
            }
            self.granted_years.push(key);
            let platform = LotOrigin::Platform { term: year.term, year: year.year };
            let seat = LotOrigin::Seat { term: year.term, year: year.year };
            // Validated at contract creation, so the product fits.
            let seats = term.seat_allocation().unwrap_or(Decimal::ZERO);
            for (origin, amount) in [(platform, term.platform_allocation_per_year), (seat, seats)] {
                if amount > Decimal::ZERO {
                    let kind = EntryKind::Grant { origin, effective_at: year.start, expires_at: year.end };
                    self.credit(committer, now, kind, amount);
                }
            }
        }
    }

    /// Grants this month's allowance if it is due and not yet granted.
    fn grant_lite_month(&mut self, now: DateTime<Utc>, committer: &Committer) {
        let Some(LiteSchedule { allowance, allowance_from: Some(from) }) = self.lite else {
            return;
        };
        let month = YearMonth::containing(self.calendar.tz, now);
        if month < from || self.lite_granted_through.is_some_and(|done| done >= month) {
            return;
        }
        // The credit marks the month granted (`add_lot`), as a replay of
        // its entry does; a grant of 0 writes none and marks nothing, so a
        // restart knows what this run knew (later allowances start from
        // `allowance_from`, never this month).
        if allowance > Decimal::ZERO {
            let tz = self.calendar.tz;
            let kind = EntryKind::Grant {
                origin: LotOrigin::LiteMonthly { month },
                effective_at: month.start(tz),
                expires_at: month.end(tz),
            };
            self.credit(committer, now, kind, allowance);
        }
    }

    /// Detaches an owner and its keys to move them to another wallet, their
    /// counters brought into the periods of the wallet's time first.
    pub(crate) fn take_owner(&mut self, owner: Owner) -> Option<MovedOwner> {
        // A wallet never brought up to a time holds nothing to count.
        let ends = (self.clock != DateTime::<Utc>::MIN_UTC).then(|| self.period_ends(self.clock));
        self.payers.take_owner(owner, ends.as_ref())
    }

    /// Grants a pro-rated allowance for the current month (downgrade),
    /// unless this month's was granted already: one allowance a month, so a
    /// user moved Lite -> Pro -> Lite (or Pro -> Lite twice) within a month
    /// is not granted it again.
    pub fn grant_prorated(&mut self, now: DateTime<Utc>, amount: Decimal, committer: &Committer) {
        let tz = self.calendar.tz;
        let month = YearMonth::containing(tz, now);
        if self.lite_granted_through.is_some_and(|done| done >= month) {
            return;
        }
        // Marked by the credit, as in `grant_lite_month`.
        if amount > Decimal::ZERO {
            let kind = EntryKind::Grant {
                origin: LotOrigin::LiteMonthly { month },
                effective_at: now,
                expires_at: month.end(tz),
            };
            self.credit(committer, now, kind, amount);
        }
        self.next_event_at = DateTime::<Utc>::MIN_UTC;
    }

    /// The soonest instant at which `advance` has work to do.
    fn next_event(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let expiry = self.lots.next_expiry().unwrap_or(DateTime::<Utc>::MAX_UTC);
        let hold = self.holds.next_expiry();
        let grant = match self.id {
            WalletId::Pool(_) => self
                .calendar
                .years()
                .map(|(year, _)| year.start)
                .filter(|start| *start > now)
                .min()
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            WalletId::Lite(_) => match self.lite.and_then(|lite| lite.allowance_from) {
                Some(from) => {
                    let next = YearMonth::containing(self.calendar.tz, now).next();
                    next.max(from).start(self.calendar.tz)
                }
                None => DateTime::<Utc>::MAX_UTC,
            },
        };
        expiry.min(hold).min(grant)
    }

    /// Creates a lot from a crediting entry (grant, purchase, positive
    /// adjustment) and records it. The lot first pays back any deficit.
    pub fn credit(
        &mut self,
        committer: &Committer,
        now: DateTime<Utc>,
        kind: EntryKind,
        amount: Decimal,
    ) -> EntryId {
        let id = EntryId(committer.next_seq());
        let effective_at = match &kind {
            EntryKind::Grant { effective_at, .. } => *effective_at,
            _ => now,
        };
        self.add_lot(id, &kind, amount, effective_at);
        self.totals.granted += amount;
        let touch = LotTouch { lot: LotId(id.0), amount };
        self.emit(committer, id, now, kind, amount, smallvec![touch]);
        id
    }

    fn add_lot(&mut self, id: EntryId, kind: &EntryKind, amount: Decimal, effective_at: DateTime<Utc>) {
        let Some((origin, expires_at)) = kind.created_lot() else {
            unreachable!("entry {id} credits a lot but creates none");
        };
        let repaid = self.deficit.min(amount);
        self.deficit -= repaid;
        // Its expiry may come before the event `advance` waits for next.
        self.next_event_at = self.next_event_at.min(expires_at);
        // A lot the deficit swallowed whole has nothing to give or expire.
        if repaid < amount {
            self.lots.insert(Lot {
                id: LotId(id.0),
                origin,
                granted: amount,
                remaining: amount - repaid,
                effective_at,
                expires_at,
            });
        }
        if let LotOrigin::Platform { term, year } | LotOrigin::Seat { term, year } = origin {
            if !self.granted_years.contains(&(term, year)) {
                self.granted_years.push((term, year));
            }
        }
        if let LotOrigin::LiteMonthly { month } = origin {
            self.lite_granted_through = self.lite_granted_through.max(Some(month));
        }
    }

    /// Takes `amount` from the lots in consumption order and records it as
    /// `kind` (a debit or negative adjustment). Whatever no lot covers becomes
    /// deficit; returns the entry id and that overrun.
    pub fn draw(
        &mut self,
        committer: &Committer,
        now: DateTime<Utc>,
        amount: Decimal,
        make_kind: impl FnOnce(Decimal) -> EntryKind,
    ) -> (EntryId, Decimal) {
        let id = EntryId(committer.next_seq());
        let mut touches = LotTouches::new();
        let overrun = self.lots.draw(amount, &mut touches);
        self.deficit += overrun;
        let kind = make_kind(overrun);
        self.totals.count(&kind, -amount);
        self.emit(committer, id, now, kind, -amount, touches);
        (id, overrun)
    }

    /// Writes off every live lot (a Lite user moving to Pro). Each is
    /// remembered as expired now, so a call held before still settles on
    /// the credit it was held from (see [`WalletState::take_back_write_offs`]).
    pub fn write_off_all(&mut self, committer: &Committer, now: DateTime<Utc>) {
        let lots = self.lots.take_all();
        self.expired.extend(
            lots.iter().filter(|lot| !lot.remaining.is_zero()).map(|lot| ExpiredLot::upgraded_away(lot, now)),
        );
        let touches: LotTouches = lots
            .iter()
            .filter(|lot| !lot.remaining.is_zero())
            .map(|lot| LotTouch { lot: lot.id, amount: lot.remaining })
            .collect();
        let total: Decimal = touches.iter().map(|touch| touch.amount).sum();
        if total.is_zero() {
            return;
        }
        self.totals.written_off += total;
        let id = EntryId(committer.next_seq());
        let kind = EntryKind::WriteOff { reason: WriteOffReason::Upgraded };
        self.emit(committer, id, now, kind, -total, touches);
    }

    /// Builds the entry for a change already applied, checks the balance
    /// identity, and journals it.
    fn emit(
        &mut self,
        committer: &Committer,
        id: EntryId,
        now: DateTime<Utc>,
        kind: EntryKind,
        amount: Decimal,
        lots: LotTouches,
    ) {
        let balance_after = self.balance();
        debug_assert_eq!(
            balance_after,
            self.totals.balance(),
            "wallet {} breaks balance == granted - debited - written_off at entry {id}",
            self.id
        );
        let entry =
            LedgerEntry { id, at: now, wallet: self.id, org: self.org, kind, amount, balance_after, lots };
        committer.append(Record { seq: id.0, body: RecordBody::Entry(entry) });
    }

    /// The ends of the day, month and contract year containing `now`.
    pub fn period_ends(&mut self, now: DateTime<Utc>) -> PeriodEnds {
        if let Some(cached) = self.period_cache {
            // The day ends first, so while it runs all three are current.
            if now < cached.day {
                return cached;
            }
        }
        let tz = self.calendar.tz;
        let ends = PeriodEnds {
            day: calendar::day_end(tz, now),
            month: YearMonth::containing(tz, now).end(tz),
            year: self.calendar.limit_year_end(now),
        };
        self.period_cache = Some(ends);
        ends
    }

    /// Records an open hold; its TTL becomes an event `advance` waits for.
    pub fn add_open_hold(
        &mut self,
        request_id: crate::ledger::ids::RequestId,
        hold: crate::ledger::hold::OpenHold,
    ) {
        if hold.orphaned {
            self.next_event_at = self.next_event_at.min(hold.expires_at);
        }
        self.holds.insert(request_id, hold);
    }

    /// A hold's token was dropped unspent: let the TTL void it.
    pub(crate) fn orphan_hold(&mut self, request_id: crate::ledger::ids::RequestId) {
        if let Some(expires_at) = self.holds.orphan(&request_id) {
            self.next_event_at = self.next_event_at.min(expires_at);
        }
    }

    /// Voids holds past their TTL; returns how many.
    pub fn void_expired_holds(&mut self, now: DateTime<Utc>) -> usize {
        let voided = self.holds.take_expired(now);
        let count = voided.len();
        self.holds_voided += count as u64;
        for hold in voided {
            self.held -= hold.amount;
            self.payers.unreserve(hold.spender(), hold.amount, hold.limits_epoch);
        }
        count
    }

    /// Applies a recorded entry while rebuilding state from the journal.
    pub fn replay(&mut self, entry: &LedgerEntry) -> Result<(), ReplayMismatch> {
        let mismatch = |problem: String| ReplayMismatch { entry: entry.id, wallet: entry.wallet, problem };
        self.clock = self.clock.max(entry.at);
        if entry.kind.created_lot().is_some() {
            let effective_at = match &entry.kind {
                EntryKind::Grant { effective_at, .. } | EntryKind::WriteOffReversed { effective_at, .. } => {
                    *effective_at
                }
                _ => entry.at,
            };
            self.add_lot(entry.id, &entry.kind, entry.amount, effective_at);
            if let EntryKind::WriteOffReversed { expired_lot, .. } = &entry.kind {
                if let Some(expired) = self.expired.iter_mut().find(|lot| lot.lot == *expired_lot) {
                    expired.written_off -= entry.amount.min(expired.written_off);
                }
            }
        } else {
            // Remembered as the live path remembers them.
            let remember = |lot: &Lot| match entry.kind {
                EntryKind::WriteOff { reason: WriteOffReason::Expired } => Some(ExpiredLot::written_off(lot)),
                EntryKind::WriteOff { reason: WriteOffReason::Upgraded } => {
                    Some(ExpiredLot::upgraded_away(lot, entry.at))
                }
                _ => None,
            };
            for touch in &entry.lots {
                let lot = self.lots.iter().find(|lot| lot.id == touch.lot);
                if let Some(expired) = lot.and_then(remember) {
                    self.expired.push(ExpiredLot { written_off: touch.amount, ..expired });
                }
                if !self.lots.take_from(touch.lot, touch.amount) {
                    return Err(mismatch(format!("lot {} cannot give {}", touch.lot, touch.amount)));
                }
            }
            if let EntryKind::Debit(debit) = &entry.kind {
                self.deficit += debit.overrun;
                let ends = self.period_ends(entry.at);
                self.payers.add(debit.spender(), -entry.amount, &ends);
            }
            if matches!(
                entry.kind,
                EntryKind::WriteOff { reason: WriteOffReason::Expired | WriteOffReason::Upgraded }
            ) {
                self.forget_old_expired_lots();
            }
        }
        self.totals.count(&entry.kind, entry.amount);
        self.next_event_at = DateTime::<Utc>::MIN_UTC;
        if self.balance() != entry.balance_after || self.totals.balance() != entry.balance_after {
            return Err(mismatch(format!(
                "balance after is {} but replay gives {} (identity {})",
                entry.balance_after,
                self.balance(),
                self.totals.balance()
            )));
        }
        Ok(())
    }

    /// The wallet's state as a checkpoint keeps it. Open holds and recent
    /// settlements are not kept: like a restart, a checkpoint voids them.
    pub fn snapshot(&self) -> WalletSnapshot {
        WalletSnapshot {
            wallet: self.id,
            org: self.org,
            clock: self.clock,
            lots: self.lots.iter().cloned().collect(),
            expired: self.expired.clone(),
            deficit: self.deficit,
            totals: self.totals,
            granted_years: self.granted_years.clone(),
            lite_granted_through: self.lite_granted_through,
            spends: self.payers.spends(),
        }
    }

    /// Puts back a checkpointed state onto a wallet whose calendar, Lite
    /// schedule and payers were installed from the checkpoint's entities.
    pub fn restore(&mut self, saved: &WalletSnapshot) -> Result<(), ReplayMismatch> {
        let mismatch = |problem: String| ReplayMismatch { entry: EntryId(0), wallet: saved.wallet, problem };
        if saved.lots.iter().any(|lot| lot.remaining.is_sign_negative()) {
            return Err(mismatch("the checkpoint holds a lot with a negative remainder".into()));
        }
        let mut lots = Lots::default();
        for lot in &saved.lots {
            lots.insert(lot.clone());
        }
        if lots.total() - saved.deficit != saved.totals.balance() {
            return Err(mismatch(format!(
                "the checkpoint's lots less deficit give {} but granted - debited - written_off is {}",
                lots.total() - saved.deficit,
                saved.totals.balance()
            )));
        }
        self.lots = lots;
        self.expired.clone_from(&saved.expired);
        self.deficit = saved.deficit;
        self.totals = saved.totals;
        self.clock = saved.clock;
        self.granted_years.clone_from(&saved.granted_years);
        self.lite_granted_through = saved.lite_granted_through;
        self.payers.restore_spends(&saved.spends);
        self.next_event_at = DateTime::<Utc>::MIN_UTC;
        self.period_cache = None;
        Ok(())
    }

    /// When a hold taken at `now` expires.
    pub fn hold_ttl_expiry(now: DateTime<Utc>, ttl: TimeDelta) -> DateTime<Utc> {
        now.checked_add_signed(ttl).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}
