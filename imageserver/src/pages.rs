//! The human status page at `/` and the Prometheus metrics at `/metrics`.

use crate::usage::UsageCache;
use crate::State;
use axum::extract::State as AxState;
use axum::response::{Html, Response};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use wire::pages::{escape, Metrics};

/// Most image names listed on the status page.
const PAGE_IMAGES: usize = 1000;

pub async fn status(AxState(st): AxState<State>) -> Html<String> {
    let c = st.catalogue.counts();
    let names = st.catalogue.list_images("");
    let mut s = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>imageserver</title><style>table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}.error{background:#c00;color:#fff;padding:6px}</style></head><body>\n",
    );
    if st.security.is_insecure() {
        s.push_str(wire::http::INSECURE_BANNER);
        s.push('\n');
    }
    let _ = write!(
        s,
        "<h1>imageserver</h1>\n<p>images: {}<br>deleted names (never reused): {}<br>objects: {}<br>bytes: {}<br>unreferenced objects: {} ({} bytes)</p>\n<h2>Images</h2>\n",
        c.images, c.deleted_names, c.objects, c.object_bytes, c.unreferenced_objects, c.unreferenced_bytes
    );
    s.insert_str(
        s.rfind("<h2>Images</h2>").unwrap_or(s.len()),
        &crate::replication::status_html(&st),
    );
    let incomplete = st.catalogue.incomplete_images();
    if !incomplete.is_empty() {
        s.insert_str(
            s.rfind("<h2>Images</h2>").unwrap_or(s.len()),
            &format!(
                "<h2 id=\"incomplete\" style=\"color:#b00\">Images with missing objects: {}</h2>\n<p>Machines cannot fetch these. Upload the objects again (<code>imagetool add</code> of the same tree under a new name sends them) or delete the image.</p>\n<ul>\n{}</ul>\n",
                incomplete.len(),
                incomplete
                    .iter()
                    .map(|(n, k)| format!("<li>{}: {k} objects missing</li>\n", escape(n)))
                    .collect::<String>()
            ),
        );
    }
    let corrupt = st.catalogue.corrupt_images();
    if !corrupt.is_empty() {
        s.insert_str(
            s.rfind("<h2>Images</h2>").unwrap_or(s.len()),
            &format!(
                "<h2 id=\"corrupt\" style=\"color:#b00\">Corrupt images: {}</h2>\n<p>Their files on disk do not match their checksums; they are not served. Delete them and add them again.</p>\n<ul>\n{}</ul>\n",
                corrupt.len(),
                corrupt
                    .iter()
                    .map(|(n, d)| format!("<li>{}: {}</li>\n", escape(n), escape(d)))
                    .collect::<String>()
            ),
        );
    }
    s.push_str(&expiring_soon(&st));
    s.push_str(&images_table(&st, names).await);
    s.push_str("</body></html>\n");
    Html(s)
}

/// The images expiring within a day, soonest first, with when (UTC) and how long is left.
fn expiring_soon(st: &State) -> String {
    let soon = st
        .catalogue
        .expiring_within(model::expiry::EXPIRING_SOON_SECS);
    if soon.is_empty() {
        return "<p id=\"expiring\">No image expires within a day.</p>\n".into();
    }
    let now = disk::clock::unix_now();
    let mut s = format!(
        "<h2>Expiring within a day: {}</h2>\n<table id=\"expiring\"><tr><th>image</th><th>expires at (Unix seconds)</th><th>in</th></tr>\n",
        soon.len()
    );
    for (name, at) in soon {
        let left = at.saturating_sub(now);
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{at}</td><td>{}h {:02}m {:02}s</td></tr>",
            escape(&name),
            left / 3600,
            left % 3600 / 60,
            left % 60
        );
    }
    s.push_str("</table>\n");
    s
}

/// The images, each with its size, objects, unique bytes and (given `--mdb`) the MDB
/// records using it; at most `PAGE_IMAGES` rows.
async fn images_table(st: &State, names: Vec<String>) -> String {
    let total = names.len();
    let shown: Vec<String> = names.into_iter().take(PAGE_IMAGES).collect();
    let (cache, catalogue, mdb) = (st.usage.clone(), st.catalogue.clone(), st.mdb.clone());
    let computed = tokio::task::spawn_blocking(move || {
        let rows = UsageCache::rows(&cache, &catalogue, &shown);
        let users = mdb.as_ref().map(|m| m.users());
        (shown, rows, users)
    })
    .await;
    let Ok((shown, rows, users)) = computed else {
        return "<p>image figures unavailable</p>\n".into();
    };
    let mut s = String::new();
    match (&users, &st.mdb) {
        (Some(Err(e)), _) => {
            let _ = writeln!(
                s,
                "<p class=\"error\" id=\"mdb-error\">MDB not read: {}</p>",
                escape(&e.0)
            );
        }
        (Some(Ok(_)), Some(m)) => {
            let _ = writeln!(
                s,
                "<p>Machines from the MDB <code>{}</code>.</p>",
                escape(&m.path().display().to_string())
            );
        }
        _ => {}
    }
    s.push_str("<table id=\"images\"><tr><th>image</th><th>size (bytes)</th><th>objects</th><th>unique bytes</th>");
    if users.is_some() {
        s.push_str("<th>used by</th>");
    }
    s.push_str("</tr>\n");
    for n in &shown {
        let u = rows.get(n).copied().unwrap_or_default();
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            escape(n),
            u.size,
            u.objects,
            u.unique_bytes
        );
        if let Some(users) = &users {
            let by = users
                .as_ref()
                .ok()
                .and_then(|m| m.get(n))
                .map(|v| v.join(", "));
            let _ = write!(s, "<td>{}</td>", escape(by.as_deref().unwrap_or("-")));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    if total > PAGE_IMAGES {
        let _ = writeln!(s, "<p>… and {} more</p>", total - PAGE_IMAGES);
    }
    s
}

pub async fn metrics(AxState(st): AxState<State>) -> Response {
    let c = st.catalogue.counts();
    let mut m = Metrics::new();
    m.gauge("imageserver_images", "Images stored", c.images)
        .gauge(
            "imageserver_deleted_image_names",
            "Tombstoned image names",
            c.deleted_names,
        )
        .gauge("imageserver_objects", "Objects stored", c.objects)
        .gauge(
            "imageserver_images_missing_objects",
            "Images referring to objects that are not stored (found at start-up)",
            c.incomplete_images,
        )
        .gauge(
            "imageserver_images_corrupt",
            "Images whose file does not match its checksum (not served)",
            c.corrupt_images,
        )
        .gauge(
            "imageserver_object_bytes",
            "Bytes of objects stored",
            c.object_bytes,
        )
        .gauge(
            "imageserver_unreferenced_objects",
            "Objects no image refers to",
            c.unreferenced_objects,
        )
        .gauge(
            "imageserver_unreferenced_object_bytes",
            "Bytes of unreferenced objects",
            c.unreferenced_bytes,
        )
        .gauge(
            "imageserver_pinned_objects",
            "Unreferenced objects safe from deletion for now (being uploaded, or uploaded or checked within the pin grace period)",
            c.pinned_objects,
        );
    crate::replication::metrics(&st, &mut m);
    let n = &st.metrics;
    for (name, help, v) in [
        (
            "imageserver_objects_received",
            "Objects newly stored by AddObjects",
            &n.objects_received,
        ),
        (
            "imageserver_object_bytes_received",
            "Bytes newly stored by AddObjects",
            &n.object_bytes_received,
        ),
        (
            "imageserver_objects_served",
            "Objects sent by GetObjects",
            &n.objects_served,
        ),
        (
            "imageserver_object_bytes_served",
            "Bytes sent by GetObjects",
            &n.object_bytes_served,
        ),
        ("imageserver_images_added", "Images added", &n.images_added),
        (
            "imageserver_images_deleted",
            "Images deleted",
            &n.images_deleted,
        ),
        (
            "imageserver_images_expired",
            "Images expired (tombstoned by the expiry sweep while running)",
            &n.images_expired,
        ),
        (
            "imageserver_rejected_uploads",
            "AddObjects requests refused (bad hash, truncated, …)",
            &n.rejected_uploads,
        ),
    ] {
        m.counter(name, help, v.load(Ordering::Relaxed));
    }
    m.response()
}
