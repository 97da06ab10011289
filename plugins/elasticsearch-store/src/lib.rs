//! How Trellis logs live in Elasticsearch, shared by the `elasticsearch-logging` and
//! `elasticsearch-browser` plugins (as `file-store` is for the file plugins):
//!
//! * one document per event, id `<instance>:<loggable-type>:<loggable-id>:<seq>`, in the
//!   index named by a template (`trellis-logs-{job}`); fields follow the Elastic Common
//!   Schema where one exists (`@timestamp`, `message`, `event.sequence`, `labels.*`),
//!   JEP-212's metadata under `trellis.*` ([`documents`]);
//! * one more document per closed log, id `<...>:close`, holding the final count;
//! * reading back sorts on `event.sequence` (unique within a log: a total order, so
//!   `search_after` pages are stable without a point in time) and serves only the
//!   contiguous prefix that is visible, because Elasticsearch shows new documents only
//!   after a refresh ([`queries`]).
//!
//! Everything here is plain Rust, unit-tested natively; `client` (wasm32 only) is the
//! HTTP side: settings from `init`, credentials from the secrets store, one call.

#[cfg(target_arch = "wasm32")]
pub mod client;
pub mod documents;
pub mod queries;

/// The log's identity, as JEP-212 names it.
#[derive(Debug, Clone)]
pub struct Meta {
    pub instance_id: String,
    pub loggable_type: String,
    pub loggable_id: String,
    pub job_id: String,
}

impl Meta {
    /// The id of event `seq` (or of the close document, `seq` = None).
    pub fn doc_id(&self, seq: Option<u64>) -> String {
        let tail = seq.map_or_else(|| "close".to_string(), |s| s.to_string());
        format!(
            "{}:{}:{}:{tail}",
            self.instance_id, self.loggable_type, self.loggable_id
        )
    }
}

/// `template` with `{job}` replaced; Elasticsearch index names are lower case and
/// refuse `\ / * ? " < > | , # :` and spaces, so anything else becomes `-`.
pub fn index_name(template: &str, job: &str) -> String {
    let safe: String = job
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let safe = safe.trim_start_matches(['-', '_', '.']);
    template.replace("{job}", if safe.is_empty() { "unnamed" } else { safe })
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-12-02T21:23:17.123Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `2026-12-02T21:23:17.123Z` (what [`rfc3339_ms`] writes; other offsets and precisions
/// too) back to milliseconds since the epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut milli = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = s.get(start..i)?;
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        milli = digits.parse().ok()?;
    }
    let offset_s = match s.get(i..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) - offset_s) * 1000 + milli)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_both_ways() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_764_710_597_123), "2025-12-02T21:23:17.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [
            0,
            1_764_710_597_123,
            951_782_400_000,
            -86_400_001,
            4_102_444_799_999,
        ] {
            assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            parse_rfc3339_ms("2025-12-02T22:23:17.1+01:00"),
            Some(1_764_710_597_100)
        );
        assert_eq!(
            parse_rfc3339_ms("2025-12-02T21:23:17Z"),
            Some(1_764_710_597_000)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn index_names_are_safe() {
        assert_eq!(
            index_name("trellis-logs-{job}", "Build and Test"),
            "trellis-logs-build-and-test"
        );
        assert_eq!(index_name("logs-{job}", "_x/y"), "logs-x-y");
        assert_eq!(index_name("logs-{job}", "___"), "logs-unnamed");
    }
}
