//! The pure parts of the object-GC protocol of several imageservers over one bucket (the
//! protocol itself, its I/O and why it is safe are in `s3`'s module comment): the bodies
//! of leases, condemned markers and deletion records, the time limits, and which objects
//! a collector may delete, or an adder must wait for, given what it listed. No I/O here.

use model::ObjectId;
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

/// How long a lease protects its objects after it was last written (bucket clock). Its
/// holder rewrites it every `LEASE_RENEW` while it needs it.
pub const LEASE_TTL: Duration = Duration::from_secs(120);
/// How often a needed lease is rewritten.
pub const LEASE_RENEW: Duration = Duration::from_secs(20);
/// A lease older than this (by its holder's clock, since its last successful write) is no
/// longer relied on: an `AddImage` whose lease is that old refuses rather than writes.
pub const LEASE_TRUSTED: Duration = Duration::from_secs(60);
/// How long a condemned marker counts after it was written. A collector issues no
/// deletion later than `DELETE_BUDGET` after it began writing its marker; an adder waits
/// for a marker at most this long after first seeing it.
pub const MARKER_TTL: Duration = Duration::from_secs(60);
/// The part of `MARKER_TTL` a collector may spend deleting; the rest is the margin for a
/// deletion request still in flight when the budget ends.
pub const DELETE_BUDGET: Duration = Duration::from_secs(30);
/// How long deletion records stay in the bucket for the other servers to read.
pub const DELETED_RETENTION: Duration = Duration::from_secs(600);

/// A lease, marker or deletion record whose body cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("first line is not `ttl-ms N`")]
    NoTtl,
    #[error("line {0}: not an object id")]
    BadId(usize),
}

/// A body: `ttl-ms N`, then one hex object id a line.
pub fn encode<'a>(ttl: Duration, ids: impl IntoIterator<Item = &'a ObjectId>) -> Vec<u8> {
    let mut s = format!("ttl-ms {}\n", ttl.as_millis());
    for id in ids {
        s.push_str(&id.to_hex());
        s.push('\n');
    }
    s.into_bytes()
}

/// The ttl and ids of a body written by `encode`.
pub fn decode(body: &[u8]) -> Result<(Duration, Vec<ObjectId>), BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NoTtl)?;
    let mut lines = text.lines();
    let ttl = lines
        .next()
        .and_then(|l| l.strip_prefix("ttl-ms "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or(BodyError::NoTtl)?;
    let ids = lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| ObjectId::from_hex(l.trim()).map_err(|_| BodyError::BadId(n + 2)))
        .collect::<Result<_, _>>()?;
    Ok((Duration::from_millis(ttl), ids))
}

/// A lease or marker as read from the bucket: when the bucket last wrote it (its clock),
/// for how long it counts from then, and the objects it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub written: SystemTime,
    pub ttl: Duration,
    pub ids: Vec<ObjectId>,
}

impl Record {
    /// Whether it still counts at `now` (the bucket's clock).
    pub fn live_at(&self, now: SystemTime) -> bool {
        self.written + self.ttl > now
    }
}

/// Of a collector's `candidates`, those it may delete: named by no lease still live at
/// `now` (the bucket's time of the collector's own marker) and referenced by no image of
/// the bucket (`referenced`, read after the leases). In the order given.
pub fn deletable(
    candidates: &[ObjectId],
    leases: &[Record],
    now: SystemTime,
    referenced: impl Fn(&ObjectId) -> bool,
) -> Vec<ObjectId> {
    let leased: HashSet<&ObjectId> = leases
        .iter()
        .filter(|l| l.live_at(now))
        .flat_map(|l| &l.ids)
        .collect();
    candidates
        .iter()
        .filter(|id| !leased.contains(id) && !referenced(id))
        .copied()
        .collect()
}

/// How much later than an adder's lease (by the bucket's `Last-Modified`, whole seconds
/// rounded down, and a multi-node store's clocks) a marker may bear a time and still have
/// been written before the lease. A marker written after the lease is not waited for: its
/// collector lists leases after writing it, so it sees the lease and spares the objects.
/// That is what keeps a collector running without pause from starving adds.
pub const CLOCK_SLACK: Duration = Duration::from_secs(3);

/// Of the objects an adder leased (`ids`), those condemned by a marker live at `now` and
/// possibly written before the lease (written at `leased`, both the bucket's clock): the
/// adder waits for those markers to go.
pub fn condemned(
    ids: &HashSet<ObjectId>,
    markers: &[Record],
    leased: SystemTime,
    now: SystemTime,
) -> Vec<ObjectId> {
    let mut v: Vec<ObjectId> = markers
        .iter()
        .filter(|m| m.live_at(now) && m.written < leased + CLOCK_SLACK)
        .flat_map(|m| &m.ids)
        .filter(|id| ids.contains(id))
        .copied()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    v.sort();
    v
}

/// Whether a record written at `written` is old enough (bucket clock, `now`) for a
/// collector to remove it: twice its ttl for leases and markers (their writer is gone),
/// `DELETED_RETENTION` for deletion records.
pub fn prunable(written: SystemTime, ttl: Duration, now: SystemTime) -> bool {
    written + ttl * 2 <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ObjectId {
        ObjectId::of(&[n])
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn rec(written: u64, ttl: u64, ids: &[u8]) -> Record {
        Record {
            written: at(written),
            ttl: Duration::from_secs(ttl),
            ids: ids.iter().map(|n| id(*n)).collect(),
        }
    }

    #[test]
    fn bodies_round_trip_and_bad_ones_are_named() {
        let ids = [id(1), id(2)];
        let b = encode(Duration::from_secs(120), &ids);
        assert_eq!(
            decode(&b).unwrap(),
            (Duration::from_secs(120), ids.to_vec())
        );
        assert_eq!(decode(&encode(MARKER_TTL, &[])).unwrap().1, []);
        for (bad, e) in [
            (&b"1 2 3\n"[..], BodyError::NoTtl),
            (b"", BodyError::NoTtl),
            (b"ttl-ms x\n", BodyError::NoTtl),
            (b"ttl-ms 5\nzz\n", BodyError::BadId(2)),
        ] {
            assert_eq!(decode(bad), Err(e), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn what_a_collector_may_delete() {
        let all: Vec<ObjectId> = (1..=4).map(id).collect();
        let none = |_: &ObjectId| false;
        /// (leases, now, referenced, deletable)
        type Row = (Vec<Record>, u64, Vec<u8>, Vec<u8>);
        let table: Vec<Row> = vec![
            (vec![], 0, vec![], vec![1, 2, 3, 4]),
            // a live lease protects what it names
            (vec![rec(0, 120, &[1, 3])], 10, vec![], vec![2, 4]),
            // an expired one (its holder died) does not
            (vec![rec(0, 120, &[1, 3])], 120, vec![], vec![1, 2, 3, 4]),
            (
                vec![rec(0, 120, &[1]), rec(100, 120, &[2])],
                150,
                vec![],
                vec![1, 3, 4],
            ),
            // an image of the bucket protects its objects, leased or not
            (vec![rec(0, 120, &[1])], 10, vec![4], vec![2, 3]),
            (vec![], 0, vec![1, 2, 3, 4], vec![]),
        ];
        for (n, (leases, now, refs, want)) in table.into_iter().enumerate() {
            let refs: HashSet<ObjectId> = refs.into_iter().map(id).collect();
            let got = deletable(&all, &leases, at(now), |i| refs.contains(i));
            let want: Vec<ObjectId> = want.into_iter().map(id).collect();
            assert_eq!(got, want, "row {n}");
        }
        assert!(deletable(&[], &[], at(0), none).is_empty());
    }

    #[test]
    fn what_an_adder_must_wait_for() {
        let mine: HashSet<ObjectId> = [1, 2].into_iter().map(id).collect();
        /// (markers, leased, now, condemned)
        type Row = (Vec<Record>, u64, u64, Vec<u8>);
        let table: Vec<Row> = vec![
            (vec![], 0, 0, vec![]),
            (vec![rec(0, 60, &[3, 4])], 1, 1, vec![]),
            (vec![rec(0, 60, &[2, 3])], 1, 1, vec![2]),
            (
                vec![rec(0, 60, &[2]), rec(5, 60, &[1, 2])],
                5,
                6,
                vec![1, 2],
            ),
            // a marker older than its ttl is a dead collector's: not waited for
            (vec![rec(0, 60, &[1, 2])], 60, 60, vec![]),
            // one written (by the bucket's clock) well after the lease sees the lease
            (vec![rec(10, 60, &[1])], 7, 11, vec![]),
            (vec![rec(9, 60, &[1])], 7, 11, vec![1]),
        ];
        for (n, (markers, leased, now, want)) in table.into_iter().enumerate() {
            let mut want: Vec<ObjectId> = want.into_iter().map(id).collect();
            want.sort();
            let got = condemned(&mine, &markers, at(leased), at(now));
            assert_eq!(got, want, "row {n}");
        }
    }

    #[test]
    fn old_records_are_pruned_at_twice_their_ttl() {
        let ttl = Duration::from_secs(60);
        assert!(!prunable(at(0), ttl, at(119)));
        assert!(prunable(at(0), ttl, at(120)));
        // The limits keep their order: deletions end well inside a marker's life, leases
        // are renewed several times in theirs.
        const { assert!(DELETE_BUDGET.as_secs() * 2 <= MARKER_TTL.as_secs()) };
        const { assert!(LEASE_RENEW.as_secs() * 3 <= LEASE_TRUSTED.as_secs()) };
        const { assert!(LEASE_TRUSTED.as_secs() * 2 <= LEASE_TTL.as_secs()) };
    }
}
