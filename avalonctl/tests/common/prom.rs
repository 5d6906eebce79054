//! Scraping and parsing Prometheus text exposition (format 0.0.4) for the
//! metrics tests: a strict parser, so a malformed line fails the test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: the declared type of each family, and the samples.
#[derive(Debug, Default)]
pub struct Scrape {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Sum of the samples named `name` whose labels include `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// True if a sample named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

/// GETs `http://addr/path` (HTTP/1.1, connection closed after) and returns
/// the status code and body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status code"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| std::io::Error::other("bad chunked body"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut b: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = b.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        b = rest.get(n + 2..)?;
    }
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse().map_err(|e| format!("bad value {v:?}: {e}")),
    }
}

/// Parses `name{k="v",...}` at the start of `s`; returns it and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let (key, r) = rest.split_once('=').ok_or("label without =")?;
        let key = key.trim();
        if !valid_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut chars = r.strip_prefix('"').ok_or("label value not quoted")?.chars();
        let mut value = String::new();
        loop {
            match chars.next().ok_or("unterminated label value")? {
                '"' => break,
                '\\' => match chars.next().ok_or("dangling escape")? {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                c => value.push(c),
            }
        }
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = chars.as_str();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The family a sample belongs to (histogram/summary suffixes removed
/// when the base name has such a type).
fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suf in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suf) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base;
            }
        }
    }
    name
}

/// Parses a whole exposition; every line must be well formed, every
/// sample's family declared by a `# TYPE` line before it, each family
/// declared once, and every histogram consistent (cumulative buckets
/// ending in `+Inf` equal to `_count`).
pub fn parse(text: &str) -> Result<Scrape, String> {
    let mut sc = Scrape::default();
    for (i, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut w = c.split_whitespace();
            match w.next() {
                Some("TYPE") => {
                    let name = w.next().ok_or_else(|| err("TYPE without name".into()))?;
                    let ty = w.next().ok_or_else(|| err("TYPE without type".into()))?;
                    if !valid_name(name) {
                        return Err(err("bad metric name".into()));
                    }
                    if !matches!(
                        ty,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(err(format!("unknown type {ty}")));
                    }
                    if sc.types.insert(name.into(), ty.into()).is_some() {
                        return Err(err("family declared twice".into()));
                    }
                }
                Some("HELP") => {
                    let name = w.next().ok_or_else(|| err("HELP without name".into()))?;
                    if !valid_name(name) {
                        return Err(err("bad metric name".into()));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        let end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..end];
        if !valid_name(name) {
            return Err(err("bad metric name".into()));
        }
        let (labels, rest) = match line[end..].strip_prefix('{') {
            Some(r) => parse_labels(r).map_err(err)?,
            None => (BTreeMap::new(), &line[end..]),
        };
        let mut w = rest.split_whitespace();
        let value = parse_value(w.next().ok_or_else(|| err("no value".into()))?).map_err(err)?;
        if let Some(ts) = w.next() {
            ts.parse::<i64>()
                .map_err(|e| err(format!("bad timestamp: {e}")))?;
        }
        if w.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let fam = family(name, &sc.types);
        let Some(ty) = sc.types.get(fam) else {
            return Err(err(format!("sample of undeclared family {fam}")));
        };
        // NaN is not a valid counter either.
        if ty == "counter" && (value.is_nan() || value < 0.0) {
            return Err(err("negative counter".into()));
        }
        sc.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    check_histograms(&sc)?;
    Ok(sc)
}

/// A histogram series' labels (without `le`) and its (le, count) buckets.
type Buckets = BTreeMap<Vec<(String, String)>, Vec<(f64, f64)>>;

fn check_histograms(sc: &Scrape) -> Result<(), String> {
    for (fam, _) in sc.types.iter().filter(|(_, t)| *t == "histogram") {
        // Series of this family by their labels without `le`.
        let mut series: Buckets = BTreeMap::new();
        let bucket = format!("{fam}_bucket");
        for s in sc.samples.iter().filter(|s| s.name == bucket) {
            let le = s
                .labels
                .get("le")
                .ok_or(format!("{bucket} without le"))
                .and_then(|v| parse_value(v))?;
            let key: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{fam}{key:?}: buckets not cumulative"));
            }
            let last = buckets.last().ok_or(format!("{fam}: no buckets"))?;
            if last.0 != f64::INFINITY {
                return Err(format!("{fam}{key:?}: no +Inf bucket"));
            }
            let want: Vec<(&str, &str)> =
                key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let count = sc.sum(&format!("{fam}_count"), &want);
            if count != last.1 {
                return Err(format!(
                    "{fam}{key:?}: +Inf bucket {} but count {count}",
                    last.1
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let good = "# HELP a_total help text\n# TYPE a_total counter\na_total{op=\"x\\\"y\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n";
        let sc = parse(good).expect("valid");
        assert_eq!(sc.sum("a_total", &[("op", "x\"y")]), 3.0);
        assert!(parse("a 1\n").is_err(), "undeclared");
        assert!(parse("# TYPE a gauge\na{b=c} 1\n").is_err(), "unquoted");
        assert!(parse("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n").is_err());
    }
}
