//! Imageserver replication, the pure part: what a replica must do to match its master,
//! given the master's view of every image name and its own (`decide`). No I/O; the
//! imageserver's `replication` module observes, fetches and writes.
//!
//! A name is live (with the SHA-512 of its image file and its expiry), deleted or expired
//! (both tombstones, never reused). The replica copies what the master has live and it
//! lacks, follows deletions and expiries (tombstoning names it never saw too, so a name is
//! never reusable on the replica either), follows expiry extensions (the one edit an image
//! ever gets). What it cannot repair (a name dead here but live on the master, one
//! holding a different image, or a live image the master does not know at all) is
//! reported, never overwritten or deleted: images are immutable, and a master that lost
//! its data must not take the replica's copies with it (Dominator's replicas delete
//! images the master does not list; ours keep them and say so).

use crate::hash::ObjectId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The state of one image name on an imageserver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum NameState {
    /// An image: the SHA-512 of its stored file (`None` for images stored by versions
    /// that kept none) and when it expires (`None` = never).
    Live {
        #[serde(default)]
        checksum: Option<ObjectId>,
        #[serde(default)]
        expires_at: Option<u64>,
    },
    /// Deleted: a tombstone.
    Deleted,
    /// Expired: a tombstone.
    Expired,
}

/// One name and its state, as the master sends it (`ImageServer.GetReplicationState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub name: String,
    #[serde(flatten)]
    pub state: NameState,
}

/// One step a replica takes towards its master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Fetch the image (and the objects it lacks) and store it.
    Copy(String),
    /// Rewrite the live image's expiry to the master's (`None` = never).
    ChangeExpiry {
        name: String,
        expires_at: Option<u64>,
    },
    /// Tombstone a live image as deleted.
    Delete(String),
    /// Tombstone a live image as expired.
    Expire(String),
    /// Record a tombstone for a name never seen live here.
    Tombstone { name: String, expired: bool },
    /// Cannot be repaired (`why` says how the name differs); reported.
    Diverged { name: String, why: String },
}

impl Action {
    /// The image name the action is about.
    pub fn name(&self) -> &str {
        match self {
            Action::Copy(n) | Action::Delete(n) | Action::Expire(n) => n,
            Action::ChangeExpiry { name, .. }
            | Action::Tombstone { name, .. }
            | Action::Diverged { name, .. } => name,
        }
    }
}

/// What the replica must do, name by name (in name order), so that its names match
/// `master`'s. `now` (Unix seconds) turns a live master image already past its expiry
/// into an expired tombstone rather than a copy.
pub fn decide(master: &[NameEntry], local: &[NameEntry], now: u64) -> Vec<Action> {
    let m: BTreeMap<&str, &NameState> =
        master.iter().map(|e| (e.name.as_str(), &e.state)).collect();
    let l: BTreeMap<&str, &NameState> = local.iter().map(|e| (e.name.as_str(), &e.state)).collect();
    let mut names: Vec<&str> = m.keys().chain(l.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| step(n, m.get(n).copied(), l.get(n).copied(), now))
        .collect()
}

/// The action for one name (`None`: already in step).
fn step(
    name: &str,
    master: Option<&NameState>,
    local: Option<&NameState>,
    now: u64,
) -> Option<Action> {
    use NameState::{Deleted, Expired, Live};
    let n = || name.to_string();
    let master = match master {
        Some(Live {
            expires_at: Some(t),
            ..
        }) if *t <= now => &Expired,
        Some(s) => s,
        None => {
            return match local {
                Some(Live { .. }) => Some(Action::Diverged {
                    name: n(),
                    why: "is not known to the master".into(),
                }),
                _ => None,
            }
        }
    };
    match (master, local) {
        (Live { .. }, None) => Some(Action::Copy(n())),
        (
            Live {
                checksum: ms,
                expires_at: me,
            },
            Some(Live {
                checksum: ls,
                expires_at: le,
            }),
        ) => {
            if me != le {
                Some(Action::ChangeExpiry {
                    name: n(),
                    expires_at: *me,
                })
            } else if ms.is_some() && ls.is_some() && ms != ls {
                Some(Action::Diverged {
                    name: n(),
                    why: "holds a different image than the master".into(),
                })
            } else {
                None
            }
        }
        (Live { .. }, Some(Deleted | Expired)) => Some(Action::Diverged {
            name: n(),
            why: "is a tombstone here but live on the master".into(),
        }),
        (Deleted, Some(Live { .. })) => Some(Action::Delete(n())),
        (Expired, Some(Live { .. })) => Some(Action::Expire(n())),
        (Deleted, None) => Some(Action::Tombstone {
            name: n(),
            expired: false,
        }),
        (Expired, None) => Some(Action::Tombstone {
            name: n(),
            expired: true,
        }),
        (Deleted | Expired, Some(Deleted | Expired)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(sum: u8, expires_at: Option<u64>) -> NameState {
        NameState::Live {
            checksum: Some(ObjectId([sum; 64])),
            expires_at,
        }
    }

    fn e(name: &str, state: NameState) -> NameEntry {
        NameEntry {
            name: name.into(),
            state,
        }
    }

    #[test]
    fn each_pair_of_states_gives_its_action() {
        use NameState::{Deleted, Expired};
        let now = 1000;
        let s = |n: &str| n.to_string();
        let cases: Vec<(Option<NameState>, Option<NameState>, Option<Action>)> = vec![
            (Some(live(1, None)), None, Some(Action::Copy(s("x")))),
            (Some(live(1, None)), Some(live(1, None)), None),
            (
                Some(live(1, Some(2000))),
                Some(live(2, Some(1500))),
                Some(Action::ChangeExpiry {
                    name: s("x"),
                    expires_at: Some(2000),
                }),
            ),
            (
                Some(live(1, None)),
                Some(live(2, Some(1500))),
                Some(Action::ChangeExpiry {
                    name: s("x"),
                    expires_at: None,
                }),
            ),
            (
                Some(live(1, None)),
                Some(live(2, None)),
                Some(Action::Diverged {
                    name: s("x"),
                    why: s("holds a different image than the master"),
                }),
            ),
            // An image stored without a checksum is compared by expiry only.
            (
                Some(NameState::Live {
                    checksum: None,
                    expires_at: None,
                }),
                Some(live(2, None)),
                None,
            ),
            (
                Some(live(1, None)),
                Some(Deleted),
                Some(Action::Diverged {
                    name: s("x"),
                    why: s("is a tombstone here but live on the master"),
                }),
            ),
            (
                Some(Deleted),
                Some(live(1, None)),
                Some(Action::Delete(s("x"))),
            ),
            (
                Some(Expired),
                Some(live(1, None)),
                Some(Action::Expire(s("x"))),
            ),
            (
                Some(Deleted),
                None,
                Some(Action::Tombstone {
                    name: s("x"),
                    expired: false,
                }),
            ),
            (
                Some(Expired),
                None,
                Some(Action::Tombstone {
                    name: s("x"),
                    expired: true,
                }),
            ),
            (Some(Deleted), Some(Deleted), None),
            (Some(Expired), Some(Deleted), None),
            (Some(Deleted), Some(Expired), None),
            // Past its expiry on the master: a tombstone, never a copy.
            (
                Some(live(1, Some(now))),
                None,
                Some(Action::Tombstone {
                    name: s("x"),
                    expired: true,
                }),
            ),
            (
                Some(live(1, Some(now - 1))),
                Some(live(1, Some(now - 1))),
                Some(Action::Expire(s("x"))),
            ),
            // Unknown to the master: kept and reported, tombstones stay.
            (
                None,
                Some(live(1, None)),
                Some(Action::Diverged {
                    name: s("x"),
                    why: s("is not known to the master"),
                }),
            ),
            (None, Some(Deleted), None),
            (None, None, None),
        ];
        for (i, (m, l, want)) in cases.into_iter().enumerate() {
            let master: Vec<NameEntry> = m.into_iter().map(|s| e("x", s)).collect();
            let local: Vec<NameEntry> = l.into_iter().map(|s| e("x", s)).collect();
            let got = decide(&master, &local, now);
            assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "case {i}");
        }
    }

    #[test]
    fn actions_come_in_name_order_and_a_second_pass_after_them_is_empty() {
        let master = vec![
            e("b/2", live(2, None)),
            e("a/1", NameState::Deleted),
            e("c/3", live(3, Some(5000))),
        ];
        let local = vec![e("c/3", live(9, Some(4000))), e("z", NameState::Expired)];
        let names: Vec<String> = decide(&master, &local, 1000)
            .iter()
            .map(|a| a.name().to_string())
            .collect();
        assert_eq!(names, ["a/1", "b/2", "c/3"]);
        // Once carried out (the expiry rewrite gives the master's checksum), nothing is left.
        let after = vec![
            e("a/1", NameState::Deleted),
            e("b/2", live(2, None)),
            e("c/3", live(3, Some(5000))),
            e("z", NameState::Expired),
        ];
        assert!(decide(&master, &after, 1000).is_empty());
    }

    #[test]
    fn entries_round_trip_through_json() {
        let v = vec![e("a", live(1, Some(7))), e("b", NameState::Expired)];
        let json = serde_json::to_string(&v).unwrap();
        assert!(json.contains("\"state\":\"expired\""), "{json}");
        let back: Vec<NameEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
    }
}
