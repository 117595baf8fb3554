//! The human status page at `/` and the Prometheus metrics at `/metrics`.

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
    for n in names.iter().take(PAGE_IMAGES) {
        let _ = writeln!(s, "<li>{}</li>", escape(n));
    }
    if names.len() > PAGE_IMAGES {
        let _ = writeln!(s, "<li>… and {} more</li>", names.len() - PAGE_IMAGES);
    }
    s.push_str("</ul></body></html>\n");
    Html(s)
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
            "imageserver_rejected_uploads",
            "AddObjects requests refused (bad hash, truncated, …)",
            &n.rejected_uploads,
        ),
    ] {
        m.counter(name, help, v.load(Ordering::Relaxed));
    }
    m.response()
}
