//! Two evaluators racing over one store: arbitrary interleavings of facts (out of order,
//! redelivered), operators' requests and the evaluators' reads and writes never move an
//! agent backwards, and end where one evaluator ends; heads read from GitLab on the way
//! take their place once their pushes come.

use proptest::prelude::*;

use super::Asked;
use super::rules::{self, Operation};
use crate::gate::{Before, Context, Lineage, Mode, Pipeline, PipelineStatus, Push, PushOrder, Sha};
use crate::store::{
    AgentRead, AgentState, AgentStore, AgentWrite, DeployedChange, EmbeddedStore, FactRecord,
    FactStore, Facts, RefKey, Written,
};

const COMMITS: u8 = 6;
const AGENT: &str = "prod";

fn sha(n: u8) -> Sha {
    Sha::parse(&format!("{n:040x}")).expect("a valid commit id")
}

fn key() -> RefKey {
    RefKey {
        project: "group/app".into(),
        branch: "main".into(),
    }
}

/// One thing that happens, in the order generated.
#[derive(Debug, Clone)]
enum Event {
    /// The push of commit `n` (its parent is `n - 1`), under its own delivery id.
    Push(u8),
    /// The branch head read from GitLab's API (catch-up), `ahead` commits past the newest
    /// one known: the API never reads a head older than a push already delivered.
    HeadRead {
        ahead: u8,
    },
    /// An update of pipeline `id` of commit `n`; `status` `None` is the pipeline's final
    /// result as the case's verdicts have it.
    Pipeline {
        n: u8,
        id: u64,
        status: Option<PipelineStatus>,
        at: i64,
    },
    /// The delivery of an earlier event, again.
    Redeliver(usize),
    Operate(Operation),
    /// A step of evaluator 0 or 1.
    Evaluate(usize, Phase),
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    ReadFacts,
    ReadAgent,
    Write,
}

/// Events whose pipelines may report anything in any order (`monotone` false), or only
/// running updates and one final result per commit, so that a commit once green stays green.
fn event(monotone: bool) -> impl Strategy<Value = Event> {
    let status = if monotone {
        prop_oneof![Just(Some(PipelineStatus::Running)), Just(None)].boxed()
    } else {
        prop_oneof![
            Just(Some(PipelineStatus::Running)),
            Just(Some(PipelineStatus::Success)),
            Just(Some(PipelineStatus::Failed)),
        ]
        .boxed()
    };
    let ids = if monotone { 1..2u64 } else { 1..3u64 };
    let phase = prop_oneof![
        Just(Phase::ReadFacts),
        Just(Phase::ReadAgent),
        Just(Phase::Write)
    ];
    let operation = prop_oneof![
        Just(Operation::Pause {
            reason: "freeze".into()
        }),
        Just(Operation::Resume),
        (1..=COMMITS).prop_map(|n| Operation::Pin {
            sha: sha(n),
            reason: "roll back".into()
        }),
        Just(Operation::Unpin),
        Just(Operation::Trigger {
            sha: None,
            force_prune: false
        }),
    ];
    prop_oneof![
        3 => (1..=COMMITS).prop_map(Event::Push),
        1 => (0..3u8).prop_map(|ahead| Event::HeadRead { ahead }),
        4 => (1..=COMMITS, ids, status, 0..100i64)
            .prop_map(|(n, id, status, at)| Event::Pipeline { n, id: u64::from(n) * 10 + id, status, at }),
        1 => (0..64usize).prop_map(Event::Redeliver),
        1 => operation.prop_map(Event::Operate),
        8 => (0..2usize, phase).prop_map(|(e, p)| Event::Evaluate(e, p)),
    ]
}

/// An evaluator's reads in progress, and its cache of the agent's state.
#[derive(Default)]
struct Evaluator {
    facts: Option<Facts>,
    agent: Option<AgentRead>,
}

/// What the store holds after a write, for the invariants.
struct Watch {
    position: Option<Sha>,
    desired: Option<Sha>,
    /// Whether the desired revision is an operator's pin, or what a pin left when it was
    /// removed before the gate had anything: not a gate decision.
    from_pin: bool,
}

struct Run {
    /// Per commit, whether its pipeline's final result is a success.
    verdicts: Vec<bool>,
    store: EmbeddedStore,
    evaluators: [Evaluator; 2],
    /// Deliveries so far: their id and fact.
    delivered: Vec<(String, FactRecord)>,
    last: Watch,
    now: i64,
    /// The newest commit pushed or read so far: the branch's head is never older.
    newest: u8,
    /// The commits whose push was delivered.
    pushed: std::collections::BTreeSet<u8>,
}

impl Run {
    fn new(verdicts: &[bool]) -> Self {
        Self {
            verdicts: verdicts.to_vec(),
            store: EmbeddedStore::new(),
            evaluators: Default::default(),
            delivered: Vec::new(),
            last: Watch {
                position: None,
                desired: None,
                from_pin: false,
            },
            now: 0,
            newest: 0,
            pushed: Default::default(),
        }
    }

    async fn record(&mut self, id: String, fact: FactRecord) -> Result<(), TestCaseError> {
        self.store
            .record_fact(&key(), &fact, Some(&id), None)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.delivered.push((id, fact));
        Ok(())
    }

    async fn apply(&mut self, event: &Event) -> Result<(), TestCaseError> {
        self.now += 1;
        match event {
            Event::Push(n) => {
                let push = Push {
                    before: if *n > 1 {
                        Before::Head(sha(n - 1))
                    } else {
                        Before::Created
                    },
                    after: Some(sha(*n)),
                    at_ms: self.now,
                };
                self.newest = self.newest.max(*n);
                self.pushed.insert(*n);
                self.record(format!("push-{n}"), FactRecord::Push(push))
                    .await
            }
            Event::HeadRead { ahead } => {
                self.newest = (self.newest + ahead).clamp(1, COMMITS);
                let push = Push {
                    before: Before::Unknown,
                    after: Some(sha(self.newest)),
                    at_ms: self.now,
                };
                let id = format!("head-read-{}", self.now);
                self.record(id, FactRecord::Push(push)).await
            }
            Event::Pipeline { n, id, status, at } => {
                let verdict = if self.verdicts.get(usize::from(*n)).copied().unwrap_or(true) {
                    PipelineStatus::Success
                } else {
                    PipelineStatus::Failed
                };
                let pipeline = Pipeline {
                    id: *id,
                    status: status.unwrap_or(verdict),
                    source: "push".into(),
                    // A final result finishes after every running update of its pipeline.
                    as_of_ms: Some(if status.is_some() { *at } else { 100 }),
                    passed_stages: Vec::new(),
                };
                let fact = FactRecord::Pipeline {
                    sha: sha(*n),
                    pipeline,
                };
                let id = format!("pipeline-{}", self.now);
                self.record(id, fact).await
            }
            Event::Redeliver(i) => {
                let Some((id, fact)) = self.delivered.get(i % self.delivered.len().max(1)).cloned()
                else {
                    return Ok(());
                };
                let outcome = self
                    .store
                    .record_fact(&key(), &fact, Some(&id), None)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(outcome, crate::store::Ingested::Duplicate);
                Ok(())
            }
            Event::Operate(operation) => self.operate(operation).await,
            Event::Evaluate(e, phase) => self.step(*e, *phase).await,
        }
    }

    /// An operator's request, read and written at once, retried on a conflict.
    async fn operate(&mut self, operation: &Operation) -> Result<(), TestCaseError> {
        loop {
            let read = self.store.agent(AGENT).await.map_err(fail)?;
            let facts = self.store.facts(&key()).await.map_err(fail)?;
            let refs = facts.ref_state();
            let lineage = PushOrder::new(&refs);
            let cx = context(&refs, &lineage, self.now);
            let Ok((next, step)) =
                rules::operate(&read.value, &cx, facts.position, operation, None)
            else {
                // Refused (not paused, not green, ...): nothing is written.
                return Ok(());
            };
            match self.write(&read, next, &step.decisions, &refs).await? {
                Written::Conflict => continue,
                _ => return Ok(()),
            }
        }
    }

    async fn step(&mut self, e: usize, phase: Phase) -> Result<(), TestCaseError> {
        match phase {
            Phase::ReadFacts => {
                self.evaluators[e].facts = Some(self.store.facts(&key()).await.map_err(fail)?);
            }
            Phase::ReadAgent => {
                self.evaluators[e].agent = Some(self.store.agent(AGENT).await.map_err(fail)?);
            }
            Phase::Write => {
                let (Some(facts), Some(read)) = (
                    self.evaluators[e].facts.clone(),
                    self.evaluators[e].agent.clone(),
                ) else {
                    return Ok(());
                };
                let refs = facts.ref_state();
                let lineage = PushOrder::new(&refs);
                let cx = context(&refs, &lineage, self.now);
                let Some((next, step)) = rules::advance(&read.value, &cx, facts.position, None)
                else {
                    return Ok(());
                };
                let written = self
                    .write(&read, next.clone(), &step.decisions, &refs)
                    .await?;
                // As the evaluator's cache does: keep what it wrote, forget what it lost.
                self.evaluators[e].agent = match written {
                    Written::Saved { version } => Some(AgentRead {
                        version,
                        incarnation: 0,
                        value: next,
                    }),
                    Written::Conflict | Written::Stale => None,
                    Written::Withheld | Written::Replaced => {
                        return Err(TestCaseError::fail(format!(
                            "one agent, never replaced, had its write {written:?}"
                        )));
                    }
                };
            }
        }
        Ok(())
    }

    /// Writes `next` over `read` and checks that the agent moved only forward.
    async fn write(
        &mut self,
        read: &AgentRead,
        next: AgentState,
        decisions: &[crate::gate::Decision],
        refs: &crate::gate::RefState,
    ) -> Result<Written, TestCaseError> {
        let written = self
            .store
            .write_agent(&AgentWrite {
                incarnation: 0,
                agent: AGENT,
                expected: read.version,
                state: &next,
                decisions,
                deployed: &DeployedChange::between(&read.value.gate.deployed, &next.gate.deployed),
            })
            .await
            .map_err(fail)?;
        if let Written::Saved { .. } = written {
            let lineage = PushOrder::new(refs);
            let desired = next.gate.desired.as_ref().map(|r| r.sha.clone());
            let watch = Watch {
                position: next.gate.position.as_ref().map(|r| r.sha.clone()),
                from_pin: next.gate.pinned.is_some()
                    || (self.last.from_pin && desired == self.last.desired),
                desired,
            };
            prop_assert!(
                forward(&lineage, &self.last.position, &watch.position),
                "the gate went back from {:?} to {:?}",
                self.last.position,
                watch.position
            );
            // A pin, and leaving one, move the agent deliberately anywhere.
            if !self.last.from_pin && !watch.from_pin {
                prop_assert!(
                    forward(&lineage, &self.last.desired, &watch.desired),
                    "the desired revision went back from {:?} to {:?}",
                    self.last.desired,
                    watch.desired
                );
            }
            self.last = watch;
        }
        Ok(written)
    }

    /// Both evaluators read and write until neither changes anything.
    async fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..20 {
            let before = self.store.agent(AGENT).await.map_err(fail)?.version;
            for e in 0..2 {
                self.evaluators[e] = Evaluator::default();
                self.step(e, Phase::ReadFacts).await?;
                self.step(e, Phase::ReadAgent).await?;
                self.step(e, Phase::Write).await?;
            }
            if self.store.agent(AGENT).await.map_err(fail)?.version == before {
                return Ok(());
            }
        }
        Err(TestCaseError::fail("the evaluators never settled"))
    }
}

fn fail(error: crate::store::StoreError) -> TestCaseError {
    TestCaseError::fail(error.to_string())
}

fn context<'a>(refs: &'a crate::gate::RefState, lineage: &'a dyn Lineage, now: i64) -> Context<'a> {
    Context::new(Mode::Pipeline, &[], refs, lineage, now)
}

/// Whether going from `from` to `to` is forward in push order: commits are pushed as a
/// line, so a later one descends from every earlier one.
fn forward(lineage: &dyn Lineage, from: &Option<Sha>, to: &Option<Sha>) -> bool {
    match (from, to) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(from), Some(to)) => lineage.descends_from(to, from),
    }
}

/// The agent after `events` with evaluator 1's steps dropped and evaluator 0 catching up
/// after every fact: one evaluator, never behind.
async fn single(verdicts: &[bool], events: &[Event]) -> Result<AgentState, TestCaseError> {
    let mut run = Run::new(verdicts);
    for event in events {
        match event {
            Event::Evaluate(..) => {}
            other => {
                run.apply(other).await?;
                run.settle().await?;
            }
        }
    }
    run.settle().await?;
    Ok(run.store.agent(AGENT).await.map_err(fail)?.value)
}

/// Runs `events` through two evaluators: the invariants are checked on every write.
async fn race(verdicts: &[bool], events: &[Event]) -> Result<AgentState, TestCaseError> {
    let mut run = Run::new(verdicts);
    for event in events {
        run.apply(event).await?;
    }
    run.settle().await?;
    // Once every push up to the newest commit came, heads read from GitLab on the way
    // included, the line is in commit order.
    if run.newest > 0 && (1..=run.newest).all(|n| run.pushed.contains(&n)) {
        let facts = run.store.facts(&key()).await.map_err(fail)?;
        let refs = facts.ref_state();
        let head = refs.head().map(|h| h.sha.clone());
        prop_assert_eq!(head, Some(sha(run.newest)), "the branch's head");
    }
    Ok(run.store.agent(AGENT).await.map_err(fail)?.value)
}

fn block_on<T>(
    future: impl std::future::Future<Output = Result<T, TestCaseError>>,
) -> Result<T, TestCaseError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .block_on(future)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the pipelines report, in whatever order: no write moves the agent back.
    #[test]
    fn two_evaluators_never_move_an_agent_back(
        events in prop::collection::vec(event(false), 1..80)
    ) {
        block_on(race(&[], &events))?;
    }

    /// When a green commit stays green, where the agent ends does not depend on how the
    /// evaluators raced: two stale, concurrent evaluators end where one that never lags does.
    #[test]
    fn two_evaluators_end_where_one_does(
        verdicts in prop::collection::vec(any::<bool>(), usize::from(COMMITS) + 1),
        events in prop::collection::vec(event(true), 1..80)
    ) {
        block_on(async {
            let two = race(&verdicts, &events).await?;
            let one = single(&verdicts, &events).await?;
            let sha = |r: &Option<crate::gate::Revision>| r.as_ref().map(|r| r.sha.clone());
            prop_assert_eq!(sha(&two.gate.position), sha(&one.gate.position), "the gate");
            prop_assert_eq!(
                two.gate.pinned.as_ref().map(|p| p.sha.clone()),
                one.gate.pinned.as_ref().map(|p| p.sha.clone())
            );
            prop_assert_eq!(two.gate.paused.is_some(), one.gate.paused.is_some());
            // A pause holds what the agent had when it came, which depends on how far the
            // evaluators had got: only an agent that is not held must agree.
            if two.gate.paused.is_none() {
                prop_assert_eq!(sha(&two.gate.desired), sha(&one.gate.desired), "desired");
            }
            Ok(())
        })?;
    }
}

/// An evaluator over an embedded store for the agents of `yaml` (a config file's `agents:`).
fn evaluator_for(
    yaml: &str,
) -> (
    std::sync::Arc<super::Evaluator>,
    std::sync::Arc<EmbeddedStore>,
) {
    evaluator_on(yaml, std::sync::Arc::new(EmbeddedStore::new()))
}

/// An evaluator over `store` for the agents of `yaml` (a config file's `agents:`).
fn evaluator_on(
    yaml: &str,
    store: std::sync::Arc<EmbeddedStore>,
) -> (
    std::sync::Arc<super::Evaluator>,
    std::sync::Arc<EmbeddedStore>,
) {
    let config = crate::config::Config::from_yaml(yaml, &crate::config::Overrides::default())
        .expect("a valid config");
    evaluator_of(&config, store)
}

/// An evaluator over `store` for the agents of `config`.
fn evaluator_of(
    config: &crate::config::Config,
    store: std::sync::Arc<EmbeddedStore>,
) -> (
    std::sync::Arc<super::Evaluator>,
    std::sync::Arc<EmbeddedStore>,
) {
    use std::sync::Arc;
    let catalog = Arc::new(crate::catalog::LiveCatalog::new(
        crate::catalog::Catalog::new(&config.agents, None),
    ));
    let index = Arc::new(crate::index::Index::new(
        config
            .agents
            .iter()
            .map(|a| (a.name.as_str(), a.incarnation)),
    ));
    let evaluator = super::Evaluator::new(
        store.clone(),
        catalog,
        crate::git::Mirrors::new(config.git.clone()),
        index,
        "replica-0".into(),
        Arc::new(crate::metrics::Metrics::default()),
        tokio_util::task::TaskTracker::new(),
    );
    (evaluator, store)
}

/// One entry of a config file's `agents:` watching group/app@main.
fn agent_yaml(name: &str, gate: &str) -> String {
    let token = hex::encode(ring::digest::digest(&ring::digest::SHA256, name.as_bytes()));
    format!(
        "  - {{name: {name}, token_sha256: {token}, project: group/app, ref: main, gate: {gate}}}\n"
    )
}

/// An evaluator of one agent, `edge`, gated by pipelines, whose ref has commit 1 green.
async fn edge_after_green_push() -> (
    std::sync::Arc<super::Evaluator>,
    std::sync::Arc<EmbeddedStore>,
) {
    let (evaluator, store) = evaluator_for(&format!(
        "agents:\n{}",
        agent_yaml("edge", "{mode: pipeline}")
    ));
    green_push(&store, 1).await;
    (evaluator, store)
}

/// A push of commit `n` and its green pipeline, as a ref's facts.
async fn green_push(store: &EmbeddedStore, n: u8) {
    green_push_on(store, &key(), n).await;
}

/// [`green_push`] on the ref `on`.
async fn green_push_on(store: &EmbeddedStore, on: &RefKey, n: u8) {
    let push = Push {
        before: if n > 1 {
            Before::Head(sha(n - 1))
        } else {
            Before::Created
        },
        after: Some(sha(n)),
        at_ms: i64::from(n),
    };
    let pipeline = Pipeline {
        id: u64::from(n),
        status: PipelineStatus::Success,
        source: "push".into(),
        as_of_ms: Some(i64::from(n)),
        passed_stages: vec!["test".into()],
    };
    for (id, fact) in [
        (format!("push-{n}"), FactRecord::Push(push)),
        (
            format!("pipeline-{n}"),
            FactRecord::Pipeline {
                sha: sha(n),
                pipeline,
            },
        ),
    ] {
        store
            .record_fact(on, &fact, Some(&id), None)
            .await
            .expect("the embedded store records facts");
    }
}

/// A state this replica holds of an agent deleted since, read before another agent was
/// created under its name, is not decided for the new one: its write, over a version the
/// new agent's record happens to have reached too, would replace the new agent's gate (a
/// pause, here) with the old one's.
#[tokio::test]
async fn a_state_held_of_an_agent_deleted_since_is_not_decided_for_the_new_one() {
    use crate::store::AgentStore;
    let (old, new) = (11, 22);
    let mut config = crate::config::Config::from_yaml(
        &format!("agents:\n{}", agent_yaml("edge", "{mode: pipeline}")),
        &crate::config::Overrides::default(),
    )
    .expect("a valid config");
    for agent in &mut config.agents {
        agent.incarnation = new;
    }
    let (evaluator, store) = evaluator_of(&config, std::sync::Arc::new(EmbeddedStore::new()));
    // The new agent, paused at its first write.
    let paused = AgentState {
        gate: crate::gate::AgentGate {
            paused: Some(crate::gate::Hold {
                reason: "freeze".into(),
                since_ms: 1,
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let unchanged = crate::store::DeployedChange::Unchanged;
    let write = crate::store::AgentWrite {
        agent: "edge",
        incarnation: new,
        expected: 0,
        state: &paused,
        decisions: &[],
        deployed: &unchanged,
    };
    assert_eq!(
        store.write_agent(&write).await.expect("written"),
        Written::Saved { version: 1 }
    );
    // What this replica read of the old agent, at the same version.
    evaluator.lock_cache().insert(
        "edge".into(),
        AgentRead {
            version: 1,
            incarnation: old,
            value: std::sync::Arc::new(AgentState::default()),
        },
    );
    green_push(&store, 1).await;
    evaluator.evaluate(&key()).await.expect("evaluates");
    let stored = store.agent("edge").await.expect("reads the agent");
    assert_eq!((stored.version, &stored.value), (1, &paused), "not written");

    // Read again, it is the new agent's own, and decided as such.
    evaluator.evaluate(&key()).await.expect("evaluates");
    let stored = store.agent("edge").await.expect("reads the agent");
    assert!(stored.value.gate.paused.is_some(), "still paused");
    assert_eq!(
        stored.value.gate.position.map(|p| p.sha),
        Some(sha(1)),
        "decided from its own state"
    );
}

/// An evaluation lists its ref's watchers as it begins; an agent among them deleted since
/// and created again under its name may watch another ref, whose facts must not decide it.
#[tokio::test]
async fn an_agent_that_watches_another_ref_by_now_is_not_decided_from_this_ones_facts() {
    let (evaluator, store) = evaluator_for(&format!(
        "agents:\n{}",
        agent_yaml("edge", "{mode: pipeline}")
    ));
    let other = RefKey {
        project: "group/app".into(),
        branch: "release".into(),
    };
    green_push_on(&store, &other, 1).await;
    let facts = store.facts(&other).await.expect("reads the facts");
    let refs = facts.ref_state();
    let watchers = ["edge".to_owned()];
    let states = evaluator.states(&watchers).await.expect("reads the agent");
    let pending = evaluator.decide(&other, &facts, &refs, None, &watchers, &states);
    assert!(pending.is_empty(), "edge watches main, not release");

    // Its own ref's facts do decide it.
    green_push(&store, 1).await;
    let facts = store.facts(&key()).await.expect("reads the facts");
    let refs = facts.ref_state();
    let pending = evaluator.decide(&key(), &facts, &refs, None, &watchers, &states);
    assert_eq!(pending.len(), 1);
}

#[tokio::test]
async fn agents_decided_alike_share_one_state_and_each_still_gets_its_own_gate() {
    let agent = agent_yaml;
    let yaml = format!(
        "agents:\n{}{}{}{}{}{}",
        agent("edge-1", "{mode: pipeline}"),
        agent("edge-2", "{mode: pipeline}"),
        agent("edge-3", "{mode: pipeline}"),
        agent("held", "{mode: pipeline}"),
        agent("manual", "{mode: manual}"),
        agent("staged", "{mode: pipeline, stages: [test]}"),
    );
    let (evaluator, store) = evaluator_for(&yaml);
    green_push(&store, 1).await;
    evaluator.evaluate(&key()).await.expect("evaluates");
    evaluator
        .operate(
            "held",
            Operation::Pause {
                reason: "freeze".into(),
            },
        )
        .await
        .expect("pauses");
    green_push(&store, 2).await;
    evaluator.evaluate(&key()).await.expect("evaluates");

    let stored = |name: &'static str| {
        let store = store.clone();
        async move { store.agent(name).await.expect("reads the agent").value }
    };
    let edge = stored("edge-1").await;
    assert_eq!(edge.gate.desired.as_ref().map(|d| &d.sha), Some(&sha(2)));
    assert_eq!(stored("edge-2").await, edge, "decided alike, stored alike");
    assert_eq!(stored("edge-3").await, edge);
    let held = stored("held").await;
    assert_eq!(held.gate.position.as_ref().map(|p| &p.sha), Some(&sha(2)));
    assert_eq!(
        held.gate.desired.as_ref().map(|d| &d.sha),
        Some(&sha(1)),
        "a paused agent keeps what it had while its ref's other agents move"
    );
    assert_ne!(held.gate.decisions, edge.gate.decisions);
    assert!(
        stored("manual").await.gate.desired.is_none(),
        "manual waits for a trigger"
    );
    let staged = stored("staged").await;
    assert_eq!(staged.gate.desired.as_ref().map(|d| &d.sha), Some(&sha(2)));
    assert!(
        staged
            .gate
            .decisions
            .iter()
            .any(|d| d.reason.contains("passed stages test")),
        "its own setting decides its reasons: {:?}",
        staged.gate.decisions
    );

    let cache = evaluator.lock_cache();
    let held_state = |name: &str| {
        cache
            .get(name)
            .expect("cached after its write")
            .value
            .clone()
    };
    assert!(std::sync::Arc::ptr_eq(
        &held_state("edge-1"),
        &held_state("edge-2")
    ));
    assert!(std::sync::Arc::ptr_eq(
        &held_state("edge-1"),
        &held_state("edge-3")
    ));
    assert!(!std::sync::Arc::ptr_eq(
        &held_state("edge-1"),
        &held_state("held")
    ));
    assert!(!std::sync::Arc::ptr_eq(
        &held_state("edge-1"),
        &held_state("staged")
    ));
    assert_eq!(
        *held_state("edge-1"),
        edge,
        "the cache holds what was stored"
    );
}

/// Agents decided alike write one shared change; its decisions still count once per agent.
#[tokio::test]
async fn a_shared_decision_is_counted_for_every_agent_it_was_saved_for() {
    let yaml = format!(
        "agents:\n{}{}{}",
        agent_yaml("edge-1", "{mode: pipeline}"),
        agent_yaml("edge-2", "{mode: pipeline}"),
        agent_yaml("edge-3", "{mode: pipeline}"),
    );
    let (evaluator, store) = evaluator_for(&yaml);
    // Read one by one, the three states are decided apart the first time and share their
    // change from then on.
    for n in 1..=2 {
        green_push(&store, n).await;
        evaluator.evaluate(&key()).await.expect("evaluates");
    }
    let text = evaluator
        .metrics
        .encode(crate::git::GitStats::default())
        .expect("encodes");
    let deployed = text
        .lines()
        .find_map(|line| line.strip_prefix("greenlight_decisions_total{outcome=\"deploy\"} "));
    assert_eq!(deployed, Some("6"), "in:\n{text}");
}

#[tokio::test]
async fn an_evaluation_overtaken_by_a_queued_fact_leaves_its_write_to_the_next_one_once() {
    let (evaluator, store) = edge_after_green_push().await;
    evaluator.evaluate(&key()).await.expect("evaluates");
    let before = store.agent("edge").await.expect("reads the agent");
    let push = Push {
        before: Before::Head(sha(1)),
        after: Some(sha(2)),
        at_ms: 2,
    };
    let recorded = store
        .record_fact(&key(), &FactRecord::Push(push), Some("push-2"), None)
        .await
        .expect("records");
    let crate::store::Ingested::Recorded { position } = recorded else {
        panic!("the push is new: {recorded:?}");
    };

    // Its pipeline, recorded elsewhere and heard while this evaluation runs.
    evaluator
        .queue
        .push_merging(&key(), Asked::by_fact(None, 10, position + 1), Asked::merge);
    evaluator
        .evaluate_job(&key(), Asked::by_fact(None, 5, position))
        .await;
    assert_eq!(
        store.agent("edge").await.expect("reads the agent"),
        before,
        "nothing written for facts already superseded"
    );
    let queued = evaluator
        .queue
        .peek(&key(), |asked| {
            (asked.position, asked.since_ms, asked.deferred_once)
        })
        .expect("the newer fact is still queued");
    assert_eq!(
        queued,
        (position + 1, Some(5), true),
        "the burst's start and the deferral are kept"
    );

    // The next evaluation writes, however many newer facts are queued by then.
    evaluate_next_while_a_fact_is_queued(&evaluator, position + 2).await;
    let after = store.agent("edge").await.expect("reads the agent");
    assert_eq!(after.value.position, position, "decided at the facts read");
    assert!(after.version > before.version);
    assert!(
        evaluator
            .queue
            .peek(&key(), |asked| asked.deferred_once)
            .is_some_and(|deferred| !deferred),
        "a write clears the deferral: the newest fact may defer again"
    );
}

/// A replica that starts afresh reads its agents' states one by one: agents holding the same
/// state share one copy, as they did on the replica that wrote it.
#[tokio::test]
async fn agents_read_alike_share_one_state() {
    let agents: String = ["a", "b", "c"]
        .iter()
        .map(|name| agent_yaml(name, "{mode: pipeline}"))
        .collect();
    let yaml = format!("agents:\n{agents}");
    let (first, store) = evaluator_for(&yaml);
    green_push(&store, 1).await;
    first.evaluate(&key()).await.expect("evaluates");

    let (restarted, _) = evaluator_on(&yaml, store);
    restarted.evaluate(&key()).await.expect("evaluates");
    let cache = restarted.lock_cache();
    let held: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| cache.get(*name).expect("read and kept").value.clone())
        .collect();
    assert_eq!(held[0].gate.desired.as_ref().map(|d| &d.sha), Some(&sha(1)));
    assert!(
        held.iter()
            .all(|state| std::sync::Arc::ptr_eq(state, &held[0])),
        "one copy for the three"
    );
}

/// Runs the queued evaluation of the ref, with a fact at `position` queued as it starts.
async fn evaluate_next_while_a_fact_is_queued(
    evaluator: &std::sync::Arc<super::Evaluator>,
    position: u64,
) {
    let (taken, asked) = evaluator.queue.next().await;
    evaluator
        .queue
        .push_merging(&key(), Asked::by_fact(None, 40, position), Asked::merge);
    evaluator.evaluate_job(&taken, asked).await;
    evaluator.queue.done(&taken);
}

/// A fact that comes while a fan-out is being written stops it between the store's steps:
/// the agents written keep what they got, the rest are left to the next evaluation, which
/// writes them however many facts are queued by then, and no agent gets a decision twice.
#[tokio::test]
async fn a_fan_out_stopped_by_a_newer_fact_leaves_the_rest_to_the_next_evaluation() {
    use futures_util::FutureExt;
    const NAMES: [&str; 4] = ["a", "b", "c", "d"];
    let dir = tempfile::tempdir().expect("a temporary directory");
    // On a file, each step waits for its transaction: the other tasks run meanwhile.
    let mut store = EmbeddedStore::open(dir.path()).expect("opens");
    store.set_write_step(1);
    let agents: String = NAMES
        .iter()
        .map(|name| agent_yaml(name, "{mode: pipeline}"))
        .collect();
    let (evaluator, store) = evaluator_on(&format!("agents:\n{agents}"), store.into());
    green_push(&store, 1).await;
    evaluator.evaluate(&key()).await.expect("evaluates");
    green_push(&store, 2).await;
    let position = store.facts(&key()).await.expect("reads facts").position;

    // As soon as the first agent is sent commit 2, the next push is heard of.
    let mut channels: Vec<_> = NAMES
        .iter()
        .map(|name| evaluator.index.subscribe(name).expect("a channel"))
        .collect();
    let newer = tokio::spawn({
        let evaluator = evaluator.clone();
        let store = store.clone();
        async move {
            let sent = channels.iter_mut().map(|channel| channel.changed().boxed());
            let _ = futures_util::future::select_all(sent).await;
            evaluator.queue.push_merging(
                &key(),
                Asked::by_fact(None, 30, position + 1),
                Asked::merge,
            );
            let push = Push {
                before: Before::Head(sha(2)),
                after: Some(sha(3)),
                at_ms: 3,
            };
            store
                .record_fact(&key(), &FactRecord::Push(push), Some("push-3"), None)
                .await
                .expect("records");
        }
    });
    evaluator
        .evaluate_job(&key(), Asked::by_fact(None, 5, position))
        .await;
    newer.await.expect("the push was heard");

    let desired = |state: &AgentRead| state.value.gate.desired.as_ref().map(|d| d.sha.clone());
    let mut sent = 0;
    for name in NAMES {
        let state = store.agent(name).await.expect("reads the agent");
        if desired(&state) == Some(sha(2)) {
            sent += 1;
        } else {
            assert_eq!(desired(&state), Some(sha(1)), "{name} was not written");
        }
    }
    assert!(
        (1..NAMES.len()).contains(&sent),
        "the fan-out stopped after writing {sent} of {} agents",
        NAMES.len()
    );
    let queued = evaluator
        .queue
        .peek(&key(), |asked| (asked.position, asked.deferred_once))
        .expect("the ref is queued again");
    assert_eq!(
        queued,
        (position + 1, true),
        "deferred once, at the newer fact"
    );

    evaluate_next_while_a_fact_is_queued(&evaluator, position + 2).await;
    for name in NAMES {
        let state = store.agent(name).await.expect("reads the agent");
        assert_eq!(
            desired(&state),
            Some(sha(2)),
            "{name} holds the green commit"
        );
        let deploys = state
            .value
            .gate
            .decisions
            .iter()
            .filter(|d| d.sha == Some(sha(2)) && d.outcome == crate::gate::Outcome::Deploy)
            .count();
        assert_eq!(deploys, 1, "{name} was decided once for commit 2");
    }
}

#[tokio::test]
async fn a_fact_heard_again_from_the_log_does_not_defer_its_own_evaluation() {
    let (evaluator, store) = edge_after_green_push().await;
    let position = store.facts(&key()).await.expect("reads facts").position;
    // The replica that recorded it enqueued it, and the change log brings it again.
    evaluator
        .queue
        .push_merging(&key(), Asked::by_fact(None, 10, position), Asked::merge);
    evaluator
        .evaluate_job(&key(), Asked::by_fact(None, 10, position))
        .await;
    let stored = store.agent("edge").await.expect("reads the agent");
    assert_eq!(
        stored.value.gate.desired.as_ref().map(|d| &d.sha),
        Some(&sha(1))
    );
}

/// An evaluator over pipeline-mode agents `streaming` and `others`, the first followed by a
/// stream on this replica (the returned receiver), after it decided green commit 1.
async fn decided_with_streaming_agent(
    others: &[&str],
) -> (
    std::sync::Arc<super::Evaluator>,
    tokio::sync::watch::Receiver<crate::index::Desired>,
) {
    let agents: String = std::iter::once("streaming")
        .chain(others.iter().copied())
        .map(|name| agent_yaml(name, "{mode: pipeline}"))
        .collect();
    let (evaluator, store) = evaluator_for(&format!("agents:\n{agents}"));
    green_push(&store, 1).await;
    let stream = evaluator
        .index
        .subscribe("streaming")
        .expect("a channel for every agent");
    evaluator.evaluate(&key()).await.expect("evaluates");
    (evaluator, stream)
}

/// The commit whose manifests wait to be prepared for `agent`.
fn prepared(evaluator: &super::Evaluator, agent: &str) -> Option<Sha> {
    evaluator.prepare.peek(&agent.to_owned(), Sha::clone)
}

#[tokio::test]
async fn manifests_are_prepared_for_agents_no_stream_here_follows() {
    let (evaluator, _stream) = decided_with_streaming_agent(&["offline"]).await;
    assert_eq!(
        prepared(&evaluator, "offline"),
        Some(sha(1)),
        "read now, so that a broken revision shows while the agent is away"
    );
    assert_eq!(
        prepared(&evaluator, "streaming"),
        None,
        "its stream reads them as it sends"
    );
}

/// A stream that ends before it reads the manifests of its agent's desired revision leaves
/// them to be prepared, so that a broken revision still shows while the agent is away; one
/// that read them, or that another stream here still follows, leaves nothing.
#[tokio::test]
async fn a_stream_that_ends_before_reading_its_due_revision_leaves_it_prepared() {
    let (evaluator, stream) = decided_with_streaming_agent(&[]).await;
    let prepared = || prepared(&evaluator, "streaming");
    assert_eq!(prepared(), None, "its stream was to read them");

    evaluator.stream_ended("streaming", None);
    assert_eq!(prepared(), None, "another stream here still follows it");
    drop(stream);
    evaluator.stream_ended("streaming", Some(&sha(1)));
    assert_eq!(prepared(), None, "read");
    evaluator.stream_ended("streaming", None);
    assert_eq!(prepared(), Some(sha(1)), "never read");
}
