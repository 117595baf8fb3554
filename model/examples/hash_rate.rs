//! Hash rate of `model::hash_lanes` against one message at a time (ring), on one core:
//! `cargo run --release -p model --example hash_rate [MESSAGES] [BYTES_EACH]`.

use model::hash::ObjectId;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let each: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(256 * 1024);
    let messages: Vec<Vec<u8>> = (0..count)
        .map(|i| (0..each).map(|j| (j ^ (j >> 8) ^ i) as u8).collect())
        .collect();
    let refs: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
    let total = (count * each) as f64;
    let best = |f: &dyn Fn() -> Vec<ObjectId>| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let one = best(&|| refs.iter().map(|m| ObjectId::of(m)).collect());
    let lanes = best(&|| model::hash_lanes::hash_slices(&refs));
    assert_eq!(
        model::hash_lanes::hash_slices(&refs),
        refs.iter().map(|m| ObjectId::of(m)).collect::<Vec<_>>()
    );
    println!(
        "{count} messages of {each} bytes: one at a time {:.0} MB/s, lanes {:.0} MB/s ({}), ratio {:.2}",
        total / one / 1e6,
        total / lanes / 1e6,
        if model::hash_lanes::lanes_supported() { "AVX-512" } else { "no AVX-512: one at a time" },
        one / lanes
    );
}
