//! A strict reader of the OpenMetrics text exposition that the server and the agent serve on
//! `/metrics`, for tests: any line Prometheus would refuse or misread fails the parse with its
//! line number, where a lenient reader would skip it.
//!
//! It checks the grammar (metadata, metric and label names, escaped label values, numbers,
//! the closing `# EOF`), that every sample belongs to the family declared before it with a
//! suffix its type allows, that no sample or family appears twice, that counters are
//! non-negative and have `_total`, and that each histogram has increasing bounds ending at
//! `+Inf`, cumulative counts and a `_count` equal to its `+Inf` bucket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{Context, ensure};

/// The media type both `/metrics` endpoints must declare, so that Prometheus reads them as
/// OpenMetrics (a counter's samples end in `_total`, which the older format does not expect).
pub const CONTENT_TYPE: &str = "application/openmetrics-text";

/// What a metric family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    Unknown,
}

impl Kind {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "gaugehistogram" => Self::GaugeHistogram,
            "summary" => Self::Summary,
            "info" => Self::Info,
            "stateset" => Self::StateSet,
            "unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// The suffixes a sample name may add to its family's name.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Self::Counter => &["_total", "_created"],
            Self::Histogram => &["_bucket", "_count", "_sum", "_created"],
            Self::GaugeHistogram => &["_bucket", "_gcount", "_gsum"],
            Self::Summary => &["", "_count", "_sum", "_created"],
            Self::Info => &["_info"],
            Self::Gauge | Self::StateSet | Self::Unknown => &[""],
        }
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its metadata and samples, in the order served.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub kind: Kind,
    pub help: Option<String>,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

/// A whole exposition, by family name.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// The value of sample `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// The value of sample `name` with exactly `labels`, 0 when it was not served (a labelled
    /// counter appears only once counted).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The kind of family `name`.
    pub fn kind(&self, family: &str) -> Option<Kind> {
        self.families.get(family).map(|f| f.kind)
    }

    /// Every sample, family by family.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.values().flat_map(|f| f.samples.iter())
    }
}

/// Reads `text`, failing at the first line that is not valid OpenMetrics.
pub fn parse(text: &str) -> anyhow::Result<Exposition> {
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .context("the exposition does not end with `# EOF`")?;
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    // The family samples now belong to, and whether a sample of it was read yet.
    let mut current: Option<(String, bool)> = None;
    let mut typed: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<(String, BTreeMap<String, String>)> = BTreeSet::new();
    for (index, line) in body.lines().enumerate() {
        let number = index + 1;
        let fail = |problem: String| anyhow::anyhow!("line {number} {line:?}: {problem}");
        if let Some(meta) = line.strip_prefix("# ") {
            let (keyword, rest) = meta
                .split_once(' ')
                .ok_or_else(|| fail("metadata without a name".into()))?;
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name).map_err(fail)?;
            let starts_family = current
                .as_ref()
                .is_none_or(|(family, sampled)| family != name || *sampled);
            if starts_family {
                if families.contains_key(name) {
                    return Err(fail(format!("family {name} appears twice")));
                }
                current = Some((name.to_owned(), false));
            }
            let family = families.entry(name.to_owned()).or_insert(Family {
                kind: Kind::Unknown,
                help: None,
                unit: None,
                samples: Vec::new(),
            });
            match keyword {
                "TYPE" => {
                    ensure!(typed.insert(name.to_owned()), fail("a second TYPE".into()));
                    family.kind = Kind::parse(value)
                        .ok_or_else(|| fail(format!("unknown type {value:?}")))?;
                }
                "HELP" => {
                    ensure!(family.help.is_none(), fail("a second HELP".into()));
                    family.help = Some(unescape(value).map_err(fail)?);
                }
                "UNIT" => {
                    ensure!(family.unit.is_none(), fail("a second UNIT".into()));
                    ensure!(
                        value.is_empty() || name.ends_with(&format!("_{value}")),
                        fail(format!("the name does not end with its unit {value}"))
                    );
                    family.unit = Some(value.to_owned());
                }
                other => return Err(fail(format!("unknown metadata {other:?}"))),
            }
            continue;
        }
        ensure!(!line.is_empty(), fail("an empty line".into()));
        ensure!(!line.starts_with('#'), fail("a comment".into()));
        let sample = parse_sample(line).map_err(fail)?;
        let (family_name, sampled) = current
            .as_mut()
            .ok_or_else(|| fail("a sample before any TYPE".into()))?;
        *sampled = true;
        let family = families
            .get_mut(family_name.as_str())
            .ok_or_else(|| fail("a sample without its family".into()))?;
        let suffix = sample
            .name
            .strip_prefix(family_name.as_str())
            .filter(|suffix| family.kind.suffixes().contains(suffix))
            .ok_or_else(|| {
                fail(format!(
                    "{} is no sample of {:?} family {family_name}",
                    sample.name, family.kind
                ))
            })?;
        if family.kind == Kind::Counter && suffix == "_total" {
            ensure!(
                sample.value >= 0.0,
                fail("a counter below zero or NaN".into())
            );
        }
        let key = (sample.name.clone(), sample.labels.clone());
        ensure!(seen.insert(key), fail("the same sample twice".into()));
        family.samples.push(sample);
    }
    for (name, family) in &families {
        check_family(name, family)?;
    }
    Ok(Exposition { families })
}

/// GETs `/metrics` at `address`, checks its media type and parses it.
pub async fn scrape(address: SocketAddr) -> anyhow::Result<Exposition> {
    crate::install_crypto();
    let response = reqwest::get(format!("http://{address}/metrics")).await?;
    ensure!(
        response.status().is_success(),
        "/metrics answered {}",
        response.status()
    );
    let media_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        media_type.starts_with(CONTENT_TYPE),
        "/metrics is served as {media_type:?}, not {CONTENT_TYPE}"
    );
    let text = response.text().await?;
    parse(&text).with_context(|| format!("in:\n{text}"))
}

fn check_family(name: &str, family: &Family) -> anyhow::Result<()> {
    match family.kind {
        Kind::Counter => {
            let total = format!("{name}_total");
            for sample in family.samples.iter().filter(|s| s.name != total) {
                let has_total = family
                    .samples
                    .iter()
                    .any(|s| s.name == total && s.labels == sample.labels);
                ensure!(
                    has_total,
                    "counter {name} has {} without _total",
                    sample.name
                );
            }
        }
        Kind::Histogram => check_histogram(name, family)?,
        _ => {}
    }
    Ok(())
}

/// Buckets ascend to `+Inf`, counts accumulate, and `_count` is the `+Inf` bucket.
fn check_histogram(name: &str, family: &Family) -> anyhow::Result<()> {
    let bucket = format!("{name}_bucket");
    let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in family.samples.iter().filter(|s| s.name == bucket) {
        let mut labels = sample.labels.clone();
        let le = labels
            .remove("le")
            .with_context(|| format!("{bucket} without le"))?;
        let le = parse_number(&le).map_err(|e| anyhow::anyhow!("{bucket} le={le:?}: {e}"))?;
        series.entry(labels).or_default().push((le, sample.value));
    }
    ensure!(!series.is_empty(), "histogram {name} has no buckets");
    for (labels, buckets) in &series {
        for pair in buckets.windows(2) {
            let ((le_a, count_a), (le_b, count_b)) = (pair[0], pair[1]);
            ensure!(
                le_a < le_b,
                "histogram {name}{labels:?}: bounds do not ascend"
            );
            ensure!(
                count_a <= count_b,
                "histogram {name}{labels:?}: counts are not cumulative"
            );
        }
        let (last_le, inf_count) = *buckets.last().context("no bucket")?;
        ensure!(
            last_le == f64::INFINITY,
            "histogram {name}{labels:?}: the last bucket is not +Inf"
        );
        let find = |suffix: &str| {
            let wanted = format!("{name}{suffix}");
            family
                .samples
                .iter()
                .find(|s| s.name == wanted && &s.labels == labels)
                .map(|s| s.value)
        };
        let count = find("_count").with_context(|| format!("histogram {name} without _count"))?;
        ensure!(
            count == inf_count,
            "histogram {name}{labels:?}: _count {count} is not the +Inf bucket {inf_count}"
        );
        ensure!(
            find("_sum").is_some(),
            "histogram {name}{labels:?} without _sum"
        );
    }
    Ok(())
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after)?;
        labels = parsed;
        rest = remainder;
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("no single space before the value")?;
    ensure_no_exemplar(rest)?;
    let mut fields = rest.split(' ');
    let value = parse_number(fields.next().unwrap_or_default())?;
    if let Some(timestamp) = fields.next() {
        parse_number(timestamp).map_err(|e| format!("timestamp: {e}"))?;
    }
    if fields.next().is_some() {
        return Err("more than a value and a timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn ensure_no_exemplar(rest: &str) -> Result<(), String> {
    if rest.contains('#') {
        return Err("an exemplar, which nothing here records".into());
    }
    Ok(())
}

/// Reads `name="value",...}` and returns the labels and what follows the brace.
fn parse_labels(mut text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    if let Some(rest) = text.strip_prefix('}') {
        return Ok((labels, rest));
    }
    loop {
        let eq = text.find('=').ok_or("a label without =")?;
        let name = &text[..eq];
        check_label_name(name)?;
        let quoted = text[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                (false, '\n') => return Err("a newline in a label value".into()),
                _ => {}
            }
        }
        let end = end.ok_or("an unterminated label value")?;
        let value = unescape(&quoted[..end])?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        text = &quoted[end + 1..];
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        text = text
            .strip_prefix(',')
            .ok_or("labels not separated by a comma")?;
    }
}

/// Undoes `\\`, `\n` and `\"`; any other escape is an error.
fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') => out.push('"'),
            other => return Err(format!("an invalid escape \\{other:?}")),
        }
    }
    Ok(out)
}

/// A number as OpenMetrics writes it: decimal or exponent notation, `+Inf`, `-Inf`, `NaN`.
fn parse_number(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match digits.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (digits, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let valid = !(whole.is_empty() && fraction.is_empty())
        && all_digits(whole)
        && all_digits(fraction)
        && exponent.is_none_or(|e| !e.is_empty() && all_digits(e));
    if !valid {
        return Err(format!("{text:?} is not a number"));
    }
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("{name:?} is not a metric name"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!("{name:?} is not a label name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP requests Requests served.\n\
        # TYPE requests counter\n\
        requests_total{code=\"200\",path=\"/a \\\"b\\\"\"} 3\n\
        requests_total{code=\"500\",path=\"/\"} 0\n\
        # HELP up Whether it runs.\n\
        # TYPE up gauge\n\
        up 1\n\
        # HELP wait_seconds Waits.\n\
        # TYPE wait_seconds histogram\n\
        # UNIT wait_seconds seconds\n\
        wait_seconds_sum 0.75\n\
        wait_seconds_count 2\n\
        wait_seconds_bucket{le=\"0.5\"} 1\n\
        wait_seconds_bucket{le=\"1.0\"} 2\n\
        wait_seconds_bucket{le=\"+Inf\"} 2\n\
        # EOF\n";

    #[test]
    fn a_valid_exposition_is_read_whole() {
        let read = parse(GOOD).unwrap();
        assert_eq!(read.kind("requests"), Some(Kind::Counter));
        assert_eq!(
            read.value("requests_total", &[("code", "200"), ("path", "/a \"b\"")]),
            Some(3.0)
        );
        assert_eq!(read.value("up", &[]), Some(1.0));
        assert_eq!(
            read.value("wait_seconds_bucket", &[("le", "+Inf")]),
            Some(2.0)
        );
        assert_eq!(read.value("wait_seconds_count", &[]), Some(2.0));
        assert_eq!(read.count("requests_total", &[("code", "404")]), 0.0);
    }

    #[test]
    fn every_kind_of_mistake_fails_with_its_line() {
        let broken = [
            ("up 1\n", "up 1\n# TYPE up gauge\n"),
            ("# EOF\n", ""),
            ("up 1\n", "up one\n"),
            ("up 1\n", "up  1\n"),
            ("up 1\n", "up{a=\"1\",} 1\n"),
            ("up 1\n", "up{a=\"1\",a=\"2\"} 1\n"),
            ("up 1\n", "up{a=\"\\t\"} 1\n"),
            ("up 1\n", "up{1a=\"x\"} 1\n"),
            ("up 1\n", "up 1\nup 1\n"),
            ("up 1\n", "down 1\n"),
            ("up 1\n", "up 1 # {} 1\n"),
            ("up 1\n", "up inf\n"),
            (
                "requests_total{code=\"500\",path=\"/\"} 0\n",
                "requests_total 0\nrequests 0\n",
            ),
            (
                "requests_total{code=\"500\",path=\"/\"} 0\n",
                "requests_total{code=\"5\"} -1\n",
            ),
            ("wait_seconds_count 2\n", "wait_seconds_count 3\n"),
            (
                "wait_seconds_bucket{le=\"1.0\"} 2\n",
                "wait_seconds_bucket{le=\"1.0\"} 0\n",
            ),
            ("wait_seconds_bucket{le=\"+Inf\"} 2\n", ""),
            ("wait_seconds_sum 0.75\n", ""),
            ("# TYPE up gauge\n", "# TYPE up gauge\n# TYPE up gauge\n"),
            (
                "# UNIT wait_seconds seconds\n",
                "# UNIT wait_seconds bytes\n",
            ),
            ("# TYPE up gauge\n", "# TYPE up gauges\n"),
            ("up 1\n", "up 1\n\n"),
            ("up 1\n", "up 1\n# a comment\n"),
        ];
        for (good, bad) in broken {
            assert!(GOOD.contains(good), "{good}");
            let text = GOOD.replacen(good, bad, 1);
            assert!(parse(&text).is_err(), "accepted:\n{text}");
        }
        let twice = format!(
            "{}# TYPE up gauge\nup 2\n# EOF\n",
            GOOD.strip_suffix("# EOF\n").unwrap()
        );
        assert!(parse(&twice).is_err(), "a family twice");
    }

    #[test]
    fn numbers_are_read_as_openmetrics_writes_them() {
        for (text, value) in [
            ("1", 1.0),
            ("-2.5", -2.5),
            ("1e3", 1000.0),
            ("1.5E-3", 0.0015),
            (".5", 0.5),
            ("+Inf", f64::INFINITY),
            ("-Inf", f64::NEG_INFINITY),
        ] {
            assert_eq!(parse_number(text), Ok(value), "{text}");
        }
        assert!(parse_number("NaN").unwrap().is_nan());
        for text in [
            "", "inf", "nan", "infinity", "1.2.3", "0x10", "1e", "e3", ".",
        ] {
            assert!(parse_number(text).is_err(), "{text}");
        }
    }
}
