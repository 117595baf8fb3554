//! The background scanner: an endless loop that walks the root (never crossing mount
//! points, skipping `/.subd` and the exclusions), SHA-512s every regular file on every pass
//! (no mtime shortcut; one exception: the first pass after an update takes the hash of a
//! file the update installed and finds unchanged, device, inode, size, mtime and ctime,
//! from the update's record, `disk::known`), lists the object cache, and raises the generation when a finished
//! pass differs from the last. Passes start at least `min_scan_interval` apart. The first
//! pass (and the pass after a fetch, update or cleanup) runs unthrottled on all CPUs; the
//! others run on one thread at nice 15, with a tranquilizer that sleeps in proportion to
//! the work done, so the scan uses at most `min(cpu_percent, scan_speed_percent)` of the
//! time (`scan_speed_percent` 100 disables throttling). A name that changes kind or inode
//! while a pass lists and hashes it (a file flipped to a FIFO or a symlink) is left out of
//! that pass and listed anew by the next, so it can neither block nor abort a pass. A pass
//! that overlaps an update is abandoned as soon as the update begins, and a new one starts
//! once it ends.

use crate::Subd;
use disk::clock::unix_now;
use disk::scan::{scan_full, ChangedFiles, ScanOptions, Throttle};
use model::ObjectId;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A throttle that sleeps `work × (100 − percent) / percent` after each chunk.
pub fn tranquilizer(percent: u32) -> Throttle {
    let percent = percent.clamp(1, 100) as f64;
    let last = Arc::new(Mutex::new(Instant::now()));
    Arc::new(move |_bytes: u64| {
        let mut l = last.lock().unwrap();
        let work = l.elapsed();
        let pause = work.mul_f64((100.0 - percent) / percent);
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        *l = Instant::now();
    })
}

/// Runs until `subd.stop` is set.
pub fn run(subd: &Subd) {
    let cfg = &subd.config;
    // `--scan-speed-percent 100` means unthrottled, whatever the CPU share.
    let percent = if cfg.scan_speed_percent >= 100 {
        100
    } else {
        cfg.cpu_percent.min(cfg.scan_speed_percent)
    };
    let mut niced = false;
    while !subd.stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let epoch = subd.epoch.load(Ordering::SeqCst);
        // Cleared before the status is read, so an update that begins after this point
        // either is seen below or aborts the pass.
        if !subd.stop.load(Ordering::SeqCst) {
            subd.scan_abort.store(false, Ordering::SeqCst);
        }
        let (first, boost, updating, known) = {
            let mut st = subd.status();
            let b = st.boost;
            st.boost = false;
            // A fetch or update pauses scanning: a pass overlapping either is discarded.
            let updating = st.update_in_progress || st.fetch_in_progress;
            // The last update's record serves this pass only (see `disk::known`).
            let known = if updating { None } else { st.known.take() };
            (st.generation == 0, b, updating, known)
        };
        if updating {
            wait(subd, Duration::from_millis(50));
            continue;
        }
        let throttled = !first && !boost && percent < 100;
        let opts = ScanOptions {
            exclude: Some(subd.exclusions.clone()),
            threads: if throttled { 1 } else { 0 },
            throttle: throttled.then(|| tranquilizer(percent)),
            cancel: Some(subd.scan_abort.clone()),
            // A name a local user flips mid-pass must not stop the rest being reported.
            changed: ChangedFiles::LeaveOut,
            known,
        };
        let scanned = scan_full(&cfg.root, &opts);
        let cache = subd.store.ids();
        let (tree, hidden_parents, known_files, cache) = match (scanned, cache) {
            (Ok(s), Ok(c)) => (
                s.tree,
                s.hidden_parents.into_iter().collect::<Vec<_>>(),
                s.known_files,
                c,
            ),
            (Err(disk::scan::ScanError::Cancelled), _) if subd.stop.load(Ordering::SeqCst) => break,
            (Err(disk::scan::ScanError::Cancelled), _) => {
                tracing::debug!("scan pass abandoned: an update began");
                let mut st = subd.status();
                st.scans_aborted += 1;
                keep_known(&mut st, &opts);
                continue;
            }
            (Err(e), _) => {
                tracing::error!("scan: {e}");
                wait(subd, Duration::from_secs(5));
                continue;
            }
            (_, Err(e)) => {
                tracing::error!("listing object cache: {e}");
                wait(subd, Duration::from_secs(5));
                continue;
            }
        };
        let mut ids: Vec<ObjectId> = cache.into_iter().collect();
        ids.sort();
        {
            let mut st = subd.status();
            if st.update_in_progress
                || st.fetch_in_progress
                || subd.epoch.load(Ordering::SeqCst) != epoch
            {
                keep_known(&mut st, &opts);
                tracing::debug!("scan pass discarded: a fetch or update overlapped it");
                continue; // the tree changed under us: scan again
            }
            let changed = st.generation == 0
                || st.tree.as_deref() != Some(&tree)
                || st.object_cache.as_deref() != Some(&ids)
                || st.hidden_parents != hidden_parents;
            if changed {
                st.generation += 1;
                st.tree = Some(Arc::new(tree));
                st.object_cache = Some(Arc::new(ids));
                st.hidden_parents = hidden_parents;
            }
            st.scan_count += 1;
            if !subd.stop.load(Ordering::SeqCst) {
                subd.scans.send_replace(st.scan_count);
            }
            st.last_scan_known_files = known_files as u64;
            st.last_scan_time = unix_now();
            st.last_scan_duration_ms = started.elapsed().as_millis() as u64;
            tracing::debug!(
                known_files,
                changed,
                "scan pass {} done in {} ms",
                st.scan_count,
                st.last_scan_duration_ms
            );
        }
        subd.snapshot_index.expire(crate::snapshot::INDEX_IDLE);
        if !niced && percent < 100 {
            // Linux: applies to this thread; hashing threads it creates inherit it.
            if let Err(e) = rustix::process::setpriority_process(None, 15) {
                tracing::warn!("cannot lower scanner priority: {e}");
            }
            niced = true;
        }
        let elapsed = started.elapsed();
        if elapsed < cfg.min_scan_interval {
            wait(subd, cfg.min_scan_interval - elapsed);
        }
    }
}

/// A pass that reports nothing leaves the update's record for the next pass (unless a
/// newer update has left its own).
fn keep_known(st: &mut crate::Status, opts: &ScanOptions) {
    if st.known.is_none() {
        st.known = opts.known.clone();
    }
}

/// Sleeps up to `d`, waking early when asked (stop or boost).
fn wait(subd: &Subd, d: Duration) {
    let (m, c) = &subd.wake;
    let mut woken = m.lock().unwrap();
    if !*woken {
        woken = c.wait_timeout(woken, d).unwrap().0;
    }
    *woken = false;
}
