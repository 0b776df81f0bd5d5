//! A node's `/metrics`, parsed: Prometheus' text format as samples of
//! `name{label="value",...} value`, with lookups by name and labels.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::Node;

/// One line of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

/// Fetches and parses `node`'s `/metrics`.
pub async fn scrape(node: &Node) -> Result<Metrics> {
    let url = format!("http://127.0.0.1:{}/metrics", node.node_port);
    let response = node.http.get(&url).send().await?;
    if !response.status().is_success() {
        bail!("GET {url}: {}", response.status());
    }
    Metrics::parse(&response.text().await?)
}

impl Metrics {
    /// Parses the text format; comments and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Metrics> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_line(line).with_context(|| format!("metrics line {line:?}")))
            .collect::<Result<_>>()?;
        Ok(Metrics { samples })
    }

    /// The samples of `name` that carry every one of `labels`.
    pub fn select<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|value| value == v))
        })
    }

    /// The value of the one sample of `name` with `labels`; `None` when there
    /// is none, an error when several match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        let matching: Vec<&Sample> = self.select(name, labels).collect();
        match matching.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            many => bail!("{} samples of {name} match {labels:?}: {many:?}", many.len()),
        }
    }

    /// The sum of every sample of `name` with `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.select(name, labels).map(|s| s.value).sum()
    }
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            inside = inside.trim_start_matches([',', ' ']);
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inside.split_once('=').context("label without '='")?;
            let after = after.strip_prefix('"').with_context(|| format!("label {key} has no quoted value"))?;
            let (value, after) = unquote(after)?;
            labels.insert(key.trim().to_owned(), value);
            inside = after;
        }
    }
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().with_context(|| format!("value {other:?}"))?,
    };
    Ok(Sample { name, labels, value })
}

/// Reads a label value up to its closing quote: (value, what follows it).
fn unquote(text: &str) -> Result<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, escaped)) => value.push(escaped),
                None => bail!("dangling escape"),
            },
            other => value.push(other),
        }
    }
    bail!("unterminated label value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_labels_and_values() {
        let text = "# HELP x a counter\n# TYPE x counter\nx 3\n\
            y{a=\"1\",b=\"two, \\\"quoted\\\"\"} 2.5\n\
            z_bucket{le=\"+Inf\",group=\"1\"} 7 1700000000\n\n\
            w{} +Inf\n";
        let metrics = Metrics::parse(text).unwrap();
        assert_eq!(metrics.samples.len(), 4);
        assert_eq!(metrics.get("x", &[]).unwrap(), Some(3.0));
        assert_eq!(metrics.get("y", &[("a", "1")]).unwrap(), Some(2.5));
        assert_eq!(metrics.samples[1].labels["b"], "two, \"quoted\"");
        assert_eq!(metrics.get("z_bucket", &[("group", "1"), ("le", "+Inf")]).unwrap(), Some(7.0));
        assert_eq!(metrics.get("w", &[]).unwrap(), Some(f64::INFINITY));
        assert_eq!(metrics.get("y", &[("a", "2")]).unwrap(), None);
        assert_eq!(metrics.sum("nothing", &[]), 0.0);
    }

    #[test]
    fn several_matches_are_an_error_for_get_and_add_up_for_sum() {
        let metrics = Metrics::parse("c{code=\"200\"} 2\nc{code=\"404\"} 1\n").unwrap();
        assert!(metrics.get("c", &[]).is_err());
        assert_eq!(metrics.sum("c", &[]), 3.0);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in ["x", "x{a=\"1\" 2", "x{a=1} 2", "x{a=\"1\"}", "x nope"] {
            assert!(Metrics::parse(bad).is_err(), "{bad}");
        }
    }
}
