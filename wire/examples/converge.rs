//! Bench driver: `converge patch SERVER IMAGE DIR` runs `patch_directory`;
//! `converge subd SERVER IMAGE SUBD` drives a running subd the way the dominator does
//! (poll → diff → Fetch → Update). Prints one JSON line of figures.

use model::api::{FetchRequest, PollRequest, UpdateRequest};
use model::diff::{diff, DiffOptions, Machine};
use std::collections::BTreeSet;
use std::time::Instant;
use wire::client::{ClientSecurity, ImageServerClient, SubdClient};
use wire::patch::{patch_directory, PatchOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 5,
        "usage: converge patch|subd SERVER IMAGE DIR|SUBD"
    );
    let server = ImageServerClient::new(&a[2], &ClientSecurity::Insecure)?;
    let t0 = Instant::now();
    if a[1] == "patch" {
        let opts = PatchOptions {
            allow_unsafe: true,
            ..Default::default()
        };
        let r = patch_directory(&server, &a[3], std::path::Path::new(&a[4]), &opts).await?;
        println!(
            "{}",
            serde_json::json!({
                "seconds": t0.elapsed().as_secs_f64(),
                "scan_seconds": r.scan_seconds, "fetch_seconds": r.fetch_seconds, "apply_seconds": r.apply_seconds,
                "requests": r.fetch.requests, "objects": r.fetch.objects, "bytes": r.fetch.bytes,
                "activation_ms": r.result.activation_ms, "errors": r.result.errors,
            })
        );
        return Ok(());
    }
    let subd = SubdClient::new(&a[4], &ClientSecurity::Insecure, None)?;
    let image = server.get_image(&a[3]).await?;
    let poll = subd.poll(&PollRequest::default()).await?;
    let t_poll = t0.elapsed().as_secs_f64();
    let cache: BTreeSet<_> = poll
        .object_cache
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let excl = model::Filter::from_lines(poll.exclusions.clone())?;
    let tree = poll
        .tree
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no tree yet"))?;
    let plan = diff(
        &a[3],
        &image,
        &Machine {
            tree: &tree,
            object_cache: &cache,
            exclusions: Some(&excl),
            hidden_parents: &poll.hidden_parents,
            seeded: &poll.seeded,
        },
        &DiffOptions { allow_unsafe: true },
    );
    let t1 = Instant::now();
    subd.fetch(&FetchRequest {
        server: a[2].clone(),
        hashes: plan.objects_to_fetch.clone(),
        wait: true,
        final_metadata: plan.final_metadata(),
    })
    .await?;
    let fetch_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let r = subd
        .update(&UpdateRequest {
            plan: plan.clone(),
            wait: true,
        })
        .await?
        .result
        .unwrap_or_default();
    let update_s = t2.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "poll_seconds": t_poll, "fetch_seconds": fetch_s, "update_seconds": update_s,
            "objects_to_fetch": plan.objects_to_fetch.len(), "fetch_bytes": plan.fetch_bytes,
            "activation_ms": r.activation_ms, "errors": r.errors,
        })
    );
    Ok(())
}
