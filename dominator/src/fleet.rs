//! What the dominator knows about its fleet, shared between the herd (which writes it) and
//! the status pages, JSON API, metrics and control RPCs (which read it or flip the global
//! switch).

use crate::decision::Status;
use crate::history::History;
use model::api::UpdateResult;
use model::UpdatePlan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One machine as the status page and the API show it.
#[derive(Clone, Debug, Serialize)]
pub struct MachineReport {
    pub host: String,
    /// The address dialled (`HOST:PORT`).
    pub address: String,
    /// `RequiredImage` as the MDB names it: an image, or an image directory (a stream).
    pub required_image: String,
    pub planned_image: String,
    /// The image `required_image` stands for: itself, or the newest image of the stream
    /// it names (`None` while no such image is known).
    pub resolved_required_image: Option<String>,
    /// The image `planned_image` stands for, likewise.
    pub resolved_planned_image: Option<String>,
    pub status: Status,
    /// `status` as the human name (`synced`, `update failed`, …).
    pub status_name: &'static str,
    pub last_error: Option<String>,
    /// Unix seconds of the last poll that found the machine in sync.
    pub last_synced: Option<u64>,
    /// Unix seconds of the last successful poll.
    pub last_poll: Option<u64>,
    pub generation: u64,
    pub scan_count: u64,
    pub polls: u64,
    /// Size of the last poll reply in bytes.
    pub last_poll_bytes: u64,
    pub consecutive_failures: u32,
    /// What the last update the machine reports did.
    pub last_update: Option<UpdateResult>,
    /// State paths (the image's state lines) whose content differs from the image's seed,
    /// as of the last plan computed: visible, never corrected.
    pub state_diverged: u64,
    /// Changes the last plan computed would make (paths made, linked, changed, deleted):
    /// how far the machine differs from its image, shown even while updates are disabled.
    #[serde(default)]
    pub pending_changes: u64,
    /// The last plan computed for the machine (present in per-machine views).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "plan_ser")]
    pub last_plan: Option<Arc<UpdatePlan>>,
}

fn plan_ser<S: serde::Serializer>(p: &Option<Arc<UpdatePlan>>, s: S) -> Result<S::Ok, S::Error> {
    p.as_deref().serialize(s)
}

/// An MDB image name as the pages show it: `NAME`, or `NAME → IMAGE (stream)` when it
/// stands for another image, or `NAME (no image yet)` when a name resolves to none.
pub fn shown_image(name: &str, resolved: Option<&str>) -> String {
    match resolved {
        _ if name.is_empty() => String::new(),
        Some(r) if r == name => name.to_string(),
        Some(r) => format!("{name} \u{2192} {r} (stream)"),
        None => name.to_string(),
    }
}

impl MachineReport {
    /// `RequiredImage` as the pages show it (see `shown_image`).
    pub fn required_shown(&self) -> String {
        shown_image(
            &self.required_image,
            self.resolved_required_image.as_deref(),
        )
    }

    pub fn new(host: &str) -> MachineReport {
        MachineReport {
            host: host.to_string(),
            address: String::new(),
            required_image: String::new(),
            planned_image: String::new(),
            resolved_required_image: None,
            resolved_planned_image: None,
            status: Status::WaitingToPoll,
            status_name: Status::WaitingToPoll.name(),
            last_error: None,
            last_synced: None,
            last_poll: None,
            generation: 0,
            scan_count: 0,
            polls: 0,
            last_poll_bytes: 0,
            consecutive_failures: 0,
            last_update: None,
            state_diverged: 0,
            pending_changes: 0,
            last_plan: None,
        }
    }
}

/// Why updates are stopped fleet-wide.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GlobalDisable {
    pub reason: String,
    /// Who disabled them (certificate name, `startup`, or empty when insecure).
    pub by: String,
    pub since: u64,
}

/// Fleet-wide counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub polls: AtomicU64,
    /// Polls that fetched the whole tree.
    pub full_polls: AtomicU64,
    pub poll_bytes: AtomicU64,
    pub poll_failures: AtomicU64,
    pub fetches: AtomicU64,
    pub updates: AtomicU64,
    pub cleanups: AtomicU64,
    pub mdb_loads: AtomicU64,
    pub mdb_errors: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// The shared state. Every std Mutex here is held only to copy in or out, never across
/// an `.await`.
pub struct Fleet {
    pub machines: Mutex<BTreeMap<String, MachineReport>>,
    pub disabled: Mutex<Option<GlobalDisable>>,
    /// The last MDB problem (file unreadable or invalid); `None` once a good file loads.
    pub mdb_error: Mutex<Option<String>>,
    pub mdb_path: String,
    pub image_server: String,
    pub insecure: bool,
    pub started: u64,
    pub counters: Counters,
    /// Where the fleet-wide brake is kept across restarts (`None`: not kept).
    pub brake_file: Option<std::path::PathBuf>,
    /// The last hour, for the live pages (bounded; see `history`). Taken after
    /// `machines` when both are held, never before.
    pub history: Mutex<History>,
    /// Machines per status, kept as reports are added, removed and change status (so a
    /// status change costs O(1), not a walk over the fleet). Taken only while `machines`
    /// is held.
    pub tally: Mutex<BTreeMap<Status, usize>>,
}

impl Fleet {
    pub fn new(mdb_path: &str, image_server: &str, insecure: bool) -> Fleet {
        Fleet {
            machines: Mutex::new(BTreeMap::new()),
            disabled: Mutex::new(None),
            mdb_error: Mutex::new(None),
            mdb_path: mdb_path.to_string(),
            image_server: image_server.to_string(),
            insecure,
            started: disk::clock::unix_now(),
            counters: Counters::default(),
            brake_file: None,
            history: Mutex::new(History::default()),
            tally: Mutex::new(BTreeMap::new()),
        }
    }

    /// Keeps the fleet-wide brake in `path` (written when set, removed when released), and
    /// takes it from there now if a previous run left it set.
    pub fn with_brake_file(mut self, path: std::path::PathBuf) -> Fleet {
        if let Some(d) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<GlobalDisable>(&b).ok())
        {
            tracing::warn!(reason = %d.reason, by = %d.by, file = %path.display(), "updates stay disabled fleet-wide, as before the restart");
            *self.disabled.get_mut().expect("fleet lock") = Some(d);
        }
        self.brake_file = Some(path);
        self
    }

    /// Every machine, host-sorted, without plans.
    pub fn reports(&self) -> Vec<MachineReport> {
        let m = self.machines.lock().expect("fleet lock");
        let mut v: Vec<MachineReport> = m
            .values()
            .map(|r| MachineReport {
                last_plan: None,
                ..r.clone()
            })
            .collect();
        v.sort_by(|a, b| model::image::version_cmp(&a.host, &b.host));
        v
    }

    /// One machine, with its last plan.
    pub fn report(&self, host: &str) -> Option<MachineReport> {
        let m = self.machines.lock().expect("fleet lock");
        m.get(host)
            .or_else(|| m.values().find(|r| r.host.eq_ignore_ascii_case(host)))
            .cloned()
    }

    /// Machines per status, every status listed.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut c: BTreeMap<&'static str, usize> =
            Status::ALL.iter().map(|s| (s.name(), 0)).collect();
        for r in self.machines.lock().expect("fleet lock").values() {
            *c.entry(r.status.name()).or_default() += 1;
        }
        c
    }

    /// Machines per status, only the statuses some machine has.
    pub fn status_counts(&self) -> BTreeMap<Status, usize> {
        status_counts(&self.machines.lock().expect("fleet lock"))
    }

    /// Moves one machine in the tally from status `from` to `to` (`None`: added or
    /// removed). Call with `machines` held, as the report changes.
    pub fn tally_moved(&self, from: Option<Status>, to: Option<Status>) {
        let mut t = self.tally.lock().expect("tally lock");
        if let Some(f) = from {
            if let Some(n) = t.get_mut(&f) {
                *n -= 1;
                if *n == 0 {
                    t.remove(&f);
                }
            }
        }
        if let Some(s) = to {
            *t.entry(s).or_default() += 1;
        }
    }

    /// Machines per status as tallied (the statuses some machine has): what
    /// `status_counts` computes, without walking the fleet.
    pub fn tallied(&self) -> BTreeMap<Status, usize> {
        self.tally.lock().expect("tally lock").clone()
    }

    /// Adds a sample of the current counts to the history (the chart's data).
    pub fn sample(&self, now: u64) {
        let counts = self.status_counts();
        self.history
            .lock()
            .expect("history lock")
            .sample(now, &counts);
    }

    /// Machines whose last update reported trigger (service command) failures.
    pub fn with_trigger_failures(&self) -> usize {
        let machines = self.machines.lock().expect("fleet lock");
        machines
            .values()
            .filter(|r| {
                r.last_update
                    .as_ref()
                    .is_some_and(|u| !u.trigger_failures.is_empty())
            })
            .count()
    }

    pub fn global_disable(&self) -> Option<GlobalDisable> {
        self.disabled.lock().expect("fleet lock").clone()
    }

    pub fn set_global_disable(&self, d: Option<GlobalDisable>) {
        match &d {
            Some(d) => {
                tracing::warn!(reason = %d.reason, by = %d.by, "updates disabled fleet-wide")
            }
            None => tracing::warn!("updates enabled fleet-wide"),
        }
        if let Some(path) = &self.brake_file {
            let kept = match &d {
                Some(d) => disk::fsutil::write_atomic(
                    path,
                    &serde_json::to_vec(d).expect("brake serializes"),
                ),
                None => match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            if let Err(e) = kept {
                tracing::error!(file = %path.display(), "the fleet-wide brake will not survive a restart: {e}");
            }
        }
        *self.disabled.lock().expect("fleet lock") = d;
    }

    pub fn mdb_error(&self) -> Option<String> {
        self.mdb_error.lock().expect("fleet lock").clone()
    }
}

/// Machines per status in `machines`, only the statuses present.
pub fn status_counts(machines: &BTreeMap<String, MachineReport>) -> BTreeMap<Status, usize> {
    let mut c = BTreeMap::new();
    for r in machines.values() {
        *c.entry(r.status).or_default() += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_follows_moves_and_forgets_empty_statuses() {
        let f = Fleet::new("mdb.json", "is:6971", true);
        f.tally_moved(None, Some(Status::WaitingToPoll));
        f.tally_moved(None, Some(Status::WaitingToPoll));
        f.tally_moved(Some(Status::WaitingToPoll), Some(Status::Synced));
        let want: BTreeMap<Status, usize> =
            [(Status::WaitingToPoll, 1), (Status::Synced, 1)].into();
        assert_eq!(f.tallied(), want);
        f.tally_moved(Some(Status::WaitingToPoll), None);
        assert_eq!(f.tallied(), [(Status::Synced, 1)].into());
    }

    #[test]
    fn the_fleet_wide_brake_survives_a_restart_until_released() {
        let d = tempfile::tempdir().unwrap();
        let mdb = d.path().join("mdb.json");
        let file = crate::brake_file(&mdb);
        assert_eq!(file, d.path().join("mdb.json.updates-disabled"));
        let start = || Fleet::new("mdb.json", "is:6971", true).with_brake_file(file.clone());
        let f = start();
        assert!(f.global_disable().is_none());
        f.set_global_disable(Some(GlobalDisable {
            reason: "maintenance window".into(),
            by: "admin".into(),
            since: 7,
        }));
        drop(f);
        let again = start()
            .global_disable()
            .expect("still disabled after a restart");
        assert_eq!(
            (again.reason.as_str(), again.by.as_str()),
            ("maintenance window", "admin")
        );
        start().set_global_disable(None);
        assert!(!file.exists());
        assert!(start().global_disable().is_none());
    }
}
