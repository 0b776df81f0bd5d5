//! Ferry's own subscription options, kept beside librdkafka's in a
//! subscription's `options` under the `ferry.` prefix and never handed to
//! librdkafka.
//!
//! Where a subscription starts reading, with StateFun's names:
//!
//! | `ferry.start.position` | starts each partition the group has no committed offset for |
//! |---|---|
//! | `group-offsets` (default) | where `auto.offset.reset` says |
//! | `earliest` | at its first record |
//! | `latest` | after its last record |
//! | `specific-offsets` | at the offset `ferry.start.offsets` gives it (`partition:offset,...`); a partition not listed as `auto.offset.reset` says |
//! | `at-timestamp` | at its first record whose timestamp is at or after `ferry.start.timestamp` (RFC 3339), or after its last record if there is none |
//!
//! A partition the group has committed an offset for resumes there, whatever
//! the position: the position picks where a subscription begins, and a
//! restarted consumer never reads again what was handed to the log before.
//!
//! `ferry.ordering = "partition"` runs the records of each Kafka partition
//! one at a time, in offset order, on a Service sink (whose invocations
//! otherwise run side by side).
//!
//! `ferry.dead-letter.topic` names a topic that each record whose invocation
//! ends failed is produced to, once, with its key, value and headers and
//! [`ferry_partition::wire::v1::DEAD_LETTER_HEADERS`] saying why and where
//! from; `ferry.dead-letter.cluster` names its cluster (by default the
//! subscription's).

use std::collections::BTreeMap;

use ferry_partition::wire::v1::KafkaTopic;
use serde::{Deserialize, Serialize};

/// The prefix of Ferry's own options.
pub const PREFIX: &str = "ferry.";
pub const START_POSITION: &str = "ferry.start.position";
pub const START_TIMESTAMP: &str = "ferry.start.timestamp";
pub const START_OFFSETS: &str = "ferry.start.offsets";
pub const ORDERING: &str = "ferry.ordering";
pub const DEAD_LETTER_TOPIC: &str = "ferry.dead-letter.topic";
pub const DEAD_LETTER_CLUSTER: &str = "ferry.dead-letter.cluster";

const KNOWN: [&str; 6] =
    [START_POSITION, START_TIMESTAMP, START_OFFSETS, ORDERING, DEAD_LETTER_TOPIC, DEAD_LETTER_CLUSTER];

/// Where a subscription's consumer starts a partition that its group has
/// no committed offset for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartPosition {
    #[default]
    GroupOffsets,
    Earliest,
    Latest,
    /// Offsets by partition.
    SpecificOffsets(BTreeMap<i32, i64>),
    /// Milliseconds since the Unix epoch.
    AtTimestamp(i64),
}

impl StartPosition {
    pub fn name(&self) -> &'static str {
        match self {
            StartPosition::GroupOffsets => "group-offsets",
            StartPosition::Earliest => "earliest",
            StartPosition::Latest => "latest",
            StartPosition::SpecificOffsets(_) => "specific-offsets",
            StartPosition::AtTimestamp(_) => "at-timestamp",
        }
    }

    /// The `auto.offset.reset` it implies, if any.
    fn offset_reset(&self) -> Option<&'static str> {
        match self {
            StartPosition::Earliest => Some("earliest"),
            StartPosition::Latest => Some("latest"),
            _ => None,
        }
    }
}

/// A subscription's options, split into Ferry's and librdkafka's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub start: StartPosition,
    /// `ferry.ordering = "partition"`: the records of one Kafka partition run
    /// one at a time, in offset order (for a Service sink; Virtual Objects
    /// and Workflows run one at a time per key anyway).
    pub ordered: bool,
    /// `ferry.dead-letter.topic` and its cluster (`None`: the subscription's).
    pub dead_letter: Option<(Option<String>, String)>,
}

impl Settings {
    /// Reads Ferry's options out of `options`, refusing unknown `ferry.`
    /// keys, bad values and values that contradict each other.
    pub fn parse(options: &BTreeMap<String, String>) -> Result<Settings, String> {
        if let Some(unknown) = options.keys().find(|k| k.starts_with(PREFIX) && !KNOWN.contains(&k.as_str())) {
            return Err(format!("unknown subscription option {unknown}; Ferry's options are {}", KNOWN.join(", ")));
        }
        let get = |key: &str| options.get(key).map(|v| v.trim());
        let position = get(START_POSITION).unwrap_or("group-offsets");
        let needs =
            |key: &str, what: &str| get(key).ok_or_else(|| format!("{START_POSITION} {position} needs {key} ({what})"));
        let start = match position {
            "group-offsets" => StartPosition::GroupOffsets,
            "earliest" => StartPosition::Earliest,
            "latest" => StartPosition::Latest,
            "specific-offsets" => StartPosition::SpecificOffsets(parse_offsets(needs(START_OFFSETS, "partition:offset,...")?)?),
            "at-timestamp" => StartPosition::AtTimestamp(parse_timestamp(needs(START_TIMESTAMP, "an RFC 3339 time")?)?),
            other => {
                return Err(format!(
                    "unknown {START_POSITION} {other:?}; one of group-offsets, earliest, latest, specific-offsets, at-timestamp"
                ))
            }
        };
        for (key, used_by) in [(START_OFFSETS, "specific-offsets"), (START_TIMESTAMP, "at-timestamp")] {
            if options.contains_key(key) && start.name() != used_by {
                return Err(format!("{key} applies only with {START_POSITION} {used_by}"));
            }
        }
        if let (Some(implied), Some(set)) = (start.offset_reset(), get("auto.offset.reset")) {
            if set != implied {
                return Err(format!("{START_POSITION} {position} contradicts auto.offset.reset {set}"));
            }
        }
        let ordered = match get(ORDERING) {
            None => false,
            Some("partition") => true,
            Some(other) => return Err(format!("unknown {ORDERING} {other:?}; the one ordering is \"partition\"")),
        };
        let dead_letter = match (get(DEAD_LETTER_CLUSTER), get(DEAD_LETTER_TOPIC)) {
            (_, Some("")) => return Err(format!("{DEAD_LETTER_TOPIC} is empty")),
            (Some(_), None) => return Err(format!("{DEAD_LETTER_CLUSTER} applies only with {DEAD_LETTER_TOPIC}")),
            (cluster, Some(topic)) => Some((cluster.filter(|c| !c.is_empty()).map(str::to_owned), topic.to_owned())),
            (None, None) => None,
        };
        Ok(Settings { start, ordered, dead_letter })
    }

    /// The librdkafka properties among `options`, with what the start
    /// position implies.
    pub fn consumer_options(&self, options: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut properties: Vec<(String, String)> =
            options.iter().filter(|(k, _)| !k.starts_with(PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(reset) = self.start.offset_reset() {
            properties.push(("auto.offset.reset".to_owned(), reset.to_owned()));
        }
        properties
    }

    /// Where failed records go, its cluster resolved: the subscription's
    /// (`cluster`) unless the options name another.
    pub fn dead_letter_topic(&self, cluster: &str) -> Option<KafkaTopic> {
        self.dead_letter.as_ref().map(|(named, topic)| KafkaTopic {
            cluster: named.clone().unwrap_or_else(|| cluster.to_owned()),
            topic: topic.clone(),
        })
    }

    /// The partitions the options name, which must exist.
    pub fn partitions(&self) -> Vec<i32> {
        match &self.start {
            StartPosition::SpecificOffsets(offsets) => offsets.keys().copied().collect(),
            _ => Vec::new(),
        }
    }
}

/// `0:100,1:250` -> {0: 100, 1: 250}.
fn parse_offsets(text: &str) -> Result<BTreeMap<i32, i64>, String> {
    let mut offsets = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{START_OFFSETS}: {pair:?} is not partition:offset");
        let (partition, offset) = pair.split_once(':').ok_or_else(bad)?;
        let partition: i32 = partition.trim().parse().map_err(|_| bad())?;
        let offset: i64 = offset.trim().parse().map_err(|_| bad())?;
        if partition < 0 || offset < 0 {
            return Err(format!("{START_OFFSETS}: {pair:?}: partitions and offsets are at least 0"));
        }
        if offsets.insert(partition, offset).is_some() {
            return Err(format!("{START_OFFSETS}: partition {partition} is given twice"));
        }
    }
    if offsets.is_empty() {
        return Err(format!("{START_OFFSETS} names no partition"));
    }
    Ok(offsets)
}

/// An RFC 3339 time (`2026-12-01T08:00:00Z`, `2026-12-01T09:00:00+01:00`)
/// in milliseconds since the Unix epoch.
fn parse_timestamp(text: &str) -> Result<i64, String> {
    let time: jiff::Timestamp =
        text.parse().map_err(|e| format!("{START_TIMESTAMP}: {text:?} is not an RFC 3339 time with an offset: {e}"))?;
    let ms = time.as_millisecond();
    if ms < 0 {
        return Err(format!("{START_TIMESTAMP}: {text:?} is before 1970"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn positions_parse_with_their_arguments() {
        assert_eq!(Settings::parse(&options(&[])).unwrap().start, StartPosition::GroupOffsets);
        assert_eq!(Settings::parse(&options(&[(START_POSITION, "earliest")])).unwrap().start, StartPosition::Earliest);
        let specific =
            Settings::parse(&options(&[(START_POSITION, "specific-offsets"), (START_OFFSETS, "0:100, 2:7")])).unwrap();
        assert_eq!(specific.start, StartPosition::SpecificOffsets(BTreeMap::from([(0, 100), (2, 7)])));
        assert_eq!(specific.partitions(), vec![0, 2]);
        let at = Settings::parse(&options(&[
            (START_POSITION, "at-timestamp"),
            (START_TIMESTAMP, "2026-12-01T09:00:00+01:00"),
        ]))
        .unwrap();
        assert_eq!(at.start, StartPosition::AtTimestamp(1_796_112_000_000));
    }

    #[test]
    fn bad_options_are_refused_with_what_is_wrong() {
        let refused = |pairs: &[(&str, &str)]| Settings::parse(&options(pairs)).unwrap_err();
        assert!(refused(&[(START_POSITION, "newest")]).contains("unknown ferry.start.position \"newest\""));
        assert!(refused(&[("ferry.start.postion", "earliest")]).contains("unknown subscription option"));
        assert!(refused(&[(START_POSITION, "at-timestamp")]).contains("needs ferry.start.timestamp"));
        assert!(refused(&[(START_POSITION, "at-timestamp"), (START_TIMESTAMP, "yesterday")])
            .contains("not an RFC 3339 time"));
        assert!(refused(&[(START_POSITION, "specific-offsets"), (START_OFFSETS, "0=5")])
            .contains("is not partition:offset"));
        assert!(refused(&[(START_POSITION, "specific-offsets"), (START_OFFSETS, "0:5,0:6")]).contains("twice"));
        assert!(refused(&[(START_POSITION, "specific-offsets"), (START_OFFSETS, "-1:5")]).contains("at least 0"));
        assert!(refused(&[(START_OFFSETS, "0:5")]).contains("applies only with"));
        assert!(refused(&[(START_POSITION, "earliest"), ("auto.offset.reset", "latest")]).contains("contradicts"));
        assert!(refused(&[(ORDERING, "global")]).contains("unknown ferry.ordering"));
        assert!(Settings::parse(&options(&[(ORDERING, "partition")])).unwrap().ordered);
        assert!(refused(&[(DEAD_LETTER_TOPIC, " ")]).contains("is empty"));
        assert!(refused(&[(DEAD_LETTER_CLUSTER, "c")]).contains("applies only with ferry.dead-letter.topic"));
        let dead_letter = |pairs: &[(&str, &str)]| Settings::parse(&options(pairs)).unwrap().dead_letter;
        assert_eq!(dead_letter(&[(DEAD_LETTER_TOPIC, "dlq")]), Some((None, "dlq".to_owned())));
        assert_eq!(
            dead_letter(&[(DEAD_LETTER_TOPIC, "dlq"), (DEAD_LETTER_CLUSTER, "other")]),
            Some((Some("other".to_owned()), "dlq".to_owned()))
        );
    }

    #[test]
    fn ferry_options_never_reach_librdkafka() {
        let opts = options(&[(START_POSITION, "earliest"), ("group.id", "g"), ("fetch.wait.max.ms", "10")]);
        let settings = Settings::parse(&opts).unwrap();
        let properties = settings.consumer_options(&opts);
        assert!(properties.iter().all(|(k, _)| !k.starts_with(PREFIX)));
        assert!(properties.contains(&("auto.offset.reset".to_owned(), "earliest".to_owned())));
        assert!(properties.contains(&("group.id".to_owned(), "g".to_owned())));
    }
}
