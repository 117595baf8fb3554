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

/// Runs until `subd.stop` is set. Each pass: begin (read the status) → scan → publish
/// → rest until the next is due.
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
        let Some(opts) = begin(subd, percent) else {
            wait(subd, Duration::from_millis(50));
            continue;
        };
        let pass = match scan(subd, &opts) {
            Scanned::Pass(pass) => pass,
            Scanned::Stopped => break,
            Scanned::Abandoned => continue,
        };
        if !publish(subd, &opts, pass, epoch, started) {
            continue; // the tree changed under us: scan again
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

/// Begins a pass: its options, or `None` while a fetch or update runs (a pass overlapping
/// either is discarded, so none starts).
fn begin(subd: &Subd, percent: u32) -> Option<ScanOptions> {
    // Cleared before the status is read, so an update that begins after this point
    // either is seen below or aborts the pass.
    if !subd.stop.load(Ordering::SeqCst) {
        subd.scan_abort.store(false, Ordering::SeqCst);
    }
    let mut st = subd.status();
    let boost = std::mem::take(&mut st.boost);
    if st.update_in_progress || st.fetch_in_progress {
        return None;
    }
    // The last update's record serves this pass only (see `disk::known`).
    let known = st.known.take();
    let throttled = st.generation != 0 && !boost && percent < 100;
    Some(ScanOptions {
        exclude: Some(subd.exclusions.clone()),
        threads: if throttled { 1 } else { 0 },
        throttle: throttled.then(|| tranquilizer(percent)),
        cancel: Some(subd.scan_abort.clone()),
        // A name a local user flips mid-pass must not stop the rest being reported.
        changed: ChangedFiles::LeaveOut,
        known,
    })
}

/// What one pass saw.
struct Pass {
    tree: model::image::FileTree,
    hidden_parents: Vec<model::FsPath>,
    known_files: usize,
    /// The object cache's ids, sorted.
    ids: Vec<ObjectId>,
}

enum Scanned {
    Pass(Pass),
    /// Cancelled because subd is stopping.
    Stopped,
    /// Cancelled by an update, or failed (logged, after a pause): begin again.
    Abandoned,
}

/// Scans the root and lists the object cache.
fn scan(subd: &Subd, opts: &ScanOptions) -> Scanned {
    let scanned = scan_full(&subd.config.root, opts);
    let cache = subd.store.ids();
    match (scanned, cache) {
        (Ok(s), Ok(c)) => {
            let mut ids: Vec<ObjectId> = c.into_iter().collect();
            ids.sort();
            Scanned::Pass(Pass {
                tree: s.tree,
                hidden_parents: s.hidden_parents.into_iter().collect(),
                known_files: s.known_files,
                ids,
            })
        }
        (Err(disk::scan::ScanError::Cancelled), _) if subd.stop.load(Ordering::SeqCst) => {
            Scanned::Stopped
        }
        (Err(disk::scan::ScanError::Cancelled), _) => {
            tracing::debug!("scan pass abandoned: an update began");
            let mut st = subd.status();
            st.scans_aborted += 1;
            keep_known(&mut st, opts);
            Scanned::Abandoned
        }
        (Err(e), _) => {
            tracing::error!("scan: {e}");
            wait(subd, Duration::from_secs(5));
            Scanned::Abandoned
        }
        (_, Err(e)) => {
            tracing::error!("listing object cache: {e}");
            wait(subd, Duration::from_secs(5));
            Scanned::Abandoned
        }
    }
}

/// Publishes a pass (a new generation if it differs from the last); false, publishing
/// nothing, when a fetch or update overlapped it (`epoch` moved).
fn publish(subd: &Subd, opts: &ScanOptions, pass: Pass, epoch: u64, started: Instant) -> bool {
    let mut st = subd.status();
    if st.update_in_progress || st.fetch_in_progress || subd.epoch.load(Ordering::SeqCst) != epoch {
        keep_known(&mut st, opts);
        tracing::debug!("scan pass discarded: a fetch or update overlapped it");
        return false;
    }
    let changed = st.generation == 0
        || st.tree.as_deref() != Some(&pass.tree)
        || st.object_cache.as_deref() != Some(&pass.ids)
        || st.hidden_parents != pass.hidden_parents;
    if changed {
        st.generation += 1;
        st.tree = Some(Arc::new(pass.tree));
        st.object_cache = Some(Arc::new(pass.ids));
        st.hidden_parents = pass.hidden_parents;
    }
    st.scan_count += 1;
    if !subd.stop.load(Ordering::SeqCst) {
        subd.scans.send_replace(st.scan_count);
    }
    st.last_scan_known_files = pass.known_files as u64;
    st.last_scan_time = unix_now();
    st.last_scan_duration_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(
        known_files = pass.known_files,
        changed,
        "scan pass {} done in {} ms",
        st.scan_count,
        st.last_scan_duration_ms
    );
    true
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
