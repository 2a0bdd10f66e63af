//! How records are laid out in the store.
//!
//! The writer persists records in *segments*: one sled value per batch, so a
//! flush window costs one sled insert instead of one per record. A segment
//! is a small header and the records in append order, each as a frame:
//!
//! ```text
//! segment := MAGIC VERSION count:u32 min_seq:u64 max_seq:u64 frame*
//! frame   := kind:u8 len:u32 payload[len]
//! ```
//!
//! Debit entries (nearly all the traffic) use a compact binary payload
//! ([`FRAME_DEBIT`]: fixed-width integers, decimals as mantissa and scale,
//! strings length-prefixed), which is several times cheaper to write than
//! JSON. Every other record is JSON ([`FRAME_JSON`]), so entities and rare
//! entries keep one readable encoding. All integers are little-endian.
//! Decoding checks every length and value and returns an error, never
//! panics: a store is input like any other.
//!
//! A value that starts with `{` is a single JSON record, as the first store
//! format wrote them; such stores stay readable.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::ledger::entry::{Debit, EntryKind, LedgerEntry, SettleDetails, Usage};
use crate::ledger::ids::{AppId, EntryId, KeyId, LotId, OrgId, Owner, RequestId, UserId, WalletId};
use crate::ledger::journal::{Record, RecordBody};
use crate::ledger::lot::LotTouch;

/// First byte of a segment (a JSON record starts with `{`).
const MAGIC: u8 = b'S';
/// Layout version of the segment and its frames.
const VERSION: u8 = 1;
const HEADER_LEN: usize = 2 + 4 + 8 + 8;
/// A whole record as JSON.
const FRAME_JSON: u8 = 1;
/// A debit entry, binary.
const FRAME_DEBIT: u8 = 2;

/// Why bytes did not decode; the caller adds where they came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

fn error(what: impl Into<String>) -> CodecError {
    CodecError(what.into())
}

/// The sequence numbers a segment covers, read from its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    pub count: u32,
    pub min_seq: u64,
    pub max_seq: u64,
}

/// Encodes `records` (non-empty, in append order) as one segment.
pub fn encode_segment(records: &[Record], out: &mut Vec<u8>) -> Result<(), CodecError> {
    let count = u32::try_from(records.len()).map_err(|_| error("too many records for one segment"))?;
    let min_seq = records.iter().map(|r| r.seq).min().unwrap_or(0);
    let max_seq = records.iter().map(|r| r.seq).max().unwrap_or(0);
    out.clear();
    out.extend_from_slice(&[MAGIC, VERSION]);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&min_seq.to_le_bytes());
    out.extend_from_slice(&max_seq.to_le_bytes());
    for record in records {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, 0]);
        let kind = match &record.body {
            RecordBody::Entry(entry @ LedgerEntry { kind: EntryKind::Debit(debit), .. }) => {
                encode_debit(record.seq, entry, debit, out);
                FRAME_DEBIT
            }
            _ => {
                serde_json::to_writer(&mut *out, record).map_err(|e| error(e.to_string()))?;
                FRAME_JSON
            }
        };
        let len = u32::try_from(out.len() - start - 5).map_err(|_| error("record too large"))?;
        out[start] = kind;
        out[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
    }
    Ok(())
}

/// The header of a stored value: `None` for a first-format JSON record.
pub fn segment_span(value: &[u8]) -> Result<Option<SegmentSpan>, CodecError> {
    if value.first() == Some(&b'{') {
        return Ok(None);
    }
    let mut reader = Reader { bytes: value };
    if reader.u8()? != MAGIC {
        return Err(error("not a segment (bad magic byte)"));
    }
    let version = reader.u8()?;
    if version != VERSION {
        return Err(error(format!("segment layout {version} is not supported (expected {VERSION})")));
    }
    Ok(Some(SegmentSpan { count: reader.u32()?, min_seq: reader.u64()?, max_seq: reader.u64()? }))
}

/// Every record of a stored value, in append order.
pub fn decode_value(value: &[u8]) -> Result<Vec<Record>, CodecError> {
    let Some(span) = segment_span(value)? else {
        return serde_json::from_slice(value).map(|record| vec![record]).map_err(|e| error(e.to_string()));
    };
    let mut reader = Reader { bytes: &value[HEADER_LEN..] };
    // The count is input: cap the reservation by what the bytes could hold.
    let mut records = Vec::with_capacity((span.count as usize).min(value.len() / 5));
    for _ in 0..span.count {
        let kind = reader.u8()?;
        let len = reader.u32()? as usize;
        let mut payload = Reader { bytes: reader.take(len)? };
        let record = match kind {
            FRAME_JSON => serde_json::from_slice(payload.bytes).map_err(|e| error(e.to_string()))?,
            FRAME_DEBIT => decode_debit(&mut payload)?,
            other => return Err(error(format!("unknown frame kind {other}"))),
        };
        if !payload.bytes.is_empty() && kind == FRAME_DEBIT {
            return Err(error("trailing bytes after a debit frame"));
        }
        records.push(record);
    }
    if !reader.bytes.is_empty() {
        return Err(error("trailing bytes after the last frame"));
    }
    Ok(records)
}

// ------------------------------------------------------------------ debits

fn encode_debit(seq: u64, entry: &LedgerEntry, debit: &Debit, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.u64(seq);
    w.u64(entry.id.0);
    w.time(entry.at);
    w.wallet(entry.wallet);
    w.u64(entry.org.0);
    w.decimal(entry.amount);
    w.decimal(entry.balance_after);
    // A debit touches a few lots; u32 is far beyond any real count.
    w.u32(entry.lots.len() as u32);
    for touch in &entry.lots {
        w.u64(touch.lot.0);
        w.decimal(touch.amount);
    }
    w.0.extend_from_slice(debit.request_id.0.as_bytes());
    w.u64(debit.key.0);
    w.owner(debit.owner);
    match &debit.end_user {
        Some(end_user) => {
            w.u8(1);
            w.str(end_user);
        }
        None => w.u8(0),
    }
    let details = &debit.details;
    w.str(&details.route);
    w.str(&details.model);
    w.str(&details.price_version);
    let usage = details.usage;
    for count in [usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.tool_units] {
        w.u64(count);
    }
    w.decimal(debit.held);
    w.decimal(debit.overrun);
}

fn decode_debit(r: &mut Reader<'_>) -> Result<Record, CodecError> {
    let seq = r.u64()?;
    let id = EntryId(r.u64()?);
    let at = r.time()?;
    let wallet = r.wallet()?;
    let org = OrgId(r.u64()?);
    let amount = r.decimal()?;
    let balance_after = r.decimal()?;
    let touches = r.u32()? as usize;
    // Each touch takes 25 bytes: a corrupt count cannot make us reserve more.
    let mut lots = Vec::with_capacity(touches.min(r.bytes.len() / 25));
    for _ in 0..touches {
        lots.push(LotTouch { lot: LotId(r.u64()?), amount: r.decimal()? });
    }
    let request_id = RequestId(Uuid::from_bytes(r.array()?));
    let key = KeyId(r.u64()?);
    let owner = r.owner()?;
    let end_user = match r.u8()? {
        0 => None,
        1 => Some(r.arc_str()?),
        other => return Err(error(format!("bad end-user flag {other}"))),
    };
    let route = r.arc_str()?;
    let model = r.arc_str()?;
    let price_version = r.arc_str()?;
    let usage = Usage {
        input_tokens: r.u64()?,
        output_tokens: r.u64()?,
        cached_input_tokens: r.u64()?,
        tool_units: r.u64()?,
    };
    let held = r.decimal()?;
    let overrun = r.decimal()?;
    let debit = Debit {
        request_id,
        key,
        owner,
        end_user,
        details: SettleDetails { route, model, usage, price_version },
        held,
        overrun,
    };
    let entry =
        LedgerEntry { id, at, wallet, org, kind: EntryKind::Debit(debit), amount, balance_after, lots };
    Ok(Record { seq, body: RecordBody::Entry(entry) })
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn time(&mut self, at: DateTime<Utc>) {
        self.0.extend_from_slice(&at.timestamp().to_le_bytes());
        self.u32(at.timestamp_subsec_nanos());
    }

    fn decimal(&mut self, value: Decimal) {
        self.0.extend_from_slice(&value.mantissa().to_le_bytes());
        // The scale of a Decimal is at most 28.
        self.u8(value.scale() as u8);
    }

    fn wallet(&mut self, wallet: WalletId) {
        match wallet {
            WalletId::Pool(org) => {
                self.u8(0);
                self.u64(org.0);
            }
            WalletId::Lite(user) => {
                self.u8(1);
                self.u64(user.0);
            }
        }
    }

    fn owner(&mut self, owner: Owner) {
        match owner {
            Owner::User(user) => {
                self.u8(0);
                self.u64(user.0);
            }
            Owner::App(app) => {
                self.u8(1);
                self.u64(app.0);
            }
        }
    }

    fn str(&mut self, text: &str) {
        // Routes, models and end-user ids are bounded far below 4 GiB.
        self.u32(text.len() as u32);
        self.0.extend_from_slice(text.as_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        if self.bytes.len() < len {
            return Err(error(format!("truncated: {len} bytes wanted, {} left", self.bytes.len())));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn time(&mut self) -> Result<DateTime<Utc>, CodecError> {
        let secs = i64::from_le_bytes(self.array()?);
        let nanos = self.u32()?;
        DateTime::from_timestamp(secs, nanos).ok_or_else(|| error(format!("bad timestamp {secs}.{nanos}")))
    }

    fn decimal(&mut self) -> Result<Decimal, CodecError> {
        let mantissa = i128::from_le_bytes(self.array()?);
        let scale = self.u8()?;
        Decimal::try_from_i128_with_scale(mantissa, u32::from(scale))
            .map_err(|e| error(format!("bad decimal {mantissa}e-{scale}: {e}")))
    }

    fn wallet(&mut self) -> Result<WalletId, CodecError> {
        match self.u8()? {
            0 => Ok(WalletId::Pool(OrgId(self.u64()?))),
            1 => Ok(WalletId::Lite(UserId(self.u64()?))),
            other => Err(error(format!("bad wallet kind {other}"))),
        }
    }

    fn owner(&mut self) -> Result<Owner, CodecError> {
        match self.u8()? {
            0 => Ok(Owner::User(UserId(self.u64()?))),
            1 => Ok(Owner::App(AppId(self.u64()?))),
            other => Err(error(format!("bad owner kind {other}"))),
        }
    }

    fn arc_str(&mut self) -> Result<Arc<str>, CodecError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(Arc::from).map_err(|e| error(format!("bad string: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;
    use crate::ledger::entry::{EntryKind, WriteOffReason};

    fn debit(seq: u64, end_user: Option<&str>, amount: Decimal) -> Record {
        let debit = Debit {
            request_id: RequestId(Uuid::from_u128(
                0x0123_4567_89ab_cdef_0011_2233_4455_6677 + u128::from(seq),
            )),
            key: KeyId(42),
            owner: if seq % 2 == 0 { Owner::App(AppId(7)) } else { Owner::User(UserId(9)) },
            end_user: end_user.map(Arc::from),
            details: SettleDetails {
                route: Arc::from("/v1/chat/completions"),
                model: Arc::from("gpt-4o-mini"),
                usage: Usage {
                    input_tokens: 1_000,
                    output_tokens: 300,
                    cached_input_tokens: 20,
                    tool_units: 3,
                },
                price_version: Arc::from("2025-11@0123456789ab"),
            },
            held: dec!(0.02),
            overrun: dec!(0.000000000000000000000000001),
        };
        let at = DateTime::parse_from_rfc3339("2027-02-28T23:59:59.123456789Z").unwrap().with_timezone(&Utc);
        let entry = LedgerEntry {
            id: EntryId(seq),
            at,
            wallet: if seq % 3 == 0 { WalletId::Pool(OrgId(1)) } else { WalletId::Lite(UserId(5)) },
            org: OrgId(1),
            kind: EntryKind::Debit(debit),
            amount: -amount,
            balance_after: dec!(-12345678901234567890.123456789),
            lots: vec![LotTouch { lot: LotId(3), amount }, LotTouch { lot: LotId(4), amount: dec!(0) }],
        };
        Record { seq, body: RecordBody::Entry(entry) }
    }

    fn write_off(seq: u64) -> Record {
        let entry = LedgerEntry {
            id: EntryId(seq),
            at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            wallet: WalletId::Lite(UserId(5)),
            org: OrgId(1),
            kind: EntryKind::WriteOff { reason: WriteOffReason::Expired },
            amount: dec!(-1.5),
            balance_after: dec!(0),
            lots: vec![LotTouch { lot: LotId(3), amount: dec!(1.5) }],
        };
        Record { seq, body: RecordBody::Entry(entry) }
    }

    fn segment(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_segment(records, &mut out).unwrap();
        out
    }

    #[test]
    fn records_round_trip_in_append_order() {
        let records =
            vec![debit(12, Some("end-user-ü"), dec!(0.0123)), write_off(10), debit(11, None, dec!(7))];
        let bytes = segment(&records);
        assert_eq!(segment_span(&bytes).unwrap(), Some(SegmentSpan { count: 3, min_seq: 10, max_seq: 12 }));
        assert_eq!(decode_value(&bytes).unwrap(), records);
    }

    #[test]
    fn a_first_format_json_record_still_decodes() {
        let record = write_off(4);
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(segment_span(&json).unwrap(), None);
        assert_eq!(decode_value(&json).unwrap(), vec![record]);
    }

    #[test]
    fn damaged_bytes_are_errors_not_panics() {
        let bytes = segment(&[debit(1, Some("u"), dec!(1)), write_off(2)]);
        // Every truncation and every single-byte change decodes or errs.
        for cut in 0..bytes.len() {
            assert!(decode_value(&bytes[..cut]).is_err(), "a segment cut at {cut} must not decode");
        }
        for at in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] ^= flip;
                let _ = decode_value(&damaged);
            }
        }
        let mut bad_scale = segment(&[debit(1, None, dec!(1))]);
        // The first decimal (amount) sits after the header, frame head, seq,
        // id, time, wallet and org; its scale is its 17th byte.
        let scale_at = HEADER_LEN + 5 + 8 + 8 + 12 + 9 + 8 + 16;
        bad_scale[scale_at] = 200;
        let problem = decode_value(&bad_scale).unwrap_err().to_string();
        assert!(problem.contains("bad decimal"), "{problem}");
    }
}
