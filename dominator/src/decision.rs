//! The per-machine decision, as a pure function: given what the MDB wants, what the
//! machine last reported, the plan the diff computed and what we did last, what is the
//! next step? No I/O, no clocks: `herd` gathers the facts, calls `next_step`, and carries
//! the step out. Back-off is data too (`backoff`).

use model::api::PollResponse;
use model::{ObjectId, UpdatePlan};
use serde::Serialize;
use std::time::Duration;

/// What a user sees for a machine. Names follow Dominator's (`dominator.md` §7.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    WaitingToPoll,
    Unreachable,
    ConnectionRefused,
    DnsError,
    ConnectTimeout,
    PollDenied,
    NotASubd,
    SubdBusy,
    SubNotReady,
    ImageUndefined,
    ImageNotReady,
    Fetching,
    FetchFailed,
    Updating,
    UpdateFailed,
    WaitingForScan,
    UpdatesDisabled,
    UnsafeUpdate,
    Synced,
}

impl Status {
    pub const ALL: [Status; 19] = [
        Status::Synced,
        Status::Fetching,
        Status::Updating,
        Status::WaitingForScan,
        Status::UpdateFailed,
        Status::FetchFailed,
        Status::Unreachable,
        Status::ConnectionRefused,
        Status::DnsError,
        Status::ConnectTimeout,
        Status::PollDenied,
        Status::NotASubd,
        Status::SubdBusy,
        Status::ImageNotReady,
        Status::ImageUndefined,
        Status::UpdatesDisabled,
        Status::UnsafeUpdate,
        Status::SubNotReady,
        Status::WaitingToPoll,
    ];

    /// The human name shown on the status page and in the API.
    pub fn name(self) -> &'static str {
        match self {
            Status::WaitingToPoll => "waiting to poll",
            Status::Unreachable => "unreachable",
            Status::ConnectionRefused => "connection refused",
            Status::DnsError => "DNS error",
            Status::ConnectTimeout => "connect timeout",
            Status::PollDenied => "poll denied",
            Status::NotASubd => "not a subd",
            Status::SubdBusy => "subd busy",
            Status::SubNotReady => "sub not ready",
            Status::ImageUndefined => "image undefined",
            Status::ImageNotReady => "image not ready",
            Status::Fetching => "fetching",
            Status::FetchFailed => "fetch failed",
            Status::Updating => "updating",
            Status::UpdateFailed => "update failed",
            Status::WaitingForScan => "waiting for next scan",
            Status::UpdatesDisabled => "updates disabled",
            Status::UnsafeUpdate => "unsafe update",
            Status::Synced => "synced",
        }
    }

    /// Failures that are retried with an exponential back-off.
    pub fn backs_off(self) -> bool {
        matches!(
            self,
            Status::Unreachable
                | Status::ConnectionRefused
                | Status::DnsError
                | Status::ConnectTimeout
                | Status::PollDenied
                | Status::NotASubd
                | Status::SubdBusy
                | Status::FetchFailed
                | Status::UpdateFailed
        )
    }

    /// Work the dominator started and waits on: neither a success nor a failure, so it
    /// leaves the failure count (and thus the back-off) as it was.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Status::Fetching | Status::Updating | Status::WaitingForScan
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The required image, as far as the dominator knows it.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageState {
    /// The MDB names no image.
    Undefined,
    /// Named but not (yet) on the imageserver, or the imageserver is unreachable.
    NotReady(String),
    /// Available; the diff could be computed (`plan`).
    Ready,
}

/// Something the dominator asked the machine to do, remembered until it is confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Fetch objects for `image`; subd had scan count `scan_count` when it accepted it.
    Fetch { image: String, scan_count: u64 },
    /// Apply the update for `image`; subd had scan count `scan_count` when it accepted it.
    Update { image: String, scan_count: u64 },
}

/// Why a poll failed: the status to show (`unreachable`, `connection refused`,
/// `DNS error`, `connect timeout`, `poll denied`) and the error line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollFailure {
    pub status: Status,
    pub message: String,
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The poll, or why it failed.
    pub poll: Result<&'a PollResponse, &'a PollFailure>,
    pub required_image: &'a str,
    pub image: ImageState,
    /// The diff of the required image against the last tree, when both are known.
    pub plan: Option<&'a UpdatePlan>,
    /// Why updates are off for this machine (MDB `DisableUpdates` or the global switch).
    pub updates_disabled: Option<&'a str>,
    /// The MDB tag `DisableSafetyCheck` is set.
    pub safety_check_disabled: bool,
    /// The last action not yet confirmed by a later poll.
    pub last_action: Option<&'a Action>,
    /// Objects the planned image needs that the machine has nowhere (empty if none or
    /// not ready).
    pub planned_missing: &'a [ObjectId],
    /// Objects in the machine's cache that neither the required nor the planned image
    /// needs (`planner::unneeded_cache`); removed once the machine is in sync.
    pub unneeded_cache: &'a [ObjectId],
}

/// The next step for one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send now; report `status` (and `error`), and forget the last action if
    /// it has been settled.
    Wait {
        status: Status,
        error: Option<String>,
        settled: bool,
    },
    /// Ask the subd to fetch these objects from the imageserver.
    Fetch { hashes: Vec<ObjectId> },
    /// Send the plan.
    Update,
    /// In sync; optionally prefetch the planned image's objects and remove cache objects
    /// no image wants (`Subd.Cleanup`).
    Synced {
        prefetch: Vec<ObjectId>,
        cleanup: Vec<ObjectId>,
    },
}

fn wait(status: Status, error: Option<String>) -> Step {
    Step::Wait {
        status,
        error,
        settled: false,
    }
}

/// Scans after an update that must complete before its result is believed, counted from
/// subd's scan count when it accepted the update: subd discards a pass that overlapped the
/// update, so the first scan counted after that started after the update ended.
pub const SCANS_AFTER_UPDATE: u64 = 1;
/// What the scans since our last action say, if they settle the step: still waiting for
/// them, or the action failed.
fn outcome_of_last_action(poll: &PollResponse, last_action: Option<&Action>) -> Option<Step> {
    match last_action {
        Some(Action::Update { image, scan_count }) => {
            if poll.scan_count < scan_count + SCANS_AFTER_UPDATE {
                return Some(wait(Status::WaitingForScan, None));
            }
            if let Some(r) = poll.last_update.as_ref().filter(|r| &r.image_name == image) {
                if let Some(e) = r.errors.last() {
                    return Some(Step::Wait {
                        status: Status::UpdateFailed,
                        error: Some(e.clone()),
                        settled: true,
                    });
                }
            }
        }
        Some(Action::Fetch { scan_count, .. }) => {
            if let Some(e) = &poll.last_fetch_error {
                return Some(Step::Wait {
                    status: Status::FetchFailed,
                    error: Some(e.clone()),
                    settled: true,
                });
            }
            if poll.scan_count < scan_count + SCANS_AFTER_FETCH {
                return Some(wait(Status::Fetching, None));
            }
        }
        None => {}
    }
    None
}

/// Fetch the plan's missing objects, unless they cannot fit in `free_space` (bytes free on
/// the machine, when it says).
fn fetch_step(plan: &UpdatePlan, free_space: Option<u64>) -> Step {
    // A fetch that cannot fit is not started: it would fail anyway, after filling the
    // machine's disk for every other program on it.
    if let Some(free) = free_space {
        let need = plan.fetch_bytes.saturating_add(FETCH_HEADROOM);
        if need > free {
            return Step::Wait {
                status: Status::FetchFailed,
                error: Some(format!(
                    "not enough disk space: the {} objects to fetch need {} MiB and {} MiB to spare; {} MiB free on the machine",
                    plan.objects_to_fetch.len(),
                    plan.fetch_bytes.div_ceil(1 << 20),
                    FETCH_HEADROOM >> 20,
                    free >> 20
                )),
                settled: true,
            };
        }
    }
    Step::Fetch {
        hashes: plan.objects_to_fetch.clone(),
    }
}

/// Free space a fetch must leave on the machine's file-system.
pub const FETCH_HEADROOM: u64 = 64 << 20;

/// Scans after a fetch before the object cache is believed to list the fetched objects.
pub const SCANS_AFTER_FETCH: u64 = 1;

/// The scan count that settles the last action (the first scan counted after it), while
/// one is awaited: a poll may be held until the subd reaches it.
pub fn awaited_scan(last_action: Option<&Action>) -> Option<u64> {
    match last_action? {
        Action::Update { scan_count, .. } => Some(scan_count + SCANS_AFTER_UPDATE),
        Action::Fetch { scan_count, .. } => Some(scan_count + SCANS_AFTER_FETCH),
    }
}

/// Whether `next_step` would look at the plan: not while the subd is busy or the last
/// action awaits the scans that confirm it. The herd drops a plan once it has acted on it
/// and recomputes one (from a fresh tree) only when this says it is needed.
pub fn needs_plan(poll: &PollResponse, last_action: Option<&Action>) -> bool {
    if poll.fetch_in_progress || poll.update_in_progress || poll.generation == 0 {
        return false;
    }
    match last_action {
        Some(Action::Update { scan_count, .. }) => {
            poll.scan_count >= scan_count + SCANS_AFTER_UPDATE
        }
        Some(Action::Fetch { scan_count, .. }) => {
            poll.last_fetch_error.is_some() || poll.scan_count >= scan_count + SCANS_AFTER_FETCH
        }
        None => true,
    }
}

/// Decides the next step. The order of checks is the status precedence: connection,
/// work in progress, sub readiness, the outcome of our last action, image availability,
/// then the plan itself.
pub fn next_step(f: &Facts<'_>) -> Step {
    let poll = match f.poll {
        Err(e) => return wait(e.status, Some(e.message.clone())),
        Ok(p) => p,
    };
    if poll.fetch_in_progress {
        return wait(Status::Fetching, None);
    }
    if poll.update_in_progress {
        return wait(Status::Updating, None);
    }
    if poll.generation == 0 {
        return wait(Status::SubNotReady, None);
    }
    if let Some(step) = outcome_of_last_action(poll, f.last_action) {
        return step;
    }
    match &f.image {
        ImageState::Undefined => return wait(Status::ImageUndefined, None),
        ImageState::NotReady(e) => return wait(Status::ImageNotReady, Some(e.clone())),
        ImageState::Ready => {}
    }
    let Some(plan) = f.plan else {
        return wait(Status::WaitingToPoll, None);
    };
    if !plan.objects_to_fetch.is_empty() {
        // Objects are fetched even when updates are off, so enabling them is quick.
        return fetch_step(plan, poll.free_space);
    }
    if plan.is_empty() {
        return Step::Synced {
            prefetch: f.planned_missing.to_vec(),
            cleanup: f.unneeded_cache.to_vec(),
        };
    }
    if let Some(reason) = f.updates_disabled {
        return Step::Wait {
            status: Status::UpdatesDisabled,
            error: Some(reason.to_string()),
            settled: true,
        };
    }
    if let Some(reason) = &plan.unsafe_reason {
        if !f.safety_check_disabled {
            return Step::Wait {
                status: Status::UnsafeUpdate,
                error: Some(format!(
                    "{reason} (set the MDB tag DisableSafetyCheck on this machine to allow it)"
                )),
                settled: true,
            };
        }
    }
    if let Some(Action::Update { image, .. }) = f.last_action {
        // Our update of this very image completed without errors, the scans after it are
        // in, and the machine still differs: sending it again at once would loop. Report
        // it and let the back-off pace the retries.
        if image == f.required_image {
            return Step::Wait {
                status: Status::UpdateFailed,
                error: Some(leftover(image, plan)),
                settled: true,
            };
        }
    }
    Step::Update
}

/// Why an update that reported success is not believed: what still differs.
fn leftover(image: &str, plan: &UpdatePlan) -> String {
    let paths = plan.touched_paths();
    let first: Vec<String> = paths
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "update to {image} reported success but {} path(s) still differ ({}{}); retrying with back-off",
        paths.len(),
        first.join(", "),
        if paths.len() > first.len() { ", …" } else { "" }
    )
}

/// Delay before retrying after `failures` consecutive failures: `base`, doubling each
/// time, never more than `cap`.
pub fn backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// The error a machine shows after a cycle: an error belongs to the status it explains. A
/// new error replaces the old; a cycle that brings none keeps the shown one only while the
/// status stays the same (a retry that failed the same way), and drops it on any change
/// (after a subd restart, `fetching` must not show the old `connection refused`).
pub fn shown_error(
    previous: Status,
    now: Status,
    error: Option<String>,
    shown: Option<String>,
) -> Option<String> {
    match error {
        Some(e) => Some(e),
        None if previous == now => shown,
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::api::UpdateResult;

    fn id(n: u8) -> ObjectId {
        ObjectId::of(&[n])
    }

    fn poll(generation: u64, scan_count: u64) -> PollResponse {
        PollResponse {
            generation,
            scan_count,
            ..PollResponse::default()
        }
    }

    fn plan_with(f: impl FnOnce(&mut UpdatePlan)) -> UpdatePlan {
        let mut p = UpdatePlan {
            image_name: "img/2".into(),
            ..UpdatePlan::default()
        };
        f(&mut p);
        p
    }

    /// One row: a name, the facts, the expected step.
    struct Case<'a> {
        name: &'a str,
        facts: Facts<'a>,
        want: Step,
    }

    fn base<'a>(p: &'a PollResponse, plan: Option<&'a UpdatePlan>) -> Facts<'a> {
        Facts {
            poll: Ok(p),
            required_image: "img/2",
            image: ImageState::Ready,
            plan,
            updates_disabled: None,
            safety_check_disabled: false,
            last_action: None,
            planned_missing: &[],
            unneeded_cache: &[],
        }
    }

    #[test]
    fn next_step_table() {
        let ready = poll(3, 10);
        let fetching = PollResponse {
            fetch_in_progress: true,
            ..poll(3, 10)
        };
        let updating = PollResponse {
            update_in_progress: true,
            ..poll(3, 10)
        };
        let not_ready = poll(0, 0);
        let fetch_err = PollResponse {
            last_fetch_error: Some("GetObjects: connection refused".into()),
            ..poll(3, 11)
        };
        let failed_update = PollResponse {
            last_update: Some(UpdateResult {
                image_name: "img/2".into(),
                errors: vec!["/etc/x: permission denied".into()],
                ..UpdateResult::default()
            }),
            ..poll(4, 12)
        };
        let empty = plan_with(|_| {});
        let needs_objects = plan_with(|p| p.objects_to_fetch = vec![id(1), id(2)]);
        let big_fetch = plan_with(|p| {
            p.objects_to_fetch = vec![id(1), id(2)];
            p.fetch_bytes = 100 << 20;
        });
        let roomy = PollResponse {
            free_space: Some(200 << 20),
            ..poll(3, 10)
        };
        let cramped = PollResponse {
            free_space: Some(80 << 20),
            ..poll(3, 10)
        };
        let changes = plan_with(|p| p.paths_to_delete = vec!["/x".parse().unwrap()]);
        let unsafe_plan = plan_with(|p| {
            p.paths_to_delete = vec!["/usr".parse().unwrap()];
            p.unsafe_reason = Some("deletes 900 of 1000 inodes".into());
        });
        let sent_update = Action::Update {
            image: "img/2".into(),
            scan_count: 10,
        };
        let sent_fetch = Action::Fetch {
            image: "img/2".into(),
            scan_count: 10,
        };
        let prefetch = [id(9)];
        let stale = [id(7)];
        let refused = PollFailure {
            status: Status::ConnectionRefused,
            message: "h:1: refused".into(),
        };
        let sent_other = Action::Update {
            image: "img/1".into(),
            scan_count: 10,
        };
        // Actions were accepted at scan 10: scan 11 is the first to start after them.
        let (no_scan_since, one_scan) = (poll(4, 10), poll(4, 11));
        let w = |status, error: Option<&str>, settled| Step::Wait {
            status,
            error: error.map(str::to_string),
            settled,
        };

        let cases = vec![
            Case {
                name: "unreachable",
                facts: Facts {
                    poll: Err(&refused),
                    ..base(&ready, Some(&changes))
                },
                want: w(Status::ConnectionRefused, Some("h:1: refused"), false),
            },
            Case {
                name: "fetch in progress",
                facts: base(&fetching, Some(&needs_objects)),
                want: w(Status::Fetching, None, false),
            },
            Case {
                name: "update in progress",
                facts: base(&updating, Some(&changes)),
                want: w(Status::Updating, None, false),
            },
            Case {
                name: "first scan not done",
                facts: base(&not_ready, None),
                want: w(Status::SubNotReady, None, false),
            },
            Case {
                name: "no image named",
                facts: Facts {
                    image: ImageState::Undefined,
                    required_image: "",
                    ..base(&ready, None)
                },
                want: w(Status::ImageUndefined, None, false),
            },
            Case {
                name: "image not on the server yet",
                facts: Facts {
                    image: ImageState::NotReady("no such image".into()),
                    ..base(&ready, None)
                },
                want: w(Status::ImageNotReady, Some("no such image"), false),
            },
            Case {
                name: "no tree yet",
                facts: base(&ready, None),
                want: w(Status::WaitingToPoll, None, false),
            },
            Case {
                name: "missing objects: fetch",
                facts: base(&ready, Some(&needs_objects)),
                want: Step::Fetch {
                    hashes: vec![id(1), id(2)],
                },
            },
            Case {
                name: "a fetch that fits with room to spare",
                facts: base(&roomy, Some(&big_fetch)),
                want: Step::Fetch {
                    hashes: vec![id(1), id(2)],
                },
            },
            Case {
                name: "a fetch that would fill the disk is not started",
                facts: base(&cramped, Some(&big_fetch)),
                want: w(
                    Status::FetchFailed,
                    Some("not enough disk space: the 2 objects to fetch need 100 MiB and 64 MiB to spare; 80 MiB free on the machine"),
                    true,
                ),
            },
            Case {
                name: "missing objects are fetched even with updates disabled",
                facts: Facts {
                    updates_disabled: Some("MDB DisableUpdates"),
                    ..base(&ready, Some(&needs_objects))
                },
                want: Step::Fetch {
                    hashes: vec![id(1), id(2)],
                },
            },
            Case {
                name: "fetch sent, no scan since: still fetching",
                facts: Facts {
                    last_action: Some(&sent_fetch),
                    ..base(&ready, Some(&needs_objects))
                },
                want: w(Status::Fetching, None, false),
            },
            Case {
                name: "fetch failed",
                facts: Facts {
                    last_action: Some(&sent_fetch),
                    ..base(&fetch_err, Some(&needs_objects))
                },
                want: w(
                    Status::FetchFailed,
                    Some("GetObjects: connection refused"),
                    true,
                ),
            },
            Case {
                name: "changes: update",
                facts: base(&ready, Some(&changes)),
                want: Step::Update,
            },
            Case {
                name: "changes, MDB disables updates",
                facts: Facts {
                    updates_disabled: Some("DisableUpdates in the MDB"),
                    ..base(&ready, Some(&changes))
                },
                want: w(
                    Status::UpdatesDisabled,
                    Some("DisableUpdates in the MDB"),
                    true,
                ),
            },
            Case {
                name: "unsafe plan stops",
                facts: base(&ready, Some(&unsafe_plan)),
                want: w(
                    Status::UnsafeUpdate,
                    Some("deletes 900 of 1000 inodes (set the MDB tag DisableSafetyCheck on this machine to allow it)"),
                    true,
                ),
            },
            Case {
                name: "DisableSafetyCheck lifts the safety stop",
                facts: Facts {
                    safety_check_disabled: true,
                    ..base(&ready, Some(&unsafe_plan))
                },
                want: Step::Update,
            },
            Case {
                name: "global disable wins over DisableSafetyCheck",
                facts: Facts {
                    safety_check_disabled: true,
                    updates_disabled: Some("maintenance"),
                    ..base(&ready, Some(&unsafe_plan))
                },
                want: w(Status::UpdatesDisabled, Some("maintenance"), true),
            },
            Case {
                name: "update accepted, no scan since: wait",
                facts: Facts {
                    last_action: Some(&sent_update),
                    ..base(&no_scan_since, Some(&changes))
                },
                want: w(Status::WaitingForScan, None, false),
            },
            Case {
                name: "update failed",
                facts: Facts {
                    last_action: Some(&sent_update),
                    ..base(&failed_update, Some(&changes))
                },
                want: w(
                    Status::UpdateFailed,
                    Some("/etc/x: permission denied"),
                    true,
                ),
            },
            Case {
                name: "update confirmed: empty diff at the first scan since",
                facts: Facts {
                    last_action: Some(&sent_update),
                    ..base(&one_scan, Some(&empty))
                },
                want: Step::Synced {
                    prefetch: vec![],
                    cleanup: vec![],
                },
            },
            Case {
                name: "update reported success but the diff is not empty: no resend loop",
                facts: Facts {
                    last_action: Some(&sent_update),
                    ..base(&one_scan, Some(&changes))
                },
                want: w(
                    Status::UpdateFailed,
                    Some("update to img/2 reported success but 1 path(s) still differ (/x); retrying with back-off"),
                    true,
                ),
            },
            Case {
                name: "after an update of another image: update",
                facts: Facts {
                    last_action: Some(&sent_other),
                    ..base(&one_scan, Some(&changes))
                },
                want: Step::Update,
            },
            Case {
                name: "synced: clean up cache objects no image needs",
                facts: Facts {
                    unneeded_cache: &stale,
                    planned_missing: &prefetch,
                    ..base(&ready, Some(&empty))
                },
                want: Step::Synced {
                    prefetch: vec![id(9)],
                    cleanup: vec![id(7)],
                },
            },
            Case {
                name: "synced: prefetch the planned image",
                facts: Facts {
                    planned_missing: &prefetch,
                    ..base(&ready, Some(&empty))
                },
                want: Step::Synced {
                    prefetch: vec![id(9)],
                    cleanup: vec![],
                },
            },
        ];
        for c in cases {
            assert_eq!(next_step(&c.facts), c.want, "case {:?}", c.name);
        }
    }

    #[test]
    fn plan_needed_only_when_the_decision_reads_it() {
        let sent = |scan_count| Action::Update {
            image: "i".into(),
            scan_count,
        };
        let fetched = Action::Fetch {
            image: "i".into(),
            scan_count: 10,
        };
        let busy = PollResponse {
            update_in_progress: true,
            ..poll(3, 10)
        };
        let fetch_err = PollResponse {
            last_fetch_error: Some("x".into()),
            ..poll(3, 10)
        };
        assert!(needs_plan(&poll(3, 10), None));
        assert!(!needs_plan(&poll(0, 0), None));
        assert!(!needs_plan(&busy, None));
        assert!(!needs_plan(&poll(3, 10), Some(&sent(10))));
        assert!(needs_plan(&poll(3, 11), Some(&sent(10))));
        assert!(!needs_plan(&poll(3, 10), Some(&fetched)));
        assert!(needs_plan(&poll(3, 11), Some(&fetched)));
        assert!(needs_plan(&fetch_err, Some(&fetched)));
    }

    #[test]
    fn backoff_table() {
        let (b, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        let cases = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 4),
            (6, 32),
            (7, 60),
            (40, 60),
            (u32::MAX, 60),
        ];
        for (failures, secs) in cases {
            assert_eq!(
                backoff(failures, b, cap),
                Duration::from_secs(secs),
                "{failures}"
            );
        }
    }

    #[test]
    fn an_error_is_shown_only_with_the_status_it_explains() {
        use Status::*;
        let e = |s: &str| Some(s.to_string());
        let cases = [
            // (previous, now, this cycle's error, shown before) → shown after
            (ConnectionRefused, Fetching, None, e("refused"), None),
            (ConnectionRefused, Updating, None, e("refused"), None),
            (ConnectionRefused, Synced, None, e("refused"), None),
            (
                ConnectionRefused,
                ConnectionRefused,
                None,
                e("refused"),
                e("refused"),
            ),
            (
                UpdateFailed,
                UpdateFailed,
                e("disk full"),
                e("old"),
                e("disk full"),
            ),
            (Synced, Unreachable, e("reset"), None, e("reset")),
            (
                UpdatesDisabled,
                UpdatesDisabled,
                None,
                e("freeze"),
                e("freeze"),
            ),
        ];
        for (prev, now, err, shown, want) in cases {
            assert_eq!(
                shown_error(prev, now, err.clone(), shown.clone()),
                want,
                "{prev:?} -> {now:?} with {err:?}, showing {shown:?}"
            );
        }
    }

    /// The scan a held poll waits for is the one that settles the action: with it,
    /// `needs_plan` looks at the plan again; one short of it, it does not.
    #[test]
    fn the_awaited_scan_is_the_one_that_settles_the_action() {
        assert_eq!(awaited_scan(None), None);
        for action in [
            Action::Fetch {
                image: "img/2".into(),
                scan_count: 7,
            },
            Action::Update {
                image: "img/2".into(),
                scan_count: 7,
            },
        ] {
            let target = awaited_scan(Some(&action)).unwrap();
            assert!(target > 7, "{action:?}");
            assert!(
                !needs_plan(&poll(3, target - 1), Some(&action)),
                "{action:?}"
            );
            assert!(needs_plan(&poll(3, target), Some(&action)), "{action:?}");
        }
    }
}
