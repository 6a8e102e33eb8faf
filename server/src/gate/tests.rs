//! The gate's rules as scenarios, and a property over arbitrary webhook delivery orders.

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use PipelineStatus::{Canceled, Failed, Running, Success};

/// A full SHA-1 whose short form shows `n` (`0a0a0a0a` for 10). Commits start at 1: `sha(0)`
/// would be the null id GitLab uses for created and deleted branches.
fn sha(n: u8) -> Sha {
    Sha::parse(&format!("{n:02x}").repeat(20)).unwrap()
}

/// Which commit of a scenario `sha` is, inverting [`sha`].
fn commit_of(sha: &Sha) -> u8 {
    u8::from_str_radix(&sha.as_str()[..2], 16).unwrap()
}

fn run(id: u64, status: PipelineStatus) -> Pipeline {
    Pipeline {
        id,
        status,
        source: "push".to_owned(),
        as_of_ms: None,
        passed_stages: Vec::new(),
    }
}

fn mr_run(id: u64, status: PipelineStatus) -> Pipeline {
    Pipeline {
        source: MERGE_REQUEST_SOURCE.to_owned(),
        ..run(id, status)
    }
}

/// One agent gated on one branch, re-evaluated after every event as the server does.
struct World {
    mode: Mode,
    refs: RefState,
    gate: AgentGate,
    now_ms: i64,
}

impl World {
    fn new(mode: Mode) -> Self {
        Self {
            mode,
            refs: RefState::default(),
            gate: AgentGate::default(),
            now_ms: 0,
        }
    }

    fn tick(&mut self) -> i64 {
        self.now_ms += 1_000;
        self.now_ms
    }

    fn with_cx<T>(&mut self, f: impl FnOnce(&mut AgentGate, &Context<'_>) -> T) -> T {
        let now_ms = self.tick();
        let lineage = PushOrder::new(&self.refs);
        let cx = Context::new(self.mode, &[], &self.refs, &lineage, now_ms);
        f(&mut self.gate, &cx)
    }

    fn advance(&mut self) -> Step {
        self.with_cx(|gate, cx| gate.advance(cx))
    }

    /// Records a push on top of the head, moving the branch to `after` (`None` deletes it),
    /// without running the gate.
    fn record_push(&mut self, after: Option<Sha>) {
        let before = self
            .refs
            .head()
            .map_or(Before::Created, |h| Before::Head(h.sha.clone()));
        self.refs.record_push(&Push {
            before,
            after,
            at_ms: self.now_ms,
        });
    }

    fn push(&mut self, n: u8) -> Step {
        self.record_push(Some(sha(n)));
        self.advance()
    }

    /// Records the push of `n` on top of the head and its green pipeline `10 * n`, as facts
    /// that arrived since the gate last ran.
    fn record_green_push_unevaluated(&mut self, n: u8) {
        self.record_push(Some(sha(n)));
        self.refs
            .record_pipeline(&sha(n), run(u64::from(n) * 10, Success));
    }

    fn delete_branch(&mut self) -> Step {
        self.record_push(None);
        self.advance()
    }

    fn pipeline(&mut self, n: u8, id: u64, status: PipelineStatus) -> Step {
        self.refs.record_pipeline(&sha(n), run(id, status));
        self.advance()
    }

    fn mr_pipeline(&mut self, n: u8, id: u64, status: PipelineStatus) -> Step {
        self.refs.record_pipeline(&sha(n), mr_run(id, status));
        self.advance()
    }

    fn trigger(&mut self, n: Option<u8>) -> Result<Step, GateError> {
        let target = n.map(sha);
        self.with_cx(|gate, cx| gate.trigger(cx, target.as_ref(), false))
    }

    fn trigger_forced(&mut self, n: Option<u8>) -> Result<Step, GateError> {
        let target = n.map(sha);
        self.with_cx(|gate, cx| gate.trigger(cx, target.as_ref(), true))
    }

    fn pause(&mut self) -> Step {
        let now_ms = self.tick();
        self.gate.pause("incident".to_owned(), now_ms)
    }

    fn resume(&mut self) -> Result<Step, GateError> {
        self.with_cx(|gate, cx| gate.resume(cx))
    }

    fn pin(&mut self, target: Sha) -> Result<Step, GateError> {
        let now_ms = self.tick();
        self.gate.pin(target, "bad release".to_owned(), now_ms)
    }

    fn unpin(&mut self) -> Result<Step, GateError> {
        self.with_cx(|gate, cx| gate.unpin(cx))
    }

    fn desired(&self) -> Option<Sha> {
        self.gate.desired.as_ref().map(|r| r.sha.clone())
    }

    fn revision(&self) -> &Revision {
        self.gate.desired.as_ref().unwrap()
    }

    fn position(&self) -> Option<Sha> {
        self.gate.position.as_ref().map(|r| r.sha.clone())
    }

    fn decisions_about(&self, n: u8) -> Vec<&Decision> {
        let target = sha(n);
        self.gate
            .decisions
            .iter()
            .filter(|d| d.sha.as_ref() == Some(&target))
            .collect()
    }
}

fn has_decision(decisions: &[Decision], outcome: Outcome, n: u8, reason: &str) -> bool {
    decisions
        .iter()
        .any(|d| d.outcome == outcome && d.sha == Some(sha(n)) && d.reason.contains(reason))
}

#[test]
fn running_pipeline_holds_and_its_success_deploys_the_commit() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Running);
    assert_eq!(w.desired(), None);

    let step = w.pipeline(1, 10, Success);

    assert!(step.desired_changed);
    assert_eq!(w.desired(), Some(sha(1)));
    assert_eq!(w.revision().pipeline_id, Some(10));
    assert!(
        w.revision().reason.contains("pipeline 10"),
        "{}",
        w.revision().reason
    );
}

#[test]
fn newer_commit_green_first_wins_and_older_success_later_changes_nothing() {
    let mut w = World::new(Mode::Pipeline);
    w.push(2);
    w.push(3);
    w.pipeline(2, 20, Running);
    w.pipeline(3, 30, Running);
    w.pipeline(3, 30, Success);
    assert_eq!(w.desired(), Some(sha(3)));
    let generation = w.revision().generation;

    let step = w.pipeline(2, 20, Success);

    assert!(!step.desired_changed);
    // It is not deployed, but whoever waits for it learns that a newer commit includes it.
    let reasons: Vec<&str> = step.decisions.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons, [format!("superseded by {}", sha(3).short())]);
    assert_eq!(w.desired(), Some(sha(3)));
    assert_eq!(w.revision().generation, generation);
    assert!(
        w.decisions_about(2)
            .iter()
            .all(|d| d.outcome != Outcome::Deploy)
    );
}

#[test]
fn older_green_commit_is_skipped_as_superseded_when_a_newer_one_is_chosen() {
    let mut w = World::new(Mode::Pipeline);
    w.push(2);
    w.push(3);
    // Both results are on record before the gate looks, as after a server restart.
    w.refs.record_pipeline(&sha(2), run(20, Success));
    w.refs.record_pipeline(&sha(3), run(30, Success));

    let step = w.advance();

    assert_eq!(w.desired(), Some(sha(3)));
    let superseded = format!("superseded by {}", sha(3).short());
    assert_eq!(superseded, "superseded by 03030303");
    assert!(
        has_decision(&step.decisions, Outcome::Skip, 2, &superseded),
        "{:?}",
        step.decisions
    );
    assert!(has_decision(
        &step.decisions,
        Outcome::Deploy,
        3,
        "pipeline 30 succeeded"
    ));
}

#[test]
fn failed_pipeline_blocks_until_a_retry_succeeds_and_a_failed_retry_never_goes_back() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);

    w.pipeline(2, 20, Failed);
    assert_eq!(w.desired(), Some(sha(1)));

    w.pipeline(2, 21, Success);
    assert_eq!(w.desired(), Some(sha(2)));
    assert_eq!(w.revision().pipeline_id, Some(21));
    let generation = w.revision().generation;

    // The newest pipeline is now red, but the gate never falls back to commit 1.
    let step = w.pipeline(2, 22, Failed);
    assert!(!step.desired_changed);
    assert_eq!(w.desired(), Some(sha(2)));
    assert_eq!(w.revision().pipeline_id, Some(21));
    assert_eq!(w.revision().generation, generation);
}

#[test]
fn merge_request_pipeline_success_never_opens_the_gate() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Failed);

    w.mr_pipeline(1, 11, Success);
    assert_eq!(w.desired(), None);

    w.pipeline(1, 12, Success);
    assert_eq!(w.desired(), Some(sha(1)));
    assert_eq!(w.revision().pipeline_id, Some(12));
}

#[test]
fn pipeline_reported_before_its_push_deploys_once_the_push_arrives() {
    let mut w = World::new(Mode::Pipeline);
    w.pipeline(1, 10, Success);
    assert_eq!(w.desired(), None);

    w.push(1);

    assert_eq!(w.desired(), Some(sha(1)));
    assert_eq!(w.revision().pipeline_id, Some(10));
}

#[test]
fn immediate_mode_deploys_every_new_head_whatever_its_pipeline() {
    let mut w = World::new(Mode::Immediate);
    w.push(1);
    assert_eq!(w.desired(), Some(sha(1)));
    assert_eq!(w.revision().pipeline_id, None);
    assert!(w.revision().reason.contains("immediate"));
    let first = w.revision().generation;

    w.push(2);
    w.pipeline(2, 20, Failed);
    assert_eq!(w.desired(), Some(sha(2)));
    let second = w.revision().generation;

    w.push(3);
    assert_eq!(w.desired(), Some(sha(3)));
    assert!(first < second && second < w.revision().generation);
}

#[test]
fn manual_mode_waits_for_a_trigger_that_deploys_the_head() {
    let mut w = World::new(Mode::Manual);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);
    assert_eq!(w.desired(), None);

    let step = w.trigger(None).unwrap();

    assert!(step.desired_changed);
    assert_eq!(w.desired(), Some(sha(2)));
    assert!(has_decision(
        &step.decisions,
        Outcome::Deploy,
        2,
        "triggered by an operator"
    ));
}

#[test]
fn triggering_a_red_commit_works_in_manual_mode_only() {
    let mut manual = World::new(Mode::Manual);
    manual.push(1);
    manual.pipeline(1, 10, Failed);
    manual.trigger(Some(1)).unwrap();
    assert_eq!(manual.desired(), Some(sha(1)));

    let mut gated = World::new(Mode::Pipeline);
    gated.push(1);
    gated.pipeline(1, 10, Failed);
    match gated.trigger(Some(1)) {
        Err(GateError::NotGreen {
            sha: refused,
            reason,
        }) => {
            assert_eq!(refused, sha(1));
            assert!(reason.contains("pipeline 10 is failed"), "{reason}");
        }
        other => panic!("expected NotGreen, got {other:?}"),
    }
    assert_eq!(gated.desired(), None);
}

#[test]
fn triggering_an_older_commit_is_refused_as_backwards() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);
    w.pipeline(2, 20, Success);

    let err = w.trigger(Some(1)).unwrap_err();

    assert_eq!(
        err,
        GateError::NotForward {
            sha: sha(1),
            reason: format!("not a descendant of deployed {}", sha(2).short()),
        }
    );
    assert_eq!(w.desired(), Some(sha(2)));
}

#[test]
fn trigger_without_a_commit_resends_the_same_revision_under_a_new_generation() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    assert_eq!(w.trigger(None).unwrap_err(), GateError::NothingToSync);
    w.pipeline(1, 10, Success);
    let generation = w.revision().generation;

    let step = w.trigger(None).unwrap();

    assert!(step.desired_changed);
    assert_eq!(w.desired(), Some(sha(1)));
    assert_eq!(w.revision().pipeline_id, Some(10));
    assert!(w.revision().generation > generation);
}

#[test]
fn triggering_an_abbreviated_sha_is_refused_like_a_pin() {
    let mut w = World::new(Mode::Manual);
    w.push(1);
    let short = Sha::parse(sha(1).short()).unwrap();
    let err = w
        .with_cx(|gate, cx| gate.trigger(cx, Some(&short), false))
        .unwrap_err();
    assert_eq!(err, GateError::AbbreviatedTrigger(short));
    assert!(err.to_string().contains("full commit SHA"), "{err}");
    assert_eq!(w.desired(), None);
    // The full SHA of the same commit deploys.
    w.trigger(Some(1)).unwrap();
    assert_eq!(w.desired(), Some(sha(1)));
}

#[test]
fn force_prune_is_granted_to_the_triggered_generation_only() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    assert!(!w.revision().force_prune);

    let step = w.trigger_forced(None).unwrap();
    assert!(step.desired_changed);
    assert!(w.revision().force_prune);
    let forced = w.revision().generation;

    // The next revision, decided by the gate, is limited again.
    w.push(2);
    w.pipeline(2, 20, Success);
    assert_eq!(w.desired(), Some(sha(2)));
    assert!(w.revision().generation > forced);
    assert!(!w.revision().force_prune);
    // So is a plain re-sync.
    w.trigger(None).unwrap();
    assert!(!w.revision().force_prune);
    // Moving to a commit with a forced trigger grants it too.
    let mut manual = World::new(Mode::Manual);
    manual.push(1);
    manual.trigger_forced(Some(1)).unwrap();
    assert!(manual.revision().force_prune);
}

#[test]
fn triggering_a_commit_not_on_the_branch_is_refused() {
    let mut w = World::new(Mode::Manual);
    w.push(1);
    assert_eq!(
        w.trigger(Some(9)).unwrap_err(),
        GateError::NotOnBranch(sha(9))
    );
}

#[test]
fn pause_holds_the_agent_while_the_gate_moves_and_resume_releases_the_newest() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.pause();

    w.push(2);
    w.pipeline(2, 20, Success);
    w.push(3);
    let step = w.pipeline(3, 30, Success);

    assert!(!step.desired_changed);
    assert_eq!(w.position(), Some(sha(3)));
    assert_eq!(w.desired(), Some(sha(1)));
    assert!(has_decision(&step.decisions, Outcome::Hold, 3, "paused"));

    let step = w.resume().unwrap();

    assert!(step.desired_changed);
    assert_eq!(w.desired(), Some(sha(3)));
    assert_eq!(w.revision().pipeline_id, Some(30));
}

/// A resume or an unpin goes where the gate stands with the facts recorded by then, not
/// where it stood when it last ran: in between, a late push may have shown that the
/// gate's old position is behind the revision the agent holds.
#[test]
fn resume_and_unpin_run_the_gate_on_the_facts_recorded_since_it_last_ran() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.pause();
    w.record_green_push_unevaluated(2);
    w.resume().unwrap();
    assert_eq!(w.desired(), Some(sha(2)));
    assert_eq!(w.position(), Some(sha(2)));

    w.pin(sha(1)).unwrap();
    w.record_green_push_unevaluated(3);
    w.unpin().unwrap();
    assert_eq!(w.desired(), Some(sha(3)));
}

#[test]
fn resume_or_unpin_without_a_hold_is_refused() {
    let mut w = World::new(Mode::Pipeline);
    assert_eq!(w.resume().unwrap_err(), GateError::NotPaused);
    assert_eq!(w.unpin().unwrap_err(), GateError::NotPinned);
}

#[test]
fn pin_rolls_back_to_an_older_commit_and_holds_while_the_gate_moves_until_unpinned() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);
    w.pipeline(2, 20, Success);

    let step = w.pin(sha(1)).unwrap();

    assert!(step.desired_changed);
    assert_eq!(w.desired(), Some(sha(1)));
    assert!(w.revision().reason.contains("bad release"));

    w.push(3);
    w.pipeline(3, 30, Success);
    assert_eq!(w.position(), Some(sha(3)));
    assert_eq!(w.desired(), Some(sha(1)));

    let step = w.unpin().unwrap();

    assert!(step.desired_changed);
    assert_eq!(w.desired(), Some(sha(3)));
}

#[test]
fn pin_to_an_abbreviated_sha_is_refused() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    let abbreviated = Sha::parse(&sha(1).as_str()[..12]).unwrap();

    assert_eq!(
        w.pin(abbreviated.clone()).unwrap_err(),
        GateError::AbbreviatedPin(abbreviated)
    );
    assert_eq!(w.gate.pinned, None);
    assert_eq!(w.desired(), Some(sha(1)));
}

#[test]
fn recreated_branch_is_deployed_once_green_as_the_old_commit_left_the_branch() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.delete_branch();
    assert_eq!(w.desired(), Some(sha(1)));

    w.push(2);
    assert_eq!(w.desired(), Some(sha(1)));
    w.pipeline(2, 20, Success);

    assert_eq!(w.desired(), Some(sha(2)));
    assert!(
        w.decisions_about(2)
            .iter()
            .all(|d| !d.reason.contains("descendant"))
    );
}

#[test]
fn redelivered_push_from_before_a_branch_deletion_is_not_a_new_head() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);
    w.pipeline(2, 20, Success);
    w.delete_branch();
    w.push(3);
    w.pipeline(3, 30, Success);
    assert_eq!(w.desired(), Some(sha(3)));

    // GitLab retries webhooks; `before` shows this push happened on the old line.
    w.refs.record_push(&Push {
        before: Before::Head(sha(1)),
        after: Some(sha(2)),
        at_ms: 0,
    });
    w.advance();

    assert_eq!(w.refs.head().unwrap().sha, sha(3));
    assert_eq!(w.desired(), Some(sha(3)));
}

#[test]
fn every_deploy_and_skip_says_why() {
    let mut gated = World::new(Mode::Pipeline);
    gated.push(1);
    gated.pipeline(1, 10, Running);
    gated.pipeline(1, 10, Failed);
    gated.pipeline(1, 11, Success);
    gated.push(2);
    gated.push(3);
    gated.refs.record_pipeline(&sha(2), run(20, Success));
    gated.refs.record_pipeline(&sha(3), run(30, Success));
    gated.advance();

    let history: Vec<Decision> = gated.gate.decisions.iter().cloned().collect();
    let expected = [
        (Outcome::Skip, 1, "no pipeline has run for it yet"),
        (Outcome::Skip, 1, "pipeline 10 is running"),
        (Outcome::Skip, 1, "pipeline 10 is failed"),
        (Outcome::Deploy, 1, "pipeline 11 succeeded"),
        (Outcome::Skip, 2, "no pipeline has run for it yet"),
        (Outcome::Skip, 3, "no pipeline has run for it yet"),
        (Outcome::Skip, 2, "superseded by 03030303"),
        (Outcome::Deploy, 3, "pipeline 30 succeeded"),
    ];
    for (outcome, n, reason) in expected {
        assert!(
            has_decision(&history, outcome, n, reason),
            "no {outcome:?} of {n} saying {reason:?} in {history:#?}"
        );
    }

    let mut immediate = World::new(Mode::Immediate);
    immediate.push(1);
    let mut manual = World::new(Mode::Manual);
    manual.push(1);
    manual.trigger(None).unwrap();

    let all = [&gated, &immediate, &manual]
        .into_iter()
        .flat_map(|w| w.gate.decisions.iter());
    let explained = [
        "pipeline",
        "superseded by",
        "immediate mode",
        "triggered by an operator",
    ];
    for d in all.filter(|d| d.outcome != Outcome::Hold) {
        assert!(d.sha.is_some(), "{d:?}");
        assert!(explained.iter().any(|why| d.reason.contains(why)), "{d:?}");
    }
}

#[test]
fn repeated_evaluations_do_not_grow_the_decision_history() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);
    w.pipeline(2, 20, Failed);
    w.push(3);
    w.pipeline(3, 30, Running);
    w.pause();
    w.push(4);
    w.pipeline(4, 40, Success);
    let decisions = w.gate.decisions.clone();
    let desired = w.gate.desired.clone();

    for _ in 0..3 {
        let step = w.advance();
        assert_eq!(step, Step::default());
        // Webhook redeliveries re-evaluate the gate just the same.
        let step = w.pipeline(3, 30, Running);
        assert_eq!(step, Step::default());
        let step = w.push(2);
        assert_eq!(step, Step::default());
    }

    assert_eq!(w.gate.decisions, decisions);
    assert_eq!(w.gate.desired, desired);
}

#[test]
fn pausing_again_after_a_resume_is_recorded_again() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.pause();
    w.resume().unwrap();
    let recorded = w.gate.decisions.len();

    // Operators read the last entries to know whether the agent is held right now.
    let paused = w.pause();
    let resumed = w.resume().unwrap();

    assert!(
        has_decision(&paused.decisions, Outcome::Hold, 1, "paused"),
        "second pause left no decision: {:?}",
        w.gate.decisions
    );
    assert!(
        resumed.decisions.iter().any(|d| d.reason == "resumed"),
        "second resume left no decision: {:?}",
        w.gate.decisions
    );
    assert_eq!(w.gate.decisions.len(), recorded + 2);
}

#[test]
fn pin_is_recorded_as_a_decision_with_its_reason() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.pipeline(1, 10, Success);
    w.push(2);
    w.pipeline(2, 20, Success);

    // A rollback is the decision operators most need to find in the history later.
    let step = w.pin(sha(1)).unwrap();

    assert!(
        step.decisions
            .iter()
            .any(|d| d.sha == Some(sha(1)) && d.reason.contains("bad release")),
        "pin left no decision: {:?}",
        w.gate.decisions
    );
}

// --- Property: any delivery order of the same facts ---

#[derive(Debug, Clone)]
enum Delivery {
    Push(u8),
    Pipeline(u8, Pipeline),
}

#[derive(Debug, Clone)]
struct RunSpec {
    outcome: PipelineStatus,
    reports_running: bool,
    merge_request: bool,
}

fn run_spec(merge_request: bool) -> impl Strategy<Value = RunSpec> {
    (
        prop_oneof![Just(Success), Just(Failed), Just(Canceled)],
        any::<bool>(),
    )
        .prop_map(move |(outcome, reports_running)| RunSpec {
            outcome,
            reports_running,
            merge_request,
        })
}

/// A commit's runs in id order: up to three branch pipelines, maybe a merge request one
/// anywhere among them.
fn commit_runs() -> impl Strategy<Value = Vec<RunSpec>> {
    (
        prop::collection::vec(run_spec(false), 0..=3),
        prop::option::weighted(0.3, (run_spec(true), any::<Index>())),
    )
        .prop_map(|(mut runs, mr)| {
            if let Some((spec, at)) = mr {
                runs.insert(at.index(runs.len() + 1), spec);
            }
            runs
        })
}

/// Pushes of commits 1..=n in order, then every pipeline update, ids increasing globally.
fn base_deliveries(commits: &[Vec<RunSpec>]) -> Vec<Delivery> {
    let mut deliveries: Vec<Delivery> = (1..=commits.len() as u8).map(Delivery::Push).collect();
    let mut id = 100;
    for (n, runs) in (1..).zip(commits) {
        for spec in runs {
            id += 1;
            let source = if spec.merge_request {
                MERGE_REQUEST_SOURCE
            } else {
                "push"
            };
            let update = |status: PipelineStatus, as_of_ms| Pipeline {
                id,
                status,
                source: source.to_owned(),
                as_of_ms,
                passed_stages: Vec::new(),
            };
            if spec.reports_running {
                deliveries.push(Delivery::Pipeline(n, update(Running, None)));
            }
            deliveries.push(Delivery::Pipeline(n, update(spec.outcome, Some(id as i64))));
        }
    }
    deliveries
}

/// Orders deliveries by random keys, except that pushes keep their order (it is the push
/// order the gate relies on), and adds redeliveries at any point after their original.
fn interleave(
    base: Vec<Delivery>,
    mut keys: Vec<u32>,
    redeliveries: Vec<(Index, u32)>,
) -> Vec<Delivery> {
    let push_slots: Vec<usize> = (0..base.len())
        .filter(|&i| matches!(base[i], Delivery::Push(_)))
        .collect();
    let mut push_keys: Vec<u32> = push_slots.iter().map(|&i| keys[i]).collect();
    push_keys.sort_unstable();
    for (&slot, key) in push_slots.iter().zip(push_keys) {
        keys[slot] = key;
    }
    let mut keyed: Vec<(u64, Delivery)> = keys.into_iter().map(u64::from).zip(base).collect();
    for (original, delay) in redeliveries {
        let (key, delivery) = keyed[original.index(keyed.len())].clone();
        keyed.push((key + u64::from(delay), delivery));
    }
    // Stable: on equal keys originals stay before redeliveries and pushes stay in order.
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, delivery)| delivery).collect()
}

fn delivery_plan() -> impl Strategy<Value = Vec<Delivery>> {
    prop::collection::vec(commit_runs(), 2..8)
        .prop_flat_map(|commits| {
            let base = base_deliveries(&commits);
            let keys = prop::collection::vec(any::<u32>(), base.len());
            let redeliveries = prop::collection::vec((any::<Index>(), any::<u32>()), 0..6);
            (Just(base), keys, redeliveries)
        })
        .prop_map(|(base, keys, redeliveries)| interleave(base, keys, redeliveries))
}

/// The oracle's reading of a verdict straight from the recorded runs, not via `verdict()`.
fn green_in(refs: &RefState, sha: &Sha) -> bool {
    refs.pipelines
        .get(sha)
        .and_then(|runs| {
            runs.iter()
                .filter(|p| p.source != MERGE_REQUEST_SOURCE)
                .max_by_key(|p| p.id)
        })
        .is_some_and(|p| p.status == Success)
}

/// The newest pushed commit that is green right now.
fn newest_green(refs: &RefState) -> Option<u8> {
    refs.heads
        .iter()
        .filter(|h| h.line == refs.line && !refs.deleted && green_in(refs, &h.sha))
        .max_by_key(|h| h.seq)
        .map(|h| commit_of(&h.sha))
}

proptest! {
    #[test]
    fn gate_only_moves_forward_to_the_newest_commit_ever_green(deliveries in delivery_plan()) {
        let mut refs = RefState::default();
        let mut gate = AgentGate::default();
        let mut newest_ever_green: Option<u8> = None;
        let mut last_desired: Option<u8> = None;
        let mut last_generation = 0;

        for (at, delivery) in deliveries.iter().enumerate() {
            match delivery {
                Delivery::Push(n) => refs.record_push(&Push {
                    before: Before::Created,
                    after: Some(sha(*n)),
                    at_ms: at as i64,
                }),
                Delivery::Pipeline(n, update) => refs.record_pipeline(&sha(*n), update.clone()),
            };
            let lineage = PushOrder::new(&refs);
            let cx = Context::new(Mode::Pipeline, &[], &refs, &lineage, at as i64);
            let step = gate.advance(&cx);
            newest_ever_green = newest_ever_green.max(newest_green(&refs));

            // Commit numbers are push order: the generator keeps pushes in order.
            let desired = gate.desired.as_ref().map(|r| commit_of(&r.sha));
            prop_assert!(desired >= last_desired, "went back from {last_desired:?} to {desired:?}");
            let generation = gate.desired.as_ref().map_or(0, |r| r.generation);
            if step.desired_changed {
                prop_assert!(generation > last_generation);
                let revision = gate.desired.as_ref().unwrap();
                let runs = &refs.pipelines[&revision.sha];
                let pipeline = runs.iter().find(|p| Some(p.id) == revision.pipeline_id);
                prop_assert!(
                    pipeline.is_some_and(|p| p.status == Success && p.counts_for_branch()),
                    "deployed {revision:?} on {runs:?}"
                );
            } else {
                prop_assert_eq!(generation, last_generation);
            }
            prop_assert!(gate.decisions.len() <= DECISION_HISTORY);
            last_desired = desired;
            last_generation = generation;
        }

        prop_assert_eq!(last_desired, newest_ever_green);

        // Every final result is on record, whatever order the updates came in.
        for delivery in &deliveries {
            if let Delivery::Pipeline(n, update) = delivery
                && update.status.is_final()
            {
                let recorded = refs.pipelines[&sha(*n)].iter().find(|p| p.id == update.id);
                prop_assert_eq!(recorded.map(|p| p.status), Some(update.status));
            }
        }
        // Unless the deployed commit later went red, it is the newest green commit.
        if let Some(n) = last_desired
            && green_in(&refs, &sha(n))
        {
            prop_assert_eq!(last_desired, newest_green(&refs));
        }
    }
}

/// A lineage that knows only some commits, as a mirror that has not fetched yet.
struct PartlyFetched<'a> {
    order: PushOrder<'a>,
    known: Vec<Sha>,
}

impl Lineage for PartlyFetched<'_> {
    fn on_branch(&self, sha: &Sha) -> bool {
        self.knows(sha) && self.order.on_branch(sha)
    }
    fn descends_from(&self, descendant: &Sha, ancestor: &Sha) -> bool {
        self.knows(descendant)
            && self.knows(ancestor)
            && self.order.descends_from(descendant, ancestor)
    }
    fn knows(&self, sha: &Sha) -> bool {
        self.known.contains(sha)
    }
}

#[test]
fn a_deployed_commit_the_mirror_does_not_know_blocks_instead_of_counting_as_gone() {
    let mut refs = RefState::default();
    let mut gate = AgentGate::default();
    for n in 1..=2 {
        refs.record_push(&Push {
            before: Before::Created,
            after: Some(sha(n)),
            at_ms: 0,
        });
        refs.record_pipeline(
            &sha(n),
            Pipeline {
                id: u64::from(n),
                status: Success,
                source: "push".into(),
                as_of_ms: None,
                passed_stages: Vec::new(),
            },
        );
    }
    let full = PushOrder::new(&refs);
    gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &full, 0));
    assert_eq!(gate.desired.as_ref().map(|r| r.sha.clone()), Some(sha(2)));

    refs.record_push(&Push {
        before: Before::Head(sha(2)),
        after: Some(sha(3)),
        at_ms: 0,
    });
    refs.record_pipeline(
        &sha(3),
        Pipeline {
            id: 3,
            status: Success,
            source: "push".into(),
            as_of_ms: None,
            passed_stages: Vec::new(),
        },
    );
    // Another replica's stale mirror: it has 1 and 3 but not the deployed 2.
    let stale = PartlyFetched {
        order: PushOrder::new(&refs),
        known: vec![sha(1), sha(3)],
    };
    let step = gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &stale, 0));
    assert!(!step.desired_changed);
    assert!(
        gate.decisions
            .back()
            .is_some_and(|d| d.reason.contains("not in the mirror yet"))
    );
}

#[test]
fn required_stages_open_the_gate_while_the_deploy_stage_still_runs() {
    let mut refs = RefState::default();
    let mut gate = AgentGate::default();
    let stages = vec!["test".to_owned(), "security".to_owned()];
    refs.record_push(&Push {
        before: Before::Created,
        after: Some(sha(1)),
        at_ms: 0,
    });
    let mut running = Pipeline {
        id: 5,
        status: Running,
        source: "push".into(),
        as_of_ms: None,
        passed_stages: vec!["test".into()],
    };
    refs.record_pipeline(&sha(1), running.clone());
    let step = gate.advance(&Context::new(
        Mode::Pipeline,
        &stages,
        &refs,
        &PushOrder::new(&refs),
        0,
    ));
    assert!(!step.desired_changed, "security has not passed yet");

    running.passed_stages.push("security".into());
    refs.record_pipeline(&sha(1), running);
    gate.advance(&Context::new(
        Mode::Pipeline,
        &stages,
        &refs,
        &PushOrder::new(&refs),
        0,
    ));
    let desired = gate.desired.clone().unwrap();
    assert_eq!(desired.sha, sha(1));
    assert_eq!(desired.reason, "pipeline 5 passed stages test, security");

    // Without required stages the same running pipeline keeps the gate shut.
    let mut strict = AgentGate::default();
    strict.advance(&Context::new(
        Mode::Pipeline,
        &[],
        &refs,
        &PushOrder::new(&refs),
        0,
    ));
    assert!(strict.desired.is_none());
}

#[test]
fn a_failed_pipeline_never_counts_even_if_its_required_stages_passed() {
    let mut refs = RefState::default();
    let mut gate = AgentGate::default();
    let stages = vec!["test".to_owned()];
    refs.record_push(&Push {
        before: Before::Created,
        after: Some(sha(1)),
        at_ms: 0,
    });
    let failed = Pipeline {
        id: 5,
        status: Failed,
        source: "push".into(),
        as_of_ms: None,
        passed_stages: vec!["test".into()],
    };
    refs.record_pipeline(&sha(1), failed);
    gate.advance(&Context::new(
        Mode::Pipeline,
        &stages,
        &refs,
        &PushOrder::new(&refs),
        0,
    ));
    assert!(gate.desired.is_none());
}

#[test]
fn an_agent_was_told_only_what_the_gate_or_an_operator_sent_it() {
    let mut w = World::new(Mode::Pipeline);
    w.push(1);
    w.push(2);
    assert!(!w.gate.was_told(&sha(1)), "pushed, never green");
    w.pipeline(2, 20, Success);
    w.pipeline(1, 10, Success);
    assert!(w.gate.was_told(&sha(2)));
    // Green only after a newer commit was deployed: superseded, never sent.
    assert!(!w.gate.was_told(&sha(1)));
    w.push(3);
    w.pipeline(3, 30, Success);
    // The previous revision stays reportable: an apply may finish after the gate moved on.
    assert!(w.gate.was_told(&sha(2)) && w.gate.was_told(&sha(3)));
    w.pin(sha(1)).unwrap();
    w.unpin().unwrap();
    assert!(w.gate.was_told(&sha(1)), "pinned once");
    assert!(!w.gate.was_told(&sha(9)));
}

/// A straight history where commit `n` is generation `n`, as a mirror that has every
/// commit knows it.
struct History;

impl Lineage for History {
    fn on_branch(&self, _sha: &Sha) -> bool {
        true
    }
    fn descends_from(&self, descendant: &Sha, ancestor: &Sha) -> bool {
        descendant >= ancestor
    }
    fn generation(&self, sha: &Sha) -> Option<u32> {
        sha.as_str()[32..].parse().ok()
    }
}

/// The gate's newest head is the branch's newest commit where the mirror can tell, even
/// when push order says otherwise: here 4 was read from GitLab while its pipeline ran, then
/// the late hook of 3 (pushed on top of a 2 never heard of) went above it in push order and
/// was deployed. In push order alone, 4 turning green would never be looked at again.
#[test]
fn history_not_push_order_tells_the_newest_head_when_the_mirror_knows() {
    let mut refs = RefState::default();
    refs.record_push(&Push {
        before: Before::Created,
        after: Some(sha(1)),
        at_ms: 0,
    });
    refs.record_pipeline(&sha(1), run(1, Success));
    refs.record_push(&Push {
        before: Before::Unknown,
        after: Some(sha(4)),
        at_ms: 0,
    });
    refs.record_pipeline(&sha(4), run(4, Running));
    refs.record_push(&Push {
        before: Before::Head(sha(2)),
        after: Some(sha(3)),
        at_ms: 0,
    });
    refs.record_pipeline(&sha(3), run(3, Success));
    let push_order: Vec<Sha> = refs.current_heads().map(|h| h.sha.clone()).collect();
    assert_eq!(
        push_order,
        [sha(3), sha(4), sha(1)],
        "push order is wrong here"
    );

    let desired = |gate: &AgentGate| gate.desired.as_ref().map(|r| r.sha.clone());
    let mut gate = AgentGate::default();
    gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &History, 0));
    assert_eq!(desired(&gate), Some(sha(3)), "3 is green, 4 still runs");
    refs.record_pipeline(&sha(4), run(4, Success));
    let step = gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &History, 0));
    assert!(step.desired_changed);
    assert_eq!(desired(&gate), Some(sha(4)));

    // Immediate and manual mode take the same newest head.
    let mut immediate = AgentGate::default();
    immediate.advance(&Context::new(Mode::Immediate, &[], &refs, &History, 0));
    assert_eq!(desired(&immediate), Some(sha(4)));
    let cx = Context::new(Mode::Manual, &[], &refs, &History, 0);
    assert_eq!(cx.heads().first().map(|h| h.sha.clone()), Some(sha(4)));

    // Push order alone is what it is: the gate stays on 3.
    let mut by_push = AgentGate::default();
    let order = PushOrder::new(&refs);
    by_push.advance(&Context::new(Mode::Pipeline, &[], &refs, &order, 0));
    assert_eq!(desired(&by_push), Some(sha(3)));
}

/// How the server comes to know a commit of a straight history.
#[derive(Debug, Clone, Copy)]
enum Heard {
    /// Its push hook, on top of the commit before it.
    Hook,
    /// Read from GitLab's API as the branch's head.
    Read,
    /// Its hook was lost: a head never recorded.
    Lost,
}

proptest! {
    /// With the branch's history known, push order does not matter: whatever hooks are
    /// lost, late, or preceded by a read of the head from GitLab, the desired revision
    /// never moves back, and ends on the newest green commit the ref knows of.
    #[test]
    fn with_the_history_known_push_order_never_matters(
        heard in proptest::collection::vec(
            prop_oneof![3 => Just(Heard::Hook), 1 => Just(Heard::Read), 1 => Just(Heard::Lost)],
            9,
        ),
        order in Just((1u8..=9).collect::<Vec<_>>()).prop_shuffle(),
        green in proptest::collection::vec(any::<bool>(), 9),
    ) {
        let is_green = |n: u8| green[usize::from(n - 1)];
        let mut refs = RefState::default();
        for n in 1..=9u8 {
            if is_green(n) {
                refs.record_pipeline(&sha(n), run(u64::from(n), Success));
            }
        }
        let mut gate = AgentGate::default();
        let mut last: Option<u8> = None;
        for n in order {
            let before = match heard[usize::from(n - 1)] {
                Heard::Lost => continue,
                Heard::Read => Before::Unknown,
                Heard::Hook if n == 1 => Before::Created,
                Heard::Hook => Before::Head(sha(n - 1)),
            };
            refs.record_push(&Push { before, after: Some(sha(n)), at_ms: 0 });
            gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &History, 0));
            let desired = gate.desired.as_ref().map(|r| commit_of(&r.sha));
            prop_assert!(desired >= last, "went back from {last:?} to {desired:?}");
            last = desired;
        }
        let newest_known_green = refs
            .current_heads()
            .map(|h| commit_of(&h.sha))
            .filter(|&n| is_green(n))
            .max();
        prop_assert_eq!(last, newest_known_green);
    }
}
