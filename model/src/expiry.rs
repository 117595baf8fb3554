//! Image expiry: durations as written on the command line (`90s`, `15m`, `2h`, `1d`,
//! `1h30m`, or `never`), and the rules for setting an image's `expires_at` (Dominator's
//! `-expiresIn` and `ChangeImageExpiration`): at least a minimum ahead, and only ever
//! extended. Pure: the caller gives the time.

/// The shortest expiry a server accepts by default (Dominator's 15 minutes).
pub const DEFAULT_MIN_EXPIRY_SECS: u64 = 15 * 60;

/// How far ahead the imageserver's status page looks for images about to expire.
pub const EXPIRING_SOON_SECS: u64 = 24 * 3600;

/// A bad duration or a refused expiry; each text is the one line a user sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    #[error("bad duration {0:?}: expected a number with a unit s, m, h or d (e.g. 15m, 2h, 1h30m) or never")]
    BadDuration(String),
    #[error("expiry in {secs} s is under the minimum of {min} s")]
    TooSoon { secs: u64, min: u64 },
    #[error("expiry can only be extended: the image expires at {current}, the new time {new} is earlier")]
    Shortened { current: u64, new: u64 },
    #[error("expiry can only be extended: the image never expires")]
    WasNever,
}

/// What a server holds an expiry time to when the client asked for `min_secs` ahead:
/// a tenth less, for the client's clock and the time its request took to arrive (the
/// client checks the full minimum on the duration it was given).
pub fn server_minimum(min_secs: u64) -> u64 {
    min_secs - min_secs / 10
}

/// Parses `never` (`None`) or a duration in seconds (`Some`): one or more number+unit
/// pairs, units `s`, `m`, `h`, `d`.
pub fn parse_expires_in(s: &str) -> Result<Option<u64>, ExpiryError> {
    let t = s.trim();
    if t == "never" {
        return Ok(None);
    }
    let bad = || ExpiryError::BadDuration(s.to_string());
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || t.is_empty() {
        return Err(bad());
    }
    Ok(Some(total))
}

/// Whether `expires_at` may be set on a new image at `now`: `None` always; a time at
/// least `min_secs` ahead.
pub fn check_new(expires_at: Option<u64>, now: u64, min_secs: u64) -> Result<(), ExpiryError> {
    match expires_at {
        Some(t) if t < now.saturating_add(min_secs) => Err(ExpiryError::TooSoon {
            secs: t.saturating_sub(now),
            min: min_secs,
        }),
        _ => Ok(()),
    }
}

/// Whether an image expiring at `current` may be changed to expire at `new` at `now`:
/// only extended (to a later time, or to never), and a new time at least `min_secs` ahead.
pub fn check_change(
    current: Option<u64>,
    new: Option<u64>,
    now: u64,
    min_secs: u64,
) -> Result<(), ExpiryError> {
    match (current, new) {
        (_, None) => Ok(()),
        (None, Some(_)) => Err(ExpiryError::WasNever),
        (Some(c), Some(n)) if n < c => Err(ExpiryError::Shortened { current: c, new: n }),
        (Some(_), Some(_)) => check_new(new, now, min_secs),
    }
}

/// Whether an image expiring at `expires_at` expires within `window` seconds of `now`
/// (and has not yet).
pub fn expiring_within(expires_at: Option<u64>, now: u64, window: u64) -> bool {
    expires_at.is_some_and(|t| t > now && t <= now.saturating_add(window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_are_refused() {
        let cases: &[(&str, Option<Option<u64>>)] = &[
            ("never", Some(None)),
            ("90s", Some(Some(90))),
            ("15m", Some(Some(900))),
            ("2h", Some(Some(7200))),
            ("1d", Some(Some(86400))),
            ("1h30m", Some(Some(5400))),
            (" 10s ", Some(Some(10))),
            ("15", None),
            ("", None),
            ("m", None),
            ("1w", None),
            ("-5m", None),
            ("99999999999999999999d", None),
        ];
        for (input, want) in cases {
            match want {
                Some(v) => assert_eq!(parse_expires_in(input), Ok(*v), "{input}"),
                None => assert!(
                    matches!(parse_expires_in(input), Err(ExpiryError::BadDuration(_))),
                    "{input}"
                ),
            }
        }
    }

    #[test]
    fn new_expiry_must_be_at_least_the_minimum_ahead() {
        let now = 1000;
        assert_eq!(check_new(None, now, 900), Ok(()));
        assert_eq!(check_new(Some(1900), now, 900), Ok(()));
        assert_eq!(
            check_new(Some(1899), now, 900),
            Err(ExpiryError::TooSoon {
                secs: 899,
                min: 900
            })
        );
        assert_eq!(
            check_new(Some(10), now, 900),
            Err(ExpiryError::TooSoon { secs: 0, min: 900 })
        );
        assert_eq!(check_new(Some(1002), now, 2), Ok(()));
    }

    #[test]
    fn expiry_is_only_ever_extended() {
        let now = 1000;
        let cases = [
            (Some(2000), None, Ok(())),
            (None, None, Ok(())),
            (Some(2000), Some(3000), Ok(())),
            (Some(2000), Some(2000), Ok(())),
            (
                Some(2000),
                Some(1500),
                Err(ExpiryError::Shortened {
                    current: 2000,
                    new: 1500,
                }),
            ),
            (None, Some(5000), Err(ExpiryError::WasNever)),
            (
                Some(1100),
                Some(1200),
                Err(ExpiryError::TooSoon {
                    secs: 200,
                    min: 900,
                }),
            ),
        ];
        for (current, new, want) in cases {
            assert_eq!(
                check_change(current, new, now, 900),
                want,
                "{current:?} → {new:?}"
            );
        }
    }

    #[test]
    fn servers_allow_a_tenth_for_clocks_and_transit() {
        for (min, want) in [(900, 810), (2, 2), (0, 0), (100, 90)] {
            assert_eq!(server_minimum(min), want, "{min}");
        }
    }

    #[test]
    fn expiring_within_a_window() {
        assert!(expiring_within(Some(1500), 1000, 600));
        assert!(!expiring_within(Some(1700), 1000, 600));
        assert!(!expiring_within(Some(1000), 1000, 600), "already expired");
        assert!(!expiring_within(None, 1000, 600));
    }
}
