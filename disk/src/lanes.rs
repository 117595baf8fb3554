//! Independent per-item work (renames, metadata calls) split over a few threads.
//!
//! Ownership: each lane gets one contiguous chunk of the items and touches only what those
//! items name; the caller shares nothing mutable with the lanes (each builds its own
//! per-lane state, such as directory handles) and merges their results in item order, so
//! the outcome reads as if the items ran one after another. Small inputs run on the
//! calling thread: a thread costs more than a few hundred system calls save.

/// Items per lane below which no extra thread is started.
pub const MIN_PER_LANE: usize = 256;

/// How many lanes `items` items get: one per CPU (at most 4), each with at least
/// `MIN_PER_LANE` items.
pub fn lanes_for(items: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.clamp(1, 4).min(items / MIN_PER_LANE).max(1)
}

/// Runs `work` over contiguous chunks of `items`, one chunk per lane, and returns each
/// chunk's result in order. `work` gets the chunk and the index of its first item.
pub fn run<T: Sync, R: Send>(items: &[T], work: impl Fn(&[T], usize) -> R + Sync) -> Vec<R> {
    let lanes = lanes_for(items.len());
    if lanes <= 1 {
        return vec![work(items, 0)];
    }
    let size = items.len().div_ceil(lanes);
    std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = items
            .chunks(size)
            .enumerate()
            .map(|(i, chunk)| s.spawn(move || work(chunk, i * size)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_item_once_in_order() {
        for n in [0, 1, 255, 256, 511, 512, 1000, 4097] {
            let items: Vec<usize> = (0..n).collect();
            let out = run(&items, |chunk, first| {
                assert_eq!(chunk.first().copied().unwrap_or(first), first);
                chunk.to_vec()
            });
            assert!(out.len() <= 4 && !out.is_empty());
            assert_eq!(out.concat(), items, "n = {n}");
        }
    }

    #[test]
    fn small_inputs_stay_on_the_calling_thread() {
        let me = std::thread::current().id();
        let out = run(&[1, 2, 3], |_, _| std::thread::current().id());
        assert_eq!(out, vec![me]);
        assert_eq!(lanes_for(MIN_PER_LANE - 1), 1);
    }
}
