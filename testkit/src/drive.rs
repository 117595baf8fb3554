//! Driving one subd the way the dominator does, for integration tests: wait for a scan
//! newer than one already seen, plan with the shared diff, update and wait.

use model::api::{PollRequest, PollResponse, UpdateRequest, UpdateResult};
use model::diff::{diff, DiffOptions, Machine};
use model::{Filter, Image, ObjectId, UpdatePlan};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use wire::client::SubdClient;

/// Polls until a scan newer than generation `after` is reported with its tree, and no
/// fetch or update is running; errors (a subd still starting) are retried. Panics after
/// 60 s.
pub async fn poll_after(c: &SubdClient, after: u64) -> PollResponse {
    let t0 = Instant::now();
    loop {
        let req = PollRequest {
            have_generation: after,
            short_only: false,
            ..Default::default()
        };
        if let Ok(p) = c.poll(&req).await {
            if p.generation > after
                && p.tree.is_some()
                && !p.update_in_progress
                && !p.fetch_in_progress
            {
                return p;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "subd reported no scan newer than generation {after}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The plan that makes the machine `p` describes match `image`.
pub fn plan_for(name: &str, image: &Image, p: &PollResponse, opts: &DiffOptions) -> UpdatePlan {
    let cache: BTreeSet<ObjectId> = p
        .object_cache
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let excl = Filter::from_lines(p.exclusions.clone()).unwrap();
    diff(
        name,
        image,
        &Machine {
            tree: p.tree.as_ref().expect("a poll with its tree"),
            object_cache: &cache,
            exclusions: Some(&excl),
            hidden_parents: &p.hidden_parents,
            seeded: &p.seeded,
        },
        opts,
    )
}

/// Sends `plan` and waits for its result.
pub async fn update(c: &SubdClient, plan: UpdatePlan) -> UpdateResult {
    c.update(&UpdateRequest { plan, wait: true })
        .await
        .expect("Subd.Update")
        .result
        .expect("a waited-for update returns its result")
}
