//! The dominator's short memory, for the live pages: machines per status over the last
//! hour, the latest status changes, and per machine a timeline of events. Every part is a
//! ring with a fixed bound, so memory does not grow with uptime:
//! - samples: at most `SAMPLES` (one per `BUCKET_SECS` bucket, holding the peak count of
//!   each status seen in it: an hour at 5 s), about 100 bytes each;
//! - recent changes: at most `RECENT` fleet-wide;
//! - per machine: at most `TIMELINE` events, each naming at most `PATHS_KEPT` paths.
//!
//! No I/O and no clock: callers pass the time. The chart is drawn here too (`chart_svg`),
//! as an SVG string built from the samples, so pages need no external asset.

use crate::decision::Status;
use model::api::UpdateResult;
use model::UpdatePlan;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;

/// Seconds per sample bucket.
pub const BUCKET_SECS: u64 = 5;
/// The chart's window, in seconds.
pub const WINDOW_SECS: u64 = 3600;
/// Most samples kept (the window at one per bucket).
pub const SAMPLES: usize = (WINDOW_SECS / BUCKET_SECS) as usize;
/// Most fleet-wide status changes kept.
pub const RECENT: usize = 20;
/// Most events kept per machine.
pub const TIMELINE: usize = 32;
/// Most paths one event names (the rest are counted).
pub const PATHS_KEPT: usize = 20;

/// Machines per status in one bucket: the peak of each status seen in it.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Start of the bucket (Unix seconds, a multiple of `BUCKET_SECS`).
    pub at: u64,
    /// Peak machines per status (`Status::ALL` order).
    pub peak: [u32; Status::ALL.len()],
}

/// A machine's status changed.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    pub at: u64,
    pub host: String,
    pub from: &'static str,
    pub to: &'static str,
}

/// What happened to a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Its status changed (to a failing status: a failure, with the error).
    Status,
    Failure,
    /// An update sent to put drift back (same image as the machine holds).
    DriftCorrected,
    /// An update sent to move the machine to another image (or a first one).
    Update,
    /// The machine reported an update finished.
    UpdateFinished,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Failure => "failure",
            EventKind::DriftCorrected => "drift corrected",
            EventKind::Update => "update",
            EventKind::UpdateFinished => "update finished",
        }
    }
}

/// One event of a machine's timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub at: u64,
    pub kind: EventKind,
    /// One line: what happened.
    pub text: String,
    /// The paths it touched (at most `PATHS_KEPT`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Paths touched beyond those named.
    #[serde(skip_serializing_if = "is_zero")]
    pub more_paths: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The whole memory (behind one lock in `Fleet`).
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    recent: VecDeque<Change>,
    timelines: BTreeMap<String, VecDeque<Event>>,
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(v);
}

fn index_of(s: Status) -> usize {
    Status::ALL
        .iter()
        .position(|x| *x == s)
        .expect("every status is in ALL")
}

impl History {
    /// Records the fleet's counts at `now` (raising the peaks of the current bucket).
    pub fn sample(&mut self, now: u64, counts: &BTreeMap<Status, usize>) {
        let at = now - now % BUCKET_SECS;
        if self.samples.back().is_none_or(|s| s.at != at) {
            let s = Sample {
                at,
                peak: [0; Status::ALL.len()],
            };
            push_bounded(&mut self.samples, s, SAMPLES);
        }
        let last = self.samples.back_mut().expect("just pushed");
        for (s, n) in counts {
            let i = index_of(*s);
            last.peak[i] = last.peak[i].max(*n as u32);
        }
    }

    /// Records a status change of `host` (fleet-wide and in its timeline).
    pub fn status_changed(
        &mut self,
        now: u64,
        host: &str,
        from: Status,
        to: Status,
        error: Option<&str>,
    ) {
        push_bounded(
            &mut self.recent,
            Change {
                at: now,
                host: host.to_string(),
                from: from.name(),
                to: to.name(),
            },
            RECENT,
        );
        let (kind, text) = match error {
            Some(e) if to.backs_off() => (EventKind::Failure, format!("{}: {e}", to.name())),
            _ => (
                EventKind::Status,
                format!("{} → {}", from.name(), to.name()),
            ),
        };
        self.event(
            host,
            Event {
                at: now,
                kind,
                text,
                paths: Vec::new(),
                more_paths: 0,
            },
        );
    }

    /// Records an update sent to `host` with `plan`.
    pub fn update_sent(&mut self, now: u64, host: &str, plan: &UpdatePlan) {
        self.event(host, update_event(now, plan));
    }

    /// Records an update `host` reported finished (`duration_s`: since it was sent, when
    /// known).
    pub fn update_finished(&mut self, host: &str, u: &UpdateResult, duration_s: Option<u64>) {
        self.event(host, finished_event(u, duration_s));
    }

    /// Adds `e` to `host`'s timeline.
    pub fn event(&mut self, host: &str, e: Event) {
        let t = self.timelines.entry(host.to_string()).or_default();
        push_bounded(t, e, TIMELINE);
    }

    /// Forgets machines no longer in the MDB.
    pub fn retain_hosts(&mut self, keep: impl Fn(&str) -> bool) {
        self.timelines.retain(|h, _| keep(h));
    }

    /// The samples of the last `WINDOW_SECS` before `now`, oldest first.
    pub fn samples(&self, now: u64) -> Vec<Sample> {
        let from = now.saturating_sub(WINDOW_SECS);
        self.samples
            .iter()
            .filter(|s| s.at >= from)
            .cloned()
            .collect()
    }

    /// The latest status changes, newest first.
    pub fn recent(&self) -> Vec<Change> {
        self.recent.iter().rev().cloned().collect()
    }

    /// `host`'s events, newest first.
    pub fn timeline(&self, host: &str) -> Vec<Event> {
        self.timelines
            .get(host)
            .map(|t| t.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// Every path `plan` touches, in plan order: made, linked, changed, deleted.
pub fn plan_paths(plan: &UpdatePlan) -> Vec<String> {
    let made = plan
        .dirs_to_make
        .iter()
        .chain(&plan.inodes_to_make)
        .map(|p| &p.path);
    let linked = plan.hardlinks_to_make.iter().map(|h| &h.path);
    let changed = plan.inodes_to_change.iter().map(|c| &c.path);
    made.chain(linked)
        .chain(changed)
        .chain(&plan.paths_to_delete)
        .map(|p| p.display())
        .collect()
}

/// How many changes `plan` makes (made, linked, changed, deleted).
pub fn plan_size(plan: &UpdatePlan) -> u64 {
    (plan.dirs_to_make.len()
        + plan.inodes_to_make.len()
        + plan.hardlinks_to_make.len()
        + plan.inodes_to_change.len()
        + plan.paths_to_delete.len()) as u64
}

fn update_event(now: u64, plan: &UpdatePlan) -> Event {
    let drift = !plan.previous_image.is_empty() && plan.previous_image == plan.image_name;
    let mut text = if drift {
        format!(
            "put {} back to image {}",
            plural(plan_size(plan), "path"),
            plan.image_name
        )
    } else if plan.previous_image.is_empty() {
        format!("update to image {} (rebuild)", plan.image_name)
    } else {
        format!("update from {} to {}", plan.previous_image, plan.image_name)
    };
    let _ = write!(
        text,
        ": {} made, {} linked, {} changed, {} deleted, {} fetched",
        plan.dirs_to_make.len() + plan.inodes_to_make.len(),
        plan.hardlinks_to_make.len(),
        plan.inodes_to_change.len(),
        plan.paths_to_delete.len(),
        plural(plan.objects_to_fetch.len() as u64, "object"),
    );
    let mut paths = plan_paths(plan);
    let more_paths = paths.len().saturating_sub(PATHS_KEPT);
    paths.truncate(PATHS_KEPT);
    Event {
        at: now,
        kind: if drift {
            EventKind::DriftCorrected
        } else {
            EventKind::Update
        },
        text,
        paths,
        more_paths,
    }
}

fn finished_event(u: &UpdateResult, duration_s: Option<u64>) -> Event {
    let mut text = format!("image {}", u.image_name);
    if let Some(d) = duration_s {
        let _ = write!(text, "; took {d} s");
    }
    let _ = write!(text, "; activation {:.0} ms", u.activation_ms);
    if !u.trigger_actions.is_empty() {
        let _ = write!(text, "; triggers run: {}", u.trigger_actions.join(", "));
    }
    if !u.errors.is_empty() {
        let _ = write!(text, "; errors: {}", u.errors.join("; "));
    }
    if !u.trigger_failures.is_empty() {
        let _ = write!(
            text,
            "; trigger failures: {}",
            u.trigger_failures.join("; ")
        );
    }
    if let Some(h) = &u.hook_failure {
        let _ = write!(text, "; {h}");
    }
    let failed = !u.errors.is_empty() || !u.trigger_failures.is_empty() || u.hook_failure.is_some();
    Event {
        at: u.finished_at,
        kind: if failed {
            EventKind::Failure
        } else {
            EventKind::UpdateFinished
        },
        text,
        paths: Vec::new(),
        more_paths: 0,
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Colour of a status's line in the chart.
fn colour(s: Status) -> &'static str {
    match s {
        Status::Synced => "#080",
        Status::Fetching => "#d80",
        Status::Updating => "#06c",
        Status::WaitingForScan => "#89c",
        Status::UpdatesDisabled | Status::ImageUndefined | Status::SubNotReady => "#888",
        Status::WaitingToPoll => "#bbb",
        _ => "#c00",
    }
}

/// Chart size in SVG units.
const W: f64 = 720.0;
const H: f64 = 180.0;

/// Shortest span the chart's x axis covers (a young dominator's first minute).
const MIN_SPAN: u64 = 60;

/// The chart of machines per status over the window ending at `now` (the last hour, or
/// since the first sample when that is shorter, at least a minute): one step line per
/// status seen in it, x = time, y = machines; the legend names each line with the number
/// of machines in that status now (`current`).
pub fn chart_svg(samples: &[Sample], now: u64, current: &BTreeMap<Status, usize>) -> String {
    let first = samples.first().map_or(now, |s| s.at);
    let span = now.saturating_sub(first).clamp(MIN_SPAN, WINDOW_SECS);
    let from = now.saturating_sub(span) as f64;
    let top = samples
        .iter()
        .flat_map(|s| s.peak)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |t: u64| ((t as f64 - from) / span as f64 * W).clamp(0.0, W);
    let y = |n: u32| H - n as f64 / top * (H - 10.0);
    let mut svg = format!(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\"><rect width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/>",
        W + 170.0, H + 20.0, W + 170.0, H + 20.0
    );
    let since = if span >= WINDOW_SECS {
        "1 h ago".to_string()
    } else if span >= 120 {
        format!("{} min ago", span / 60)
    } else {
        format!("{span} s ago")
    };
    let _ = write!(svg, "<text x=\"2\" y=\"{}\" font-size=\"11\">{since}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">now</text><text x=\"4\" y=\"12\" font-size=\"11\">{top}</text>", H + 14.0, W, H + 14.0);
    let mut legend = 0;
    for (i, s) in Status::ALL.iter().enumerate() {
        if samples.iter().all(|p| p.peak[i] == 0) {
            continue;
        }
        let mut pts = String::new();
        for (k, p) in samples.iter().enumerate() {
            let end = samples.get(k + 1).map_or(now, |n| n.at);
            let _ = write!(
                pts,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(p.at),
                y(p.peak[i]),
                x(end),
                y(p.peak[i])
            );
        }
        let c = colour(*s);
        let _ = write!(
            svg,
            "<polyline data-status=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{c}\">{} ({})</text>",
            s.name(),
            pts.trim_end(),
            W + 8.0,
            16 + legend * 16,
            s.name(),
            current.get(s).copied().unwrap_or(0)
        );
        legend += 1;
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(v: &[(Status, usize)]) -> BTreeMap<Status, usize> {
        v.iter().copied().collect()
    }

    #[test]
    fn samples_keep_the_peak_of_each_bucket_and_are_bounded() {
        let mut h = History::default();
        h.sample(100, &counts(&[(Status::Synced, 3)]));
        h.sample(101, &counts(&[(Status::Synced, 1), (Status::Updating, 2)]));
        h.sample(102, &counts(&[(Status::Synced, 3)]));
        let s = h.samples(102);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].at, 100);
        assert_eq!(s[0].peak[index_of(Status::Synced)], 3);
        assert_eq!(s[0].peak[index_of(Status::Updating)], 2);
        for t in 0..(SAMPLES as u64 * 3) {
            h.sample(200 + t * BUCKET_SECS, &counts(&[(Status::Synced, 1)]));
        }
        assert_eq!(h.samples.len(), SAMPLES);
    }

    #[test]
    fn rings_are_bounded() {
        let mut h = History::default();
        for i in 0..100 {
            h.status_changed(i, "m", Status::Synced, Status::Updating, None);
        }
        assert_eq!(h.recent().len(), RECENT);
        assert_eq!(h.timeline("m").len(), TIMELINE);
        assert_eq!(h.timeline("m")[0].at, 99, "newest first");
        h.retain_hosts(|_| false);
        assert!(h.timeline("m").is_empty());
    }

    #[test]
    fn a_failing_status_is_a_failure_event_with_its_error() {
        let mut h = History::default();
        h.status_changed(
            1,
            "m",
            Status::Synced,
            Status::ConnectionRefused,
            Some("refused"),
        );
        h.status_changed(2, "m", Status::ConnectionRefused, Status::Synced, None);
        let t = h.timeline("m");
        assert_eq!(t[1].kind, EventKind::Failure);
        assert_eq!(t[1].text, "connection refused: refused");
        assert_eq!(t[0].text, "connection refused → synced");
    }

    #[test]
    fn an_update_of_the_same_image_is_a_drift_correction_naming_paths() {
        let mut plan = UpdatePlan {
            image_name: "app/1".into(),
            previous_image: "app/1".into(),
            ..Default::default()
        };
        for i in 0..25 {
            plan.paths_to_delete
                .push(model::FsPath::new(format!("/d{i}")).unwrap());
        }
        let e = update_event(5, &plan);
        assert_eq!(e.kind, EventKind::DriftCorrected);
        assert!(
            e.text.starts_with("put 25 paths back to image app/1"),
            "{}",
            e.text
        );
        assert_eq!(e.paths.len(), PATHS_KEPT);
        assert_eq!(e.paths[0], "/d0");
        assert_eq!(e.more_paths, 5);
        plan.previous_image = "app/0".into();
        assert_eq!(update_event(5, &plan).kind, EventKind::Update);
    }

    #[test]
    fn the_chart_draws_one_line_per_status_seen() {
        let mut h = History::default();
        h.sample(1000, &counts(&[(Status::Synced, 2)]));
        h.sample(1010, &counts(&[(Status::Updating, 2)]));
        let svg = chart_svg(&h.samples(1020), 1020, &counts(&[(Status::Updating, 2)]));
        assert!(svg.starts_with("<svg id=\"chart\""));
        assert!(svg.contains("data-status=\"synced\""));
        assert!(svg.contains("data-status=\"updating\""));
        assert!(!svg.contains("data-status=\"fetching\""));
        assert!(svg.contains(">updating (2)</text>"), "{svg}");
        assert!(svg.contains(">synced (0)</text>"), "{svg}");
        assert!(
            svg.contains(">60 s ago</text>"),
            "a young chart spans a minute: {svg}"
        );
        assert_eq!(
            chart_svg(&[], 10, &BTreeMap::new())
                .matches("polyline")
                .count(),
            0
        );
    }
}
