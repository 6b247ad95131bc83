//! Types shared by several Istio resources (string matches, durations, percentages, port
//! selectors, destinations, header operations).
//!
//! Istio's protobuf `oneof`s are modelled as structs of options rather than Rust enums: serde_yaml
//! writes enums as YAML tags (`!exact foo`), which is not the Istio YAML form, and we must
//! serialise back to exactly what Istio accepts. `validate` checks that exactly one member is set.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Istio `StringMatch`: exactly one of `exact`, `prefix`, `regex`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    /// Exact string match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Prefix-based match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2-style regex match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

impl StringMatch {
    /// Number of members set (a valid match has exactly one).
    pub fn members_set(&self) -> usize {
        [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.regex.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count()
    }
}

/// A protobuf `Duration` in its JSON/YAML form ("1.5s", "250ms", "1h30m").
///
/// Kept as the original string so `to_yaml` round-trips byte-for-byte; [`Duration::parse`] is
/// what validation uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

impl Duration {
    /// Parses a command-line duration (same syntax) and checks it lies in `min..=max`.
    pub fn parse_in(
        text: &str,
        min: std::time::Duration,
        max: std::time::Duration,
    ) -> Result<std::time::Duration, String> {
        let value = Duration(text.to_owned()).parse()?;
        if value < min || value > max {
            return Err(format!("`{text}` is out of range ({min:?} to {max:?})"));
        }
        Ok(value)
    }

    /// Parses Go/Istio duration syntax: one or more `<decimal><unit>` groups, units `ns`, `us`,
    /// `µs`, `ms`, `s`, `m`, `h`. Negative durations and bare numbers are rejected.
    pub fn parse(&self) -> Result<std::time::Duration, String> {
        let text = self.0.trim();
        if text.is_empty() {
            return Err("empty duration".into());
        }
        let mut rest = text;
        let mut total_nanos: f64 = 0.0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, tail) = rest.split_at(number_len);
            if number.is_empty() || number == "." {
                return Err(format!(
                    "`{text}` is not a duration like \"1.5s\" or \"250ms\""
                ));
            }
            let value: f64 = number
                .parse()
                .map_err(|_| format!("`{number}` in `{text}` is not a number"))?;
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, after) = tail.split_at(unit_len);
            let scale = match unit {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                "" => {
                    return Err(format!(
                        "`{text}` has no unit (use e.g. \"1s\" or \"250ms\")"
                    ))
                }
                other => {
                    return Err(format!(
                        "`{other}` in `{text}` is not a duration unit (ns, us, ms, s, m, h)"
                    ))
                }
            };
            total_nanos += value * scale;
            rest = after;
        }
        // Protobuf durations stop at about 10,000 years; anything near u64 nanos is a typo.
        if total_nanos > 315_576_000_000.0 * 1e9 {
            return Err(format!("`{text}` is longer than protobuf allows"));
        }
        Ok(std::time::Duration::from_nanos(total_nanos.round() as u64))
    }
}

/// Istio `Percent`: a value in 0.0..=100.0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percent {
    /// Percentage in the range 0.0 - 100.0.
    #[serde(default)]
    pub value: f64,
}

/// Istio `PortSelector`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    /// Port number (parsed wide so range errors name the field, not the integer type).
    pub number: i64,
}

/// Istio `Destination`: a host, optional subset, optional port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Service registry name (short names are completed with the rule's namespace).
    pub host: String,
    /// Subset name from a DestinationRule for `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Port on `host`; required when the host has several ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// Istio `Headers`: request and response header manipulation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    /// Operations on request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    /// Operations on response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// Istio `HeaderOperations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Overwrite headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Istio `WorkloadSelector` (parsed so we can reject it with a precise message).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels selecting workloads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::Duration;

    fn parse(text: &str) -> Result<std::time::Duration, String> {
        Duration(text.into()).parse()
    }

    #[test]
    fn durations_in_istio_forms_parse() {
        assert_eq!(
            parse("1.5s").unwrap(),
            std::time::Duration::from_millis(1500)
        );
        assert_eq!(
            parse("250ms").unwrap(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(
            parse("1h30m").unwrap(),
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(parse("10us").unwrap(), std::time::Duration::from_micros(10));
    }

    #[test]
    fn malformed_durations_are_rejected() {
        for bad in ["", "10", "-1s", "1.5", "s", "1x", "1s2", "..s"] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
