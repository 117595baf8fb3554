//! Fuzzes every HTTP body decoder the servers and clients run on untrusted bytes: the JSON
//! request/response types of every RPC (images, plans, polls) and the object batch
//! framing. Never a panic; an accepted image or plan re-serializes and parses again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use model::api;

fuzz_target!(|data: &[u8]| {
    let (which, body) = match data.split_first() {
        Some((w, b)) => (*w, b),
        None => return,
    };
    match which % 8 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<api::AddImageRequest>(body) {
                let _ = r.image.tree.validate();
                let j = serde_json::to_vec(&r.image).unwrap();
                serde_json::from_slice::<model::Image>(&j).expect("image round trip");
            }
        }
        1 => {
            if let Ok(r) = serde_json::from_slice::<api::UpdateRequest>(body) {
                let _ = r.plan.touched_paths();
                let _ = r.plan.to_string();
                let j = serde_json::to_vec(&r.plan).unwrap();
                serde_json::from_slice::<model::UpdatePlan>(&j).expect("plan round trip");
            }
        }
        2 => {
            let _ = serde_json::from_slice::<api::PollResponse>(body);
        }
        3 => {
            let _ = serde_json::from_slice::<api::FetchRequest>(body);
            let _ = serde_json::from_slice::<api::GetObjectsRequest>(body);
        }
        4 => {
            let _ = serde_json::from_slice::<api::CheckObjectsRequest>(body);
            let _ = serde_json::from_slice::<api::ListImagesRequest>(body);
        }
        5 => {
            let _ = serde_json::from_slice::<api::PollRequest>(body);
            let _ = serde_json::from_slice::<api::DeleteUnreferencedObjectsRequest>(body);
        }
        _ => {
            // Object batch framing: headers and lengths from hostile bytes.
            let mut r = body;
            while let Ok(Some((_, len))) = model::frame::read_header(&mut r) {
                let skip = (len as usize).min(r.len());
                r = &r[skip..];
                if skip < len as usize {
                    break;
                }
            }
        }
    }
});
