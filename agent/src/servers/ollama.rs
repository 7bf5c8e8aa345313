//! Ollama's `GET /api/ps`: the models a server has loaded, how much of each is in GPU memory,
//! and when it unloads them (`api/types.go`: `ProcessResponse`, `ProcessModelResponse`).

use serde::{Deserialize, Serialize};

use crate::identity::sanitize_label;

/// Models kept from one answer at most.
pub const MAX_MODELS: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadedModel {
    /// Sanitised and length-bounded, like every label value.
    pub name: String,
    pub size_bytes: u64,
    pub vram_bytes: u64,
    /// When Ollama unloads the model unless it is used again (Unix seconds).
    pub expires_at: Option<f64>,
}

#[derive(Deserialize)]
struct Ps {
    models: Vec<PsModel>,
}

#[derive(Deserialize)]
struct PsModel {
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    size_vram: u64,
    #[serde(default)]
    expires_at: Option<String>,
}

/// The loaded models, at most [`MAX_MODELS`]; None when `body` is not an `/api/ps` answer.
pub fn parse_ps(body: &[u8]) -> Option<Vec<LoadedModel>> {
    let ps: Ps = serde_json::from_slice(body).ok()?;
    Some(
        ps.models
            .into_iter()
            .take(MAX_MODELS)
            .map(|m| LoadedModel {
                name: sanitize_label(&m.name),
                size_bytes: m.size,
                vram_bytes: m.size_vram,
                expires_at: m.expires_at.as_deref().and_then(unix_seconds),
            })
            .collect(),
    )
}

/// An RFC 3339 time (`2024-06-04T14:38:31.83753-07:00`, `…Z`) as Unix seconds; None before
/// 1970 (Go's zero time: no expiry) or when malformed. Every field has its fixed width, so no
/// arithmetic below can overflow whatever the server sends.
fn unix_seconds(text: &str) -> Option<f64> {
    let num = |s: &str| -> Option<i64> {
        (matches!(s.len(), 2 | 4) && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut d = date.splitn(3, '-');
    let (year, month, day) = (d.next()?, d.next()?, d.next()?);
    if year.len() != 4 || month.len() != 2 || day.len() != 2 {
        return None;
    }
    let (y, m, day) = (num(year)?, num(month)?, num(day)?);
    let zone_at = time.rfind(['Z', 'z', '+', '-'])?;
    let (clock, zone) = time.split_at(zone_at);
    let offset = match zone {
        "Z" | "z" => 0,
        _ => {
            let (hh, mm) = zone[1..].split_once(':')?;
            let minutes = num(hh)? * 60 + num(mm)?;
            if zone.starts_with('-') {
                -minutes * 60
            } else {
                minutes * 60
            }
        }
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut c = hms.splitn(3, ':');
    let (h, min, s) = (num(c.next()?)?, num(c.next()?)?, num(c.next()?)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    if y < 1000 || fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let fraction: f64 = if fraction.is_empty() {
        0.0
    } else {
        format!("0.{fraction}").parse().ok()?
    };
    // Days from 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + h * 3600 + min * 60 + s - offset;
    (seconds >= 0).then_some(seconds as f64 + fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_ps_answer() {
        let body = br#"{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b","size":2019393189,"digest":"baf6a787fdff","details":{"family":"llama","parameter_size":"1.2B","quantization_level":"Q8_0"},"expires_at":"2024-06-04T14:38:31.83753-07:00","size_vram":2019393189,"context_length":4096},{"name":"bad name?token=abc","size":5}]}"#;
        let models = parse_ps(body).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].name, "llama3.2:1b");
        assert_eq!(models[0].size_bytes, 2_019_393_189);
        assert_eq!(models[0].vram_bytes, 2_019_393_189);
        let at = models[0].expires_at.unwrap();
        assert!((at - 1_717_537_111.837_53).abs() < 1e-3, "{at}");
        assert_eq!(models[1].name, "bad_name");
        assert_eq!(models[1].expires_at, None);
        assert_eq!(parse_ps(br#"{"models":[]}"#), Some(vec![]));
        assert_eq!(parse_ps(b"<html>"), None);
        assert_eq!(parse_ps(br#"{"models":[{"name":"x","size":-1}]}"#), None);
        let many = format!(
            r#"{{"models":[{}]}}"#,
            vec![r#"{"name":"m"}"#; 100].join(",")
        );
        assert_eq!(parse_ps(many.as_bytes()).unwrap().len(), MAX_MODELS);
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(unix_seconds("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(unix_seconds("2024-06-04T21:38:31Z"), Some(1_717_537_111.0));
        assert_eq!(
            unix_seconds("2024-06-05T00:38:31+03:00"),
            Some(1_717_537_111.0)
        );
        assert_eq!(unix_seconds("0001-01-01T00:00:00Z"), None);
        assert_eq!(unix_seconds("2024-13-01T00:00:00Z"), None);
        assert_eq!(unix_seconds("yesterday"), None);
        assert_eq!(unix_seconds("99999999999999999999-01-01T00:00:00Z"), None);
        assert_eq!(
            unix_seconds("2024-01-01T00:00:00+999999999999999999:00"),
            None
        );
        assert_eq!(unix_seconds("2024-01-01T00:00:00.1234567890123Z"), None);
        assert_eq!(unix_seconds("2024-06-04T21:38:31"), None);
    }
}
