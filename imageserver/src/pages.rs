//! The human status page at `/` and the Prometheus metrics at `/metrics`.

use crate::State;
use axum::extract::State as AxState;
use axum::response::{Html, IntoResponse, Response};
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Most image names listed on the status page.
const PAGE_IMAGES: usize = 1000;

pub async fn status(AxState(st): AxState<State>) -> Html<String> {
    let c = st.catalogue.counts();
    let names = st.catalogue.list_images("");
    let mut s =
        String::from("<!DOCTYPE html><html><head><title>imageserver</title></head><body>\n");
    if st.security.is_insecure() {
        s.push_str(wire::http::INSECURE_BANNER);
        s.push('\n');
    }
    let _ = write!(
        s,
        "<h1>imageserver</h1>\n<p>images: {}<br>deleted names (never reused): {}<br>objects: {}<br>bytes: {}<br>unreferenced objects: {} ({} bytes)</p>\n<h2>Images</h2>\n<ul>\n",
        c.images, c.deleted_names, c.objects, c.object_bytes, c.unreferenced_objects, c.unreferenced_bytes
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
                    .map(|(n, k)| format!("<li>{}: {k} objects missing</li>\n", html_escape(n)))
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
                    .map(|(n, d)| format!("<li>{}: {}</li>\n", html_escape(n), html_escape(d)))
                    .collect::<String>()
            ),
        );
    }
    for n in names.iter().take(PAGE_IMAGES) {
        let _ = writeln!(s, "<li>{}</li>", html_escape(n));
    }
    if names.len() > PAGE_IMAGES {
        let _ = writeln!(s, "<li>… and {} more</li>", names.len() - PAGE_IMAGES);
    }
    s.push_str("</ul></body></html>\n");
    Html(s)
}

pub async fn metrics(AxState(st): AxState<State>) -> Response {
    let c = st.catalogue.counts();
    let m = &st.metrics;
    let mut s = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = write!(
            s,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        );
    };
    put("imageserver_images", "gauge", "Images stored.", c.images);
    put(
        "imageserver_deleted_image_names",
        "gauge",
        "Tombstoned image names.",
        c.deleted_names,
    );
    put("imageserver_objects", "gauge", "Objects stored.", c.objects);
    put(
        "imageserver_images_missing_objects",
        "gauge",
        "Images referring to objects that are not stored (found at start-up).",
        c.incomplete_images,
    );
    put(
        "imageserver_images_corrupt",
        "gauge",
        "Images whose file does not match its checksum (not served).",
        c.corrupt_images,
    );
    put(
        "imageserver_object_bytes",
        "gauge",
        "Bytes of objects stored.",
        c.object_bytes,
    );
    put(
        "imageserver_unreferenced_objects",
        "gauge",
        "Objects no image refers to.",
        c.unreferenced_objects,
    );
    put(
        "imageserver_unreferenced_object_bytes",
        "gauge",
        "Bytes of unreferenced objects.",
        c.unreferenced_bytes,
    );
    put(
        "imageserver_pinned_objects",
        "gauge",
        "Unreferenced objects safe from deletion for now (being uploaded, or uploaded or checked within the pin grace period).",
        c.pinned_objects,
    );
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    put(
        "imageserver_objects_received_total",
        "counter",
        "Objects newly stored by AddObjects.",
        l(&m.objects_received),
    );
    put(
        "imageserver_object_bytes_received_total",
        "counter",
        "Bytes newly stored by AddObjects.",
        l(&m.object_bytes_received),
    );
    put(
        "imageserver_objects_served_total",
        "counter",
        "Objects sent by GetObjects.",
        l(&m.objects_served),
    );
    put(
        "imageserver_object_bytes_served_total",
        "counter",
        "Bytes sent by GetObjects.",
        l(&m.object_bytes_served),
    );
    put(
        "imageserver_images_added_total",
        "counter",
        "Images added.",
        l(&m.images_added),
    );
    put(
        "imageserver_images_deleted_total",
        "counter",
        "Images deleted.",
        l(&m.images_deleted),
    );
    put(
        "imageserver_rejected_uploads_total",
        "counter",
        "AddObjects requests refused (bad hash, truncated, …).",
        l(&m.rejected_uploads),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s,
    )
        .into_response()
}
