//! The dominator's HTTP surface: the status page (`/`, `/machine/<host>`), the JSON API
//! under `/api/`, `/metrics`, and the control RPCs `Dominator.DisableUpdates` and
//! `Dominator.EnableUpdates` (authorized per method by `wire::http::serve`).

use crate::decision::Status;
use crate::fleet::{Fleet, GlobalDisable, MachineReport};
use crate::history::{chart_svg, Change, Event, Sample};
use crate::preview;
use axum::extract::{Path, State};
use axum::response::{Html, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use disk::clock::unix_now;
use model::api::Empty;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wire::http::{ApiError, Caller, Json, INSECURE_BANNER};
use wire::pages::{escape as esc, Metrics};

pub const DISABLE_UPDATES: &str = "Dominator.DisableUpdates";
pub const ENABLE_UPDATES: &str = "Dominator.EnableUpdates";

/// Body of `Dominator.DisableUpdates`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DisableUpdatesRequest {
    /// Why (mandatory; shown on the status page and logged with the caller).
    pub reason: String,
}

/// The fleet overview of `/api/fleet`.
#[derive(Serialize)]
pub struct FleetView {
    pub counts: BTreeMap<&'static str, usize>,
    pub machines: Vec<MachineReport>,
    pub updates_disabled: Option<GlobalDisable>,
    pub mdb_error: Option<String>,
    pub mdb: String,
    pub image_server: String,
}

/// The router of every page and RPC.
pub fn router(fleet: Arc<Fleet>) -> Router {
    status_router(fleet.clone()).merge(
        Router::new()
            .route(&format!("/rpc/{DISABLE_UPDATES}"), post(disable_updates))
            .route(&format!("/rpc/{ENABLE_UPDATES}"), post(enable_updates))
            .with_state(fleet),
    )
}

/// The read-only router of `--status-listen`: the pages, `/api/` reads and `/metrics`,
/// never an RPC.
pub fn status_router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/machine/{host}", get(machine_page))
        .route("/api/fleet", get(api_fleet))
        .route("/api/machines", get(api_machines))
        .route("/api/machines/{host}", get(api_machine))
        .route("/api/history", get(api_history))
        .route("/metrics", get(metrics))
        .with_state(fleet)
}

/// The chart's samples and the latest status changes of `/api/history`.
#[derive(Serialize)]
pub struct HistoryView {
    /// Status names in the order of each sample's `peak`.
    pub statuses: Vec<&'static str>,
    pub bucket_secs: u64,
    pub samples: Vec<Sample>,
    pub recent: Vec<Change>,
}

async fn api_history(State(fleet): State<Arc<Fleet>>) -> axum::Json<HistoryView> {
    let h = fleet.history.lock().expect("history lock");
    axum::Json(HistoryView {
        statuses: Status::ALL.iter().map(|s| s.name()).collect(),
        bucket_secs: crate::history::BUCKET_SECS,
        samples: h.samples(unix_now()),
        recent: h.recent(),
    })
}

fn fleet_view(fleet: &Fleet) -> FleetView {
    FleetView {
        counts: fleet.counts(),
        machines: fleet.reports(),
        updates_disabled: fleet.global_disable(),
        mdb_error: fleet.mdb_error(),
        mdb: fleet.mdb_path.clone(),
        image_server: fleet.image_server.clone(),
    }
}

async fn api_fleet(State(fleet): State<Arc<Fleet>>) -> axum::Json<FleetView> {
    axum::Json(fleet_view(&fleet))
}

async fn api_machines(State(fleet): State<Arc<Fleet>>) -> axum::Json<Vec<MachineReport>> {
    axum::Json(fleet.reports())
}

/// One machine with its last plan and that plan as text.
#[derive(Serialize)]
pub struct MachineView {
    #[serde(flatten)]
    pub report: MachineReport,
    pub plan_text: Option<String>,
    /// The machine's events, newest first (at most `history::TIMELINE`).
    pub timeline: Vec<Event>,
}

async fn api_machine(
    State(fleet): State<Arc<Fleet>>,
    Path(host): Path<String>,
) -> Result<axum::Json<MachineView>, ApiError> {
    let report = fleet
        .report(&host)
        .ok_or_else(|| ApiError::NotFound(format!("no machine {host:?} in the MDB")))?;
    let plan_text = report
        .last_plan
        .as_ref()
        .map(|p| preview::describe(&report.host, p));
    let timeline = fleet
        .history
        .lock()
        .expect("history lock")
        .timeline(&report.host);
    Ok(axum::Json(MachineView {
        report,
        plan_text,
        timeline,
    }))
}

async fn disable_updates(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<DisableUpdatesRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    let reason = req.reason.trim();
    if reason.is_empty() {
        return Err(ApiError::BadRequest(
            "a reason is required to disable updates".into(),
        ));
    }
    fleet.set_global_disable(Some(GlobalDisable {
        reason: reason.to_string(),
        by: caller.name,
        since: unix_now(),
    }));
    Ok(axum::Json(Empty {}))
}

async fn enable_updates(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
) -> axum::Json<Empty> {
    tracing::warn!(by = %caller.name, "enable updates requested");
    fleet.set_global_disable(None);
    axum::Json(Empty {})
}

async fn metrics(State(fleet): State<Arc<Fleet>>) -> Response {
    let mut m = Metrics::new();
    m.gauge_by(
        "dominator_machines",
        "Machines per status",
        "status",
        fleet
            .counts()
            .into_iter()
            .map(|(s, n)| (s.to_string(), n as u64)),
    )
    .gauge(
        "dominator_machines_with_trigger_failures",
        "Machines whose last update had a failing service command",
        fleet.with_trigger_failures() as u64,
    );
    let c = &fleet.counters;
    for (name, help, v) in [
        ("dominator_polls", "Polls sent", &c.polls),
        (
            "dominator_full_polls",
            "Polls that fetched the whole tree",
            &c.full_polls,
        ),
        (
            "dominator_poll_bytes",
            "Bytes of poll replies",
            &c.poll_bytes,
        ),
        (
            "dominator_poll_failures",
            "Polls that failed",
            &c.poll_failures,
        ),
        ("dominator_fetches", "Fetch requests sent", &c.fetches),
        ("dominator_updates", "Update requests sent", &c.updates),
        (
            "dominator_cleanups",
            "Cleanup requests sent (cache objects no wanted image needs)",
            &c.cleanups,
        ),
        ("dominator_mdb_loads", "MDB files loaded", &c.mdb_loads),
        ("dominator_mdb_errors", "MDB files refused", &c.mdb_errors),
    ] {
        m.counter(name, help, v.load(Ordering::Relaxed));
    }
    m.gauge(
        "dominator_updates_disabled",
        "1 while updates are disabled fleet-wide",
        u64::from(fleet.global_disable().is_some()),
    );
    m.response()
}

fn url_component(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

/// "3m ago"-style age of a Unix time.
pub fn ago(t: Option<u64>, now: u64) -> String {
    let Some(t) = t else {
        return "never".into();
    };
    let d = now.saturating_sub(t);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

fn status_class(s: Status) -> &'static str {
    match s {
        Status::Synced => "ok",
        Status::Fetching | Status::Updating | Status::WaitingForScan | Status::WaitingToPoll => {
            "busy"
        }
        Status::UpdatesDisabled | Status::ImageUndefined | Status::SubNotReady => "idle",
        _ => "bad",
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}\
th{background:#eee}.ok{color:#070}.busy{color:#b60}.bad{color:#c00;font-weight:bold}.idle{color:#666}\
.banner{background:#fc0;padding:6px;font-weight:bold}.error{background:#c00;color:#fff;padding:6px}\
pre{background:#f6f6f6;padding:8px}";

/// Keeps a page current without a reload: every 2 s, fetches the page again and puts its
/// `#live` part in place (counting successes in `<html data-updates>`). Inline: the pages
/// load nothing from elsewhere.
const LIVE_SCRIPT: &str = "(function(){let n=0;setInterval(async function(){try{\
const r=await fetch(location.href,{cache:'no-store'});if(!r.ok)return;\
const d=new DOMParser().parseFromString(await r.text(),'text/html');\
const fresh=d.getElementById('live'),old=document.getElementById('live');\
if(fresh&&old){old.replaceWith(fresh);document.documentElement.dataset.updates=++n;}\
}catch(e){}},2000);})();";

fn page(fleet: &Fleet, title: &str, body: &str) -> Html<String> {
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(title)
    );
    if fleet.insecure {
        s.push_str(INSECURE_BANNER);
        s.push('\n');
    }
    s.push_str("<div id=\"live\">\n");
    if let Some(d) = fleet.global_disable() {
        let _ = writeln!(
            s,
            "<p class=\"banner\" id=\"disabled\">Updates are disabled fleet-wide: {} (by {}, {})</p>",
            esc(&d.reason),
            esc(if d.by.is_empty() { "unknown" } else { &d.by }),
            ago(Some(d.since), unix_now())
        );
    }
    if let Some(e) = fleet.mdb_error() {
        let _ = writeln!(
            s,
            "<p class=\"error\" id=\"mdb-error\">MDB not loaded (previous list kept): {}</p>",
            esc(&e)
        );
    }
    s.push_str(body);
    s.push_str("</div>\n<script>");
    s.push_str(LIVE_SCRIPT);
    s.push_str("</script></body></html>\n");
    Html(s)
}

async fn index(State(fleet): State<Arc<Fleet>>) -> Html<String> {
    let view = fleet_view(&fleet);
    let now = unix_now();
    let mut b = String::new();
    let _ = writeln!(b, "<h1>Dominator</h1>");
    let _ = writeln!(
        b,
        "<p>MDB <code>{}</code> &middot; imageserver <code>{}</code> &middot; {} machines &middot; up {}</p>",
        esc(&view.mdb),
        esc(&view.image_server),
        view.machines.len(),
        ago(Some(fleet.started), now).trim_end_matches(" ago")
    );
    b.push_str("<h2>Machines by status</h2>\n<table id=\"counts\"><tr><th>status</th><th>machines</th></tr>\n");
    for s in Status::ALL {
        let n = view.counts.get(s.name()).copied().unwrap_or(0);
        if n > 0 {
            let _ = writeln!(
                b,
                "<tr><td class=\"{}\">{}</td><td>{n}</td></tr>",
                status_class(s),
                s.name()
            );
        }
    }
    b.push_str("</table>\n");
    b.push_str(&live_sections(&fleet, now));
    b.push_str("<h2>Machines</h2>\n<table id=\"machines\"><tr><th>machine</th><th>required image</th><th>planned image</th><th>status</th><th>last error</th><th>last synced</th></tr>\n");
    for m in &view.machines {
        let _ = writeln!(
            b,
            "<tr><td><a href=\"/machine/{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"{}\">{}{}</td><td>{}</td><td>{}</td></tr>",
            url_component(&m.host),
            esc(&m.host),
            esc(&if m.required_image.is_empty() { "-".to_string() } else { m.required_shown() }),
            esc(&if m.planned_image.is_empty() {
                "-".to_string()
            } else {
                crate::fleet::shown_image(&m.planned_image, m.resolved_planned_image.as_deref())
            }),
            status_class(m.status),
            m.status_name,
            differs(m),
            esc(&error_cell(m)),
            ago(m.last_synced, now)
        );
    }
    b.push_str("</table>\n<p><a href=\"/api/fleet\">JSON</a> &middot; <a href=\"/api/history\">history</a> &middot; <a href=\"/metrics\">metrics</a></p>\n");
    page(&fleet, "Dominator", &b)
}

/// How far a machine that is not being brought in line differs from its image (a drifted
/// machine with updates disabled must not look calm).
fn differs(m: &MachineReport) -> String {
    if m.pending_changes == 0 || m.status.in_progress() || m.status == Status::Synced {
        return String::new();
    }
    format!(
        " <span class=\"differs\">(differs: {} change{})</span>",
        m.pending_changes,
        if m.pending_changes == 1 { "" } else { "s" }
    )
}

/// The overview's live parts: the chart of machines per status over the last hour and
/// the machines whose status changed last.
fn live_sections(fleet: &Fleet, now: u64) -> String {
    let current = fleet.status_counts();
    let h = fleet.history.lock().expect("history lock");
    let mut b = String::from("<h2>The last hour</h2>\n");
    b.push_str(&chart_svg(&h.samples(now), now, &current));
    b.push_str("\n<h2>Latest changes</h2>\n<table id=\"recent\"><tr><th>when</th><th>machine</th><th>from</th><th>to</th></tr>\n");
    for c in h.recent() {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td><a href=\"/machine/{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
            ago(Some(c.at), now),
            url_component(&c.host),
            esc(&c.host),
            c.from,
            c.to
        );
    }
    b.push_str("</table>\n");
    b
}

/// The overview's "last error" cell: the last error, then any failed trigger commands of
/// the last update (a machine can be `synced` while its services failed to restart).
fn error_cell(m: &crate::fleet::MachineReport) -> String {
    let mut parts: Vec<String> = m.last_error.iter().cloned().collect();
    // A failed post hook leaves the machine synced: say so until a later update's hooks
    // succeed (a failed pre hook is already the last error).
    if let Some(f) = m.last_update.as_ref().and_then(|u| u.hook_failure.as_ref()) {
        if !parts.contains(f) {
            parts.push(f.clone());
        }
    }
    if let Some(u) = m
        .last_update
        .as_ref()
        .filter(|u| !u.trigger_failures.is_empty())
    {
        parts.push(format!(
            "triggers failed: {}",
            u.trigger_failures.join("; ")
        ));
    }
    parts.join(" — ")
}

/// The last update's hook runs: the failure line, then one row per run with its ending
/// and last lines of output.
fn hooks_section(u: &model::api::UpdateResult) -> String {
    if u.hooks.is_empty() && u.hook_failure.is_none() {
        return String::new();
    }
    let mut b = String::from("<h2>Hooks of the last update</h2>\n");
    if let Some(f) = &u.hook_failure {
        let _ = writeln!(b, "<p id=\"hook-failure\">{}</p>", esc(f));
    }
    b.push_str("<table id=\"hooks\"><tr><th>phase</th><th>hook</th><th>ended</th><th>ms</th><th>last output</th></tr>\n");
    for r in &u.hooks {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            r.phase.name(),
            esc(&r.name),
            esc(&r.ending()),
            r.duration_ms,
            esc(&r.output.join("\n"))
        );
    }
    b.push_str("</table>\n");
    b
}

fn differs_text(m: &MachineReport) -> String {
    match m.pending_changes {
        0 => String::new(),
        _ if m.status == Status::Synced || m.status.in_progress() => String::new(),
        n => format!(
            " (differs from its image: {n} change{})",
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// The last update as lines; a line whose list is empty is left out (no bare labels).
fn last_update_text(u: &model::api::UpdateResult) -> String {
    let mut t = format!("image {}", u.image_name);
    if u.rebuild {
        t.push_str("\nrebuild: the machine held no image before");
    }
    let lists = [
        ("errors", u.errors.join("; ")),
        ("trigger actions", u.trigger_actions.join(", ")),
        ("trigger failures", u.trigger_failures.join("; ")),
    ];
    for (label, list) in lists {
        if !list.is_empty() {
            let _ = write!(t, "\n{label}: {list}");
        }
    }
    if u.errors.is_empty() && u.trigger_failures.is_empty() {
        t.push_str("\nno errors");
    }
    t
}

/// A machine's timeline, newest first: status changes, updates sent (with the paths a
/// drift correction put back), updates finished, failures.
fn timeline_section(fleet: &Fleet, host: &str, now: u64) -> String {
    let events = fleet.history.lock().expect("history lock").timeline(host);
    let mut b = String::from("<h2>Timeline</h2>\n<table id=\"timeline\"><tr><th>when</th><th>event</th><th>what</th></tr>\n");
    for e in events {
        let mut what = esc(&e.text).to_string();
        if !e.paths.is_empty() {
            what.push_str("<br>");
            let paths: Vec<String> = e
                .paths
                .iter()
                .map(|p| format!("<code>{}</code>", esc(p)))
                .collect();
            what.push_str(&paths.join(" "));
            if e.more_paths > 0 {
                let _ = write!(what, " and {} more", e.more_paths);
            }
        }
        let _ = writeln!(
            b,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{what}</td></tr>",
            e.kind.name().replace(' ', "-"),
            ago(Some(e.at), now),
            e.kind.name()
        );
    }
    b.push_str("</table>\n");
    b
}

async fn machine_page(
    State(fleet): State<Arc<Fleet>>,
    Path(host): Path<String>,
) -> Result<Html<String>, ApiError> {
    let m = fleet
        .report(&host)
        .ok_or_else(|| ApiError::NotFound(format!("no machine {host:?} in the MDB")))?;
    let now = unix_now();
    let mut b = format!(
        "<p><a href=\"/\">&larr; fleet</a></p><h1>{}</h1>\n<table id=\"machine\">\n",
        esc(&m.host)
    );
    let rows = [
        ("address", m.address.clone()),
        ("required image", m.required_shown()),
        (
            "planned image",
            crate::fleet::shown_image(&m.planned_image, m.resolved_planned_image.as_deref()),
        ),
        ("status", format!("{}{}", m.status_name, differs_text(&m))),
        ("last error", m.last_error.clone().unwrap_or_default()),
        ("last synced", ago(m.last_synced, now)),
        ("last poll", ago(m.last_poll, now)),
        (
            "generation / scans",
            format!("{} / {}", m.generation, m.scan_count),
        ),
        ("last poll size", format!("{} bytes", m.last_poll_bytes)),
        (
            "state diverged",
            format!("{} paths differ from the image's seed", m.state_diverged),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(b, "<tr><th>{k}</th><td>{}</td></tr>", esc(&v));
    }
    b.push_str("</table>\n");
    if let Some(u) = &m.last_update {
        let _ = writeln!(
            b,
            "<h2>Last update</h2><pre id=\"last-update\">{}</pre>",
            esc(&last_update_text(u))
        );
        b.push_str(&hooks_section(u));
    }
    b.push_str(&timeline_section(&fleet, &m.host, now));
    b.push_str("<h2>Last plan</h2>\n");
    match &m.last_plan {
        Some(p) => {
            let _ = writeln!(
                b,
                "<pre id=\"plan\">{}</pre>",
                esc(&preview::describe(&m.host, p))
            );
        }
        None => b.push_str("<p id=\"plan\">No plan computed yet.</p>\n"),
    }
    Ok(page(&fleet, &format!("{} - Dominator", m.host), &b))
}
