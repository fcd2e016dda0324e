//! Wall-clock timestamps for the store and the audit log: milliseconds since
//! the Unix epoch, shown as RFC 3339 UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// Gregorian calendar <-> day number, counting days from 1970-01-01. The
// computation works in 400-year eras of 146,097 days, with years starting
// in March so that the leap day falls at the end of the year.
fn days_to_civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn civil_to_days(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = days_to_civil(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        ms % 1000
    )
}

/// Parses `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC only) into
/// milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a UTC time (use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ)");
    let (date, rest) = match text.split_once('T') {
        Some((d, r)) => (d, Some(r)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let year: i64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let month: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let day: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    if parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let days = civil_to_days(year, month, day);
    if days_to_civil(days) != (year, month, day) || days < 0 {
        return Err(bad());
    }
    let mut ms = days as u64 * 86_400_000;
    if let Some(rest) = rest {
        let rest = rest.strip_suffix('Z').ok_or_else(bad)?;
        let (hms, frac) = match rest.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let mut f = hms.split(':');
        let h: u64 = f.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let m: u64 = f.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let s: u64 = f.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        if f.next().is_some() || h > 23 || m > 59 || s > 60 {
            return Err(bad());
        }
        ms += (h * 3600 + m * 60 + s) * 1000;
        if let Some(frac) = frac {
            if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let padded = format!("{frac:0<3}");
            ms += padded[..3].parse::<u64>().map_err(|_| bad())?;
        }
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_format_and_parse_back() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_737_600_123), "2026-11-27T00:00:00.123Z");
        for ms in [0, 951_782_400_000, 1_795_737_600_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Ok(ms));
        }
        assert_eq!(parse_rfc3339("2026-11-27"), Ok(1_795_737_600_000));
    }

    #[test]
    fn every_day_for_five_centuries_round_trips() {
        for days in -200_000..200_000 {
            let (y, m, d) = days_to_civil(days);
            assert_eq!(civil_to_days(y, m, d), days);
        }
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "",
            "2026-13-01",
            "2026-02-30",
            "2026-11-27T25:00:00Z",
            "2026-11-27T10:00:00",
            "yesterday",
            "2026-11-27T10:00:00.Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
