//! The event log as the console and the API hand it out: the filters of a
//! query string, one event as JSON, and CSV that a spreadsheet opens as
//! text (fields quoted, formulas defused).

use berth_store::{Event, EventQuery};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::model::{iso, parse_iso};

/// `?user=&kind=&since=&until=&offset=&limit=`, as typed or as the filter
/// form sends it (`since`/`until`: RFC 3339, `YYYY-MM-DD`, or the form's
/// `YYYY-MM-DDTHH:MM`, in UTC).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct EventFilter {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub until: String,
    #[serde(default)]
    pub offset: Option<String>,
    #[serde(default)]
    pub limit: Option<String>,
}

fn number(what: &str, raw: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| ApiError::bad_request(format!("{what} must be a whole number, not {s:?}"))),
    }
}

/// A time the filters accept, in unix ms. A bare date as `until` means the
/// end of that day, so `since=D&until=D` is the day D.
pub fn parse_when(raw: &str, end_of_day: bool) -> Option<i64> {
    let raw = raw.trim();
    if let Some(t) = parse_iso(raw) {
        return Some(t);
    }
    // `YYYY-MM-DDTHH:MM` (an HTML datetime-local field): add the seconds.
    if raw.len() == 16 && raw.as_bytes().get(10) == Some(&b'T') {
        return parse_iso(&format!("{raw}:00Z"));
    }
    if raw.len() == 10 {
        let start = parse_iso(&format!("{raw}T00:00:00Z"))?;
        return Some(if end_of_day { start + 86_400_000 } else { start });
    }
    None
}

impl EventFilter {
    /// The store's query; bad numbers or times are a 400 naming them.
    pub fn query(&self, default_limit: i64) -> Result<EventQuery, ApiError> {
        let when = |what: &str, raw: &str, end: bool| -> Result<Option<i64>, ApiError> {
            if raw.trim().is_empty() {
                return Ok(None);
            }
            parse_when(raw, end).map(Some).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{what} {raw:?} is not a time (use 2026-01-31, 2026-01-31T09:30 or 2026-01-31T09:30:00Z)"
                ))
            })
        };
        Ok(EventQuery {
            user: Some(self.user.clone()).filter(|u| !u.trim().is_empty()),
            kind: Some(self.kind.clone()).filter(|k| !k.trim().is_empty()),
            since: when("since", &self.since, false)?,
            until: when("until", &self.until, true)?,
            offset: number("offset", self.offset.as_deref(), 0)?,
            limit: number("limit", self.limit.as_deref(), default_limit)?,
        })
    }

    /// The filters again as a query string, with `extra` (`offset=50`,
    /// `format=csv`) after them: `?user=al&kind=start&offset=50`.
    pub fn link(&self, extra: &str) -> String {
        let mut parts = vec![form_urlencoded_pairs(&[
            ("user", &self.user),
            ("kind", &self.kind),
            ("since", &self.since),
            ("until", &self.until),
        ])];
        parts.push(extra.to_string());
        let joined = parts.into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>().join("&");
        if joined.is_empty() {
            String::new()
        } else {
            format!("?{joined}")
        }
    }
}

fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| {
            format!("{k}={}", percent_encoding::utf8_percent_encode(v.trim(), percent_encoding::NON_ALPHANUMERIC))
        })
        .collect::<Vec<_>>()
        .join("&")
}

pub fn event_json(e: &Event) -> Value {
    json!({
        "id": e.id,
        "at": iso(e.at),
        "actor": e.actor,
        "kind": e.kind,
        "subject": e.subject,
        "detail": e.detail,
    })
}

/// One CSV field: always quoted (quotes doubled), and text a spreadsheet
/// would run as a formula (`=`, `+`, `-`, `@`, a tab or carriage return
/// first) gets a leading `'`, so it is shown, never evaluated.
pub fn csv_field(s: &str) -> String {
    let defused = match s.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{s}"),
        _ => s.to_string(),
    };
    format!("\"{}\"", defused.replace('"', "\"\""))
}

pub const CSV_HEADER: &str = "\"at\",\"actor\",\"kind\",\"subject\",\"detail\"\r\n";

/// One event as a CSV record (RFC 4180: CRLF line ends; newlines inside
/// fields are kept, within the quotes).
pub fn csv_line(e: &Event) -> String {
    let fields = [iso(e.at), e.actor.clone(), e.kind.clone(), e.subject.clone(), e.detail.clone()];
    let mut line = fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        let cases = [
            ("plain", r#""plain""#),
            ("a,b", r#""a,b""#),
            (r#"say "hi""#, r#""say ""hi""""#),
            ("two\nlines", "\"two\nlines\""),
            ("=HYPERLINK(\"http://x\")", r#""'=HYPERLINK(""http://x"")""#),
            ("+1", r#""'+1""#),
            ("-2+3", r#""'-2+3""#),
            ("@SUM(A1)", r#""'@SUM(A1)""#),
            ("\tx", "\"'\tx\""),
            ("a=b", r#""a=b""#),
            ("", r#""""#),
        ];
        for (raw, want) in cases {
            assert_eq!(csv_field(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn a_csv_line_has_five_fields_and_a_crlf() {
        let e = Event {
            id: "e1".into(),
            at: 0,
            actor: "root".into(),
            kind: "announcement-set".into(),
            subject: "hub".into(),
            detail: "=1+1, \"x\"\nnext".into(),
        };
        assert_eq!(
            csv_line(&e),
            "\"1970-01-01T00:00:00Z\",\"root\",\"announcement-set\",\"hub\",\"'=1+1, \"\"x\"\"\nnext\"\r\n"
        );
    }

    #[test]
    fn filter_times() {
        assert_eq!(parse_when("1970-01-02", false), Some(86_400_000));
        assert_eq!(parse_when("1970-01-02", true), Some(2 * 86_400_000));
        assert_eq!(parse_when("1970-01-01T00:01", false), Some(60_000));
        assert_eq!(parse_when("1970-01-01T00:00:01Z", true), Some(1000));
        for bad in ["yesterday", "1970-13-01", "12", ""] {
            assert_eq!(parse_when(bad, false), None, "{bad:?}");
        }
        let f = EventFilter { since: "soon".into(), ..Default::default() };
        assert!(f.query(10).unwrap_err().message.contains("since \"soon\" is not a time"));
        let f = EventFilter { limit: Some("ten".into()), ..Default::default() };
        assert!(f.query(10).unwrap_err().message.contains("limit must be a whole number"));
        let q = EventFilter { user: " ".into(), kind: "start".into(), ..Default::default() }.query(10).unwrap();
        assert_eq!((q.user, q.kind.as_deref(), q.limit, q.offset), (None, Some("start"), 10, 0));
    }
}
