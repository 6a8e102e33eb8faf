//! What is persisted, as its own versioned types: the gate's types may change shape freely,
//! and every conversion happens here, at the store's edge.

use serde::{Deserialize, Serialize};

use super::{AgentState, StoreError};
use crate::gate::{
    AgentGate, Before, Decision, Hold, Outcome, Pin, Pipeline, PipelineStatus, Push, Rejected,
    Revision, Sha,
};

/// The layout this version writes; a store holding another refuses to start.
pub const LAYOUT_VERSION: &str = "2";

fn corrupt(key: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}

/// An agent's core record: small, rewritten by every decision about the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum AgentRecord {
    #[serde(rename = "1")]
    V1(AgentRecordV1),
}

/// Version 1 of the agent record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecordV1 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<RevisionV1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<RevisionV1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<(String, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<(Sha, String, i64)>,
    pub generation: u64,
    pub facts_position: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Version 1 of a revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevisionV1 {
    pub sha: Sha,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_id: Option<u64>,
    pub reason: String,
    pub decided_at_ms: i64,
    pub generation: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_prune: bool,
}

impl From<&Revision> for RevisionV1 {
    fn from(r: &Revision) -> Self {
        Self {
            sha: r.sha.clone(),
            pipeline_id: r.pipeline_id,
            reason: r.reason.clone(),
            decided_at_ms: r.decided_at_ms,
            generation: r.generation,
            force_prune: r.force_prune,
        }
    }
}

impl From<RevisionV1> for Revision {
    fn from(r: RevisionV1) -> Self {
        Self {
            sha: r.sha,
            pipeline_id: r.pipeline_id,
            reason: r.reason,
            decided_at_ms: r.decided_at_ms,
            generation: r.generation,
            force_prune: r.force_prune,
        }
    }
}

/// One decision in an agent's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum DecisionRecord {
    #[serde(rename = "1")]
    V1(DecisionV1),
}

/// Version 1 of a decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionV1 {
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<Sha>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_id: Option<u64>,
    pub reason: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<Sha>,
}

/// Encodes a decision for the history.
pub fn encode_decision(d: &Decision) -> String {
    let record = DecisionRecord::V1(DecisionV1 {
        outcome: d.outcome,
        sha: d.sha.clone(),
        pipeline_id: d.pipeline_id,
        reason: d.reason.clone(),
        at_ms: d.at_ms,
        superseded_by: d.superseded_by.clone(),
    });
    // Serialising plain data into a string cannot fail.
    serde_json::to_string(&record).unwrap_or_default()
}

/// Decodes a deployed commit of the set stored under `key`.
pub fn decode_deployed(key: &str, text: &[u8]) -> Result<Sha, StoreError> {
    let text = std::str::from_utf8(text).map_err(|e| corrupt(key, e))?;
    Sha::parse(text).map_err(|e| corrupt(key, format!("deployed commit {text:?}: {e}")))
}

/// Decodes a decision of the history stored under `key`.
pub fn decode_decision(key: &str, text: &[u8]) -> Result<Decision, StoreError> {
    let DecisionRecord::V1(d) = serde_json::from_slice(text).map_err(|e| corrupt(key, e))?;
    Ok(Decision {
        outcome: d.outcome,
        sha: d.sha,
        pipeline_id: d.pipeline_id,
        reason: d.reason,
        at_ms: d.at_ms,
        superseded_by: d.superseded_by,
    })
}

/// Encodes the core of an agent's state (the history and deployed set are kept apart).
pub fn encode_agent(state: &AgentState) -> String {
    let gate = &state.gate;
    let record = AgentRecord::V1(AgentRecordV1 {
        position: gate.position.as_ref().map(RevisionV1::from),
        desired: gate.desired.as_ref().map(RevisionV1::from),
        paused: gate.paused.as_ref().map(|h| (h.reason.clone(), h.since_ms)),
        pinned: gate
            .pinned
            .as_ref()
            .map(|p| (p.sha.clone(), p.reason.clone(), p.since_ms)),
        generation: gate.generation,
        facts_position: state.position,
        traceparent: state.traceparent.clone(),
    });
    serde_json::to_string(&record).unwrap_or_default()
}

/// Rebuilds an agent's state from its core record, history (oldest first) and deployed set.
pub fn decode_agent(
    key: &str,
    core: &[u8],
    decisions: Vec<Decision>,
    deployed: Vec<Sha>,
) -> Result<AgentState, StoreError> {
    let AgentRecord::V1(r) = serde_json::from_slice(core).map_err(|e| corrupt(key, e))?;
    Ok(AgentState {
        gate: AgentGate {
            position: r.position.map(Revision::from),
            desired: r.desired.map(Revision::from),
            paused: r.paused.map(|(reason, since_ms)| Hold { reason, since_ms }),
            pinned: r.pinned.map(|(sha, reason, since_ms)| Pin {
                sha,
                reason,
                since_ms,
            }),
            generation: r.generation,
            decisions: decisions.into(),
            deployed: deployed.into(),
        },
        position: r.facts_position,
        traceparent: r.traceparent,
    })
}

/// The field a pipeline's record is stored under in its ref's pipeline hash.
pub fn pipeline_field(sha: &Sha, id: u64) -> String {
    format!("{sha}:{id}")
}

/// A pipeline record in the form the merge script compares: `status|as_of_ms|source`, and
/// its passed stages apart, as a JSON array the script never looks into.
pub fn encode_pipeline(pipeline: &Pipeline) -> (String, String) {
    let as_of = pipeline
        .as_of_ms
        .map(|ms| ms.to_string())
        .unwrap_or_default();
    // The source is a GitLab enum; a separator in it would only confuse this record.
    let source = pipeline.source.replace('|', "_");
    let head = format!("{}|{as_of}|{source}", pipeline.status.as_str());
    let stages = serde_json::to_string(&pipeline.passed_stages).unwrap_or_else(|_| "[]".into());
    (head, stages)
}

/// Decodes a pipeline record stored under `field` of `key`.
pub fn decode_pipeline(
    key: &str,
    field: &str,
    head: &str,
    stages: Option<&str>,
) -> Result<(Sha, Pipeline), StoreError> {
    let bad = |why: &str| corrupt(&format!("{key} {field}"), why);
    let (sha, id) = field
        .rsplit_once(':')
        .ok_or_else(|| bad("no pipeline id"))?;
    let sha = Sha::parse(sha).map_err(|e| bad(&e.to_string()))?;
    let id = id.parse().map_err(|_| bad("bad pipeline id"))?;
    let mut parts = head.splitn(3, '|');
    let status = parts.next().ok_or_else(|| bad("no status"))?;
    let status = PipelineStatus::parse(status).map_err(|e| bad(&e.to_string()))?;
    let as_of_ms = match parts.next() {
        None | Some("") => None,
        Some(ms) => Some(ms.parse().map_err(|_| bad("bad time"))?),
    };
    let source = parts.next().unwrap_or_default().to_owned();
    let passed_stages = match stages {
        Some(json) => serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?,
        None => Vec::new(),
    };
    Ok((
        sha,
        Pipeline {
            id,
            status,
            source,
            as_of_ms,
            passed_stages,
        },
    ))
}

/// A push record: `before|after|at_ms`, an empty side for none (a branch created or
/// deleted) and `?` for a `before` not known.
pub fn encode_push(push: &Push) -> String {
    let before = match &push.before {
        Before::Created => String::new(),
        Before::Head(sha) => sha.to_string(),
        Before::Unknown => UNKNOWN_BEFORE.to_owned(),
    };
    let after = push.after.as_ref().map(Sha::to_string).unwrap_or_default();
    format!("{before}|{after}|{}", push.at_ms)
}

/// How a push record spells a `before` not known. Not a SHA, so no record written before
/// it existed reads as one.
const UNKNOWN_BEFORE: &str = "?";

/// Decodes a push record of `key`.
pub fn decode_push(key: &str, text: &str) -> Result<Push, StoreError> {
    let bad = |why: &str| corrupt(key, format!("push record {text:?}: {why}"));
    let mut parts = text.split('|');
    let mut next = || parts.next().ok_or_else(|| bad("too short"));
    let side = |part: &str| -> Result<Option<Sha>, StoreError> {
        match part {
            "" => Ok(None),
            sha => Sha::parse(sha).map(Some).map_err(|e| bad(&e.to_string())),
        }
    };
    let before = match next()? {
        UNKNOWN_BEFORE => Before::Unknown,
        part => side(part)?.map_or(Before::Created, Before::Head),
    };
    let after = side(next()?)?;
    let at_ms = next()?.parse().map_err(|_| bad("bad time"))?;
    Ok(Push {
        before,
        after,
        at_ms,
    })
}

/// Encodes a rejected claim.
pub fn encode_rejected(rejected: &Rejected) -> String {
    serde_json::to_string(rejected).unwrap_or_default()
}

/// Decodes a rejected claim of `key`.
pub fn decode_rejected(key: &str, text: &[u8]) -> Result<Rejected, StoreError> {
    serde_json::from_slice(text).map_err(|e| corrupt(key, e))
}

/// A ref's record in the embedded store's file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum RefFactsRecord {
    #[serde(rename = "1")]
    V1(RefFactsV1),
    #[serde(rename = "2")]
    V2(RefFactsV2),
}

/// Version 1: every fact of the ref in one record, the same texts as Redis's lists and
/// hashes. Read (and rewritten as version 2) when a file written before is opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefFactsV1 {
    pub position: u64,
    pub pushes: Vec<String>,
    /// (field, head, passed stages) of [`encode_pipeline`].
    pub pipelines: Vec<(String, String, String)>,
    pub rejected: Vec<String>,
}

/// Version 2: the ref's position and where its pushes and rejected claims are in their
/// rings. Those and each pipeline are records of their own, so that a fact writes this
/// record and its own entry, whatever the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefFactsV2 {
    pub position: u64,
    pub pushes: RingV1,
    pub rejected: RingV1,
}

/// A ref's facts, decoded.
pub type RefFactsParts = (u64, Vec<Push>, Vec<(Sha, Pipeline)>, Vec<Rejected>);

/// What a ref's record in the file holds.
#[derive(Debug)]
pub enum RefFactsFile {
    /// Written by this version: the facts are read from their own records.
    Split(RefFactsV2),
    /// Written by an earlier version, every fact in it.
    Whole(RefFactsParts),
}

/// Encodes a ref's record for the embedded store's file.
pub fn encode_ref_facts(record: RefFactsV2) -> Vec<u8> {
    serde_json::to_vec(&RefFactsRecord::V2(record)).unwrap_or_default()
}

/// Decodes the ref record of `key` written by [`encode_ref_facts`] or an earlier version.
pub fn decode_ref_facts(key: &str, bytes: &[u8]) -> Result<RefFactsFile, StoreError> {
    let r = match serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))? {
        RefFactsRecord::V2(record) => return Ok(RefFactsFile::Split(record)),
        RefFactsRecord::V1(r) => r,
    };
    let pushes = r
        .pushes
        .iter()
        .map(|text| decode_push(key, text))
        .collect::<Result<_, _>>()?;
    let pipelines = r
        .pipelines
        .iter()
        .map(|(field, head, stages)| decode_pipeline(key, field, head, Some(stages)))
        .collect::<Result<_, _>>()?;
    let rejected = r
        .rejected
        .iter()
        .map(|text| decode_rejected(key, text.as_bytes()))
        .collect::<Result<_, _>>()?;
    Ok(RefFactsFile::Whole((
        r.position, pushes, pipelines, rejected,
    )))
}

/// A pipeline's record of its own in the embedded store's file: [`encode_pipeline`]'s two
/// parts.
pub fn encode_pipeline_entry(pipeline: &Pipeline) -> Vec<u8> {
    serde_json::to_vec(&encode_pipeline(pipeline)).unwrap_or_default()
}

/// Decodes the pipeline record of `key`, stored under `field` ([`pipeline_field`]).
pub fn decode_pipeline_entry(
    key: &str,
    field: &str,
    bytes: &[u8],
) -> Result<(Sha, Pipeline), StoreError> {
    let (head, stages): (String, String) =
        serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))?;
    decode_pipeline(key, field, &head, Some(&stages))
}

/// An agent's record in the embedded store's file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum AgentFileRecord {
    #[serde(rename = "1")]
    V1(AgentFileV1),
    #[serde(rename = "2")]
    V2(AgentFileV2),
}

/// Version 1: the version, and the same texts as Redis's record, history and deployed list,
/// all in one record. Read (and rewritten as version 2) when a file written before is opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentFileV1 {
    pub version: u64,
    pub core: String,
    pub decisions: Vec<String>,
    pub deployed: Vec<Sha>,
}

/// Version 2: the version, the core record, and where the decisions and deployed commits
/// are in their rings, which are records of their own: a decision rewrites this record and
/// one entry of each ring, not the whole history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentFileV2 {
    pub version: u64,
    /// The incarnation of the agent the record belongs to; absent from records of agents
    /// without one and from records written before it was kept.
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub incarnation: u64,
    pub core: String,
    pub decisions: RingV1,
    pub deployed: RingV1,
}

/// Which entries of a ring are live: entry `n` is kept in slot `n % capacity`, and the live
/// ones are the newest `len` of the `appended` ever written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingV1 {
    pub appended: u64,
    pub len: usize,
    /// The slots it was laid out in, so that a version keeping more or fewer entries reads
    /// each where it was written; absent from records written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
}

impl RingV1 {
    /// A ring of `capacity` slots whose live entries are the newest `len` of `appended`.
    pub fn laid_out(appended: u64, len: usize, capacity: usize) -> Self {
        Self {
            appended,
            len,
            capacity: Some(capacity),
        }
    }

    /// Its slots: those recorded, or `current` for a record written before they were, when
    /// every ring had the capacity it has now.
    pub fn slots(self, current: usize) -> usize {
        self.capacity.unwrap_or(current)
    }

    /// The numbers of the live entries, oldest first.
    pub fn live(self) -> std::ops::Range<u64> {
        self.appended.saturating_sub(self.len as u64)..self.appended
    }

    /// Where the entry in `slot` of a ring of `capacity` is among the live ones, if it is.
    pub fn index_of(self, slot: u64, capacity: usize) -> Option<usize> {
        let capacity = capacity as u64;
        if slot >= capacity {
            return None;
        }
        let oldest = self.live().start % capacity;
        let index = (slot + capacity - oldest) % capacity;
        (index < self.len as u64).then_some(index as usize)
    }
}

/// What an agent's record in the file holds.
#[derive(Debug)]
pub enum AgentFile {
    /// Written by this version: the rings are read from their own records.
    Split(AgentFileV2),
    /// Written by an earlier version, history and all.
    Whole {
        version: u64,
        state: Box<AgentState>,
    },
}

/// Encodes an agent's record at `version`, its core already encoded.
pub fn encode_agent_file(
    version: u64,
    incarnation: u64,
    core: &str,
    decisions: RingV1,
    deployed: RingV1,
) -> Vec<u8> {
    let record = AgentFileRecord::V2(AgentFileV2 {
        version,
        incarnation,
        core: core.to_owned(),
        decisions,
        deployed,
    });
    serde_json::to_vec(&record).unwrap_or_default()
}

/// Decodes the record of `key` written by [`encode_agent_file`] or an earlier version.
pub fn decode_agent_file(key: &str, bytes: &[u8]) -> Result<AgentFile, StoreError> {
    match serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))? {
        AgentFileRecord::V2(r) => Ok(AgentFile::Split(r)),
        AgentFileRecord::V1(r) => {
            let decisions = r
                .decisions
                .iter()
                .map(|text| decode_decision(key, text.as_bytes()))
                .collect::<Result<_, _>>()?;
            let state = decode_agent(key, r.core.as_bytes(), decisions, r.deployed)?;
            Ok(AgentFile::Whole {
                version: r.version,
                state: Box::new(state),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> Sha {
        Sha::parse(&format!("{n:040x}")).unwrap()
    }

    #[test]
    fn push_records_round_trip_every_kind_of_before() {
        for before in [Before::Created, Before::Head(sha(3)), Before::Unknown] {
            for after in [Some(sha(1)), None] {
                let push = Push {
                    before: before.clone(),
                    after,
                    at_ms: 5,
                };
                assert_eq!(decode_push("k", &encode_push(&push)).unwrap(), push);
            }
        }
        // Written before a `before` could be unknown: an empty one is a branch created.
        let created = decode_push("k", &format!("|{}|5", sha(1))).unwrap();
        assert_eq!(created.before, Before::Created);
        for bad in [
            "",
            "?",
            &format!("?|{}", sha(1)),
            &format!("x|{}|5", sha(1)),
            "||t",
        ] {
            let error = decode_push("k", bad).unwrap_err().to_string();
            assert!(error.contains("push record"), "{bad:?}: {error}");
        }
    }

    use proptest::prelude::{Just, Strategy, any, prop_assert_eq, prop_oneof};

    proptest::proptest! {
        /// Any push reads back as written, and any text at all is read or refused, never a
        /// panic: a store's lists can hold anything another writer put there.
        #[test]
        fn push_records_round_trip_and_any_text_is_read_or_refused(
            before in prop_oneof![
                Just(Before::Created),
                Just(Before::Unknown),
                any::<u8>().prop_map(|n| Before::Head(sha(n))),
            ],
            after in proptest::option::of(any::<u8>()),
            at_ms in any::<i64>(),
            text in "[?|0-9a-f\\-]{0,100}|.{0,100}",
        ) {
            let push = Push { before, after: after.map(sha), at_ms };
            prop_assert_eq!(decode_push("k", &encode_push(&push)).unwrap(), push);
            let _ = decode_push("k", &text);
        }
    }

    #[test]
    fn a_deployed_commit_that_is_no_sha_is_refused_with_the_key_and_reason() {
        assert_eq!(
            decode_deployed("k", sha(4).as_str().as_bytes()).unwrap(),
            sha(4)
        );
        for bad in [&b"not-a-sha"[..], &[0xff, 0xfe][..]] {
            let error = decode_deployed("agent_deployed prod", bad)
                .unwrap_err()
                .to_string();
            assert!(error.contains("agent_deployed prod"), "{error}");
        }
        let error = decode_deployed("k", b"xyz").unwrap_err().to_string();
        assert!(error.contains("deployed commit \"xyz\""), "{error}");
    }

    #[test]
    fn records_round_trip() {
        let pipeline = Pipeline {
            id: 9,
            status: PipelineStatus::Running,
            source: "push".into(),
            as_of_ms: Some(12),
            passed_stages: vec!["test".into()],
        };
        let (head, stages) = encode_pipeline(&pipeline);
        let field = pipeline_field(&sha(2), 9);
        assert_eq!(
            decode_pipeline("k", &field, &head, Some(&stages)).unwrap(),
            (sha(2), pipeline)
        );
        let mut state = AgentState::default();
        state.gate.generation = 3;
        state.gate.pinned = Some(Pin {
            sha: sha(1),
            reason: "r".into(),
            since_ms: 1,
        });
        state.position = 7;
        let core = encode_agent(&state);
        assert_eq!(
            decode_agent("k", core.as_bytes(), Vec::new(), Vec::new()).unwrap(),
            state
        );
    }

    #[test]
    fn file_records_round_trip() {
        let push = Push {
            before: Before::Head(sha(1)),
            after: Some(sha(2)),
            at_ms: 5,
        };
        let pipeline = Pipeline {
            id: 4,
            status: PipelineStatus::Success,
            source: "push".into(),
            as_of_ms: None,
            passed_stages: Vec::new(),
        };
        let header = RefFactsV2 {
            position: 3,
            pushes: RingV1 {
                appended: 1,
                len: 1,
                capacity: None,
            },
            rejected: RingV1::default(),
        };
        let Ok(RefFactsFile::Split(read)) = decode_ref_facts("k", &encode_ref_facts(header)) else {
            panic!("this version's ref record reads as split");
        };
        assert_eq!(read, header);
        let field = pipeline_field(&sha(2), 4);
        assert_eq!(
            decode_pipeline_entry("k", &field, &encode_pipeline_entry(&pipeline)).unwrap(),
            (sha(2), pipeline.clone())
        );
        assert!(decode_pipeline_entry("k", &field, b"[\"success||push\"]").is_err());
        // A ref record of the first version holds every fact.
        let (head, stages) = encode_pipeline(&pipeline);
        let earlier = serde_json::to_vec(&RefFactsRecord::V1(RefFactsV1 {
            position: 3,
            pushes: vec![encode_push(&push)],
            pipelines: vec![(field, head, stages)],
            rejected: Vec::new(),
        }))
        .unwrap();
        let Ok(RefFactsFile::Whole((position, pushes, pipelines, rejected))) =
            decode_ref_facts("k", &earlier)
        else {
            panic!("a first version ref record reads as whole");
        };
        assert_eq!(position, 3);
        assert_eq!(pushes, [push]);
        assert_eq!(pipelines, [(sha(2), pipeline)]);
        assert!(rejected.is_empty());

        let mut state = AgentState::default();
        state.gate.deployed.push_back(sha(7));
        state.gate.decisions.push_back(Decision {
            outcome: Outcome::Deploy,
            sha: Some(sha(7)),
            pipeline_id: Some(4),
            reason: "green".into(),
            at_ms: 9,
            superseded_by: None,
        });
        let ring = RingV1 {
            appended: 60,
            len: 50,
            capacity: None,
        };
        let bytes = encode_agent_file(6, 77, &encode_agent(&state), ring, RingV1::default());
        let AgentFile::Split(AgentFileV2 {
            version,
            incarnation,
            core,
            decisions,
            deployed,
        }) = decode_agent_file("k", &bytes).unwrap()
        else {
            panic!("this version's record reads as split");
        };
        assert_eq!(
            (version, incarnation, decisions, deployed),
            (6, 77, ring, RingV1::default())
        );
        assert_eq!(core, encode_agent(&state));
        assert_eq!(ring.live(), 10..60);
        // Entry 10, the oldest, is in slot 10 of a ring of 50; entry 59, the newest, in 9.
        assert_eq!(ring.index_of(10, 50), Some(0));
        assert_eq!(ring.index_of(9, 50), Some(49));
        assert_eq!(ring.index_of(50, 50), None);
        let short = RingV1 {
            appended: 3,
            len: 2,
            capacity: None,
        };
        assert_eq!(
            (0..4)
                .map(|slot| short.index_of(slot, 50))
                .collect::<Vec<_>>(),
            [None, Some(0), Some(1), None]
        );
        // A record of the first version holds its history and reads as a whole state.
        let earlier = serde_json::to_vec(&AgentFileRecord::V1(AgentFileV1 {
            version: 6,
            core: encode_agent(&state),
            decisions: state.gate.decisions.iter().map(encode_decision).collect(),
            deployed: state.gate.deployed.iter().cloned().collect(),
        }))
        .unwrap();
        let AgentFile::Whole {
            version,
            state: read,
        } = decode_agent_file("k", &earlier).unwrap()
        else {
            panic!("a first version record reads as whole");
        };
        assert_eq!((version, *read), (6, state));
        assert!(decode_agent_file("k", b"{}").is_err());
        assert!(decode_ref_facts("k", b"[1]").is_err());
    }

    #[test]
    fn garbage_is_a_clear_error_not_a_panic() {
        assert!(decode_push("k", "zz|").is_err());
        assert!(decode_pipeline("k", "nope", "success||push", None).is_err());
        assert!(decode_pipeline("k", &pipeline_field(&sha(1), 1), "bogus||", None).is_err());
        assert!(decode_agent("k", b"{\"v\":\"9\"}", Vec::new(), Vec::new()).is_err());
        assert!(decode_decision("k", b"[]").is_err());
    }
}
