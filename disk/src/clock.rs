//! The wall clock as the fleet records it: whole seconds since the Unix epoch.

/// Seconds since the Unix epoch now; 0 if the clock is set before 1970.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_now_is_after_2020() {
        assert!(super::unix_now() > 1_577_836_800);
    }
}
