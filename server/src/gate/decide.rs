//! Per agent: where the gate stands, what the agent is told, and why.

use std::cell::OnceCell;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::model::{Head, Lineage, PipelineStatus, RefState, Sha, ShaSet};

/// Deployed commits remembered per agent: as many as a ref keeps heads.
pub const DEPLOYED_HISTORY: usize = super::model::MAX_HEADS;

/// Decisions kept per agent for operators to read.
pub const DECISION_HISTORY: usize = 50;

/// How an agent's desired revision advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The newest commit whose current pipeline succeeded.
    #[default]
    Pipeline,
    /// Every new head, as kas's legacy GitOps did.
    Immediate,
    /// Only on an explicit trigger.
    Manual,
}

impl Mode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pipeline => "pipeline",
            Mode::Immediate => "immediate",
            Mode::Manual => "manual",
        }
    }
}

/// The revision an agent should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub sha: Sha,
    pub pipeline_id: Option<u64>,
    pub reason: String,
    pub decided_at_ms: i64,
    /// Bumped by every change of what the agent is told, including a re-sync of the same sha.
    pub generation: u64,
    /// An operator allowed this revision to prune beyond the agent's prune limit; only ever
    /// set on what the agent is told, for the generation the trigger made.
    #[serde(default)]
    pub force_prune: bool,
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Deploy,
    Hold,
    Skip,
}

/// One decision and its reason, kept for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub sha: Option<Sha>,
    pub pipeline_id: Option<u64>,
    pub reason: String,
    pub at_ms: i64,
    /// For a green commit skipped because a newer deploy already includes it: that deploy.
    /// What the commit status publisher acts on; `reason` is only its rendering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<Sha>,
}

impl Decision {
    fn same_as(&self, other: &Decision) -> bool {
        self.outcome == other.outcome
            && self.sha == other.sha
            && self.pipeline_id == other.pipeline_id
            && self.reason == other.reason
    }
}

/// An operator's hold on an agent: a pause, or a pin to one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub reason: String,
    pub since_ms: i64,
}

/// A pin: the agent stays on `sha` until unpinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub sha: Sha,
    pub reason: String,
    pub since_ms: i64,
}

/// The gate's state for one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentGate {
    /// Where the gate stands: only ever moves forward.
    pub position: Option<Revision>,
    /// What the agent is told: the gate's position, a pin, or what it had when paused.
    pub desired: Option<Revision>,
    pub paused: Option<Hold>,
    pub pinned: Option<Pin>,
    pub generation: u64,
    /// Newest last.
    pub decisions: VecDeque<Decision>,
    /// Commits the gate moved to, newest last: they were deployed, not superseded.
    #[serde(default)]
    pub deployed: VecDeque<Sha>,
}

/// Why an operator's request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("commit {0} is not on the branch")]
    NotOnBranch(Sha),
    #[error("commit {sha} cannot be deployed: {reason}")]
    NotGreen { sha: Sha, reason: String },
    #[error("commit {sha} cannot be deployed: {reason}; pin it to roll back deliberately")]
    NotForward { sha: Sha, reason: String },
    #[error("the branch has no commit yet")]
    NoCommit,
    #[error("there is no revision to sync yet")]
    NothingToSync,
    #[error("pin needs a full commit SHA (40 or 64 characters), got {0}")]
    AbbreviatedPin(Sha),
    #[error("trigger needs a full commit SHA (40 or 64 characters), got {0}")]
    AbbreviatedTrigger(Sha),
    #[error("the agent is not paused")]
    NotPaused,
    #[error("the agent is not pinned")]
    NotPinned,
}

/// What changed for an agent in one step, for notifications.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Decisions made in this step, in order.
    pub decisions: Vec<Decision>,
    /// Whether the desired revision (or its generation) changed.
    pub desired_changed: bool,
}

/// Inputs that are the same for every decision in one step, and for every agent of a ref
/// with the same settings.
pub struct Context<'a> {
    pub mode: Mode,
    /// In pipeline mode: stages whose success suffices while later stages (a deploy job
    /// that waits for Greenlight) still run; empty means the whole pipeline must succeed.
    pub stages: &'a [String],
    pub refs: &'a RefState,
    pub lineage: &'a dyn Lineage,
    pub now_ms: i64,
    /// What every agent decided with this context asks about the ref, worked out once: a
    /// ref keeps hundreds of heads and may have thousands of agents.
    heads: OnceCell<HeadFacts<'a>>,
    /// The current line's heads, newest first, worked out once.
    newest_first: OnceCell<Vec<&'a Head>>,
}

/// The ref's heads as `mark_superseded` asks about them.
struct HeadFacts<'a> {
    /// Every head the ref remembers, on any line.
    known: ShaSet<'a>,
    /// Heads of the current line that are on the branch and green, newest first.
    green: Vec<&'a Sha>,
}

impl<'a> Context<'a> {
    /// The context for agents in `mode` (with `stages`) deciding on `refs` at `now_ms`.
    pub fn new(
        mode: Mode,
        stages: &'a [String],
        refs: &'a RefState,
        lineage: &'a dyn Lineage,
        now_ms: i64,
    ) -> Self {
        Self {
            mode,
            stages,
            refs,
            lineage,
            now_ms,
            heads: OnceCell::new(),
            newest_first: OnceCell::new(),
        }
    }

    /// The current line's heads, newest first by history where the lineage knows it
    /// ([`RefState::newest_first`]), worked out once: taking push order, the gate would take
    /// an older head for the branch's newest when a hook was lost or came late.
    pub fn heads(&self) -> &[&'a Head] {
        self.newest_first
            .get_or_init(|| self.refs.newest_first(self.lineage))
    }

    fn head_facts(&self) -> &HeadFacts<'a> {
        self.heads.get_or_init(|| HeadFacts {
            known: self.refs.heads.iter().map(|h| &h.sha).collect(),
            green: self
                .heads()
                .iter()
                .map(|h| &h.sha)
                .filter(|sha| self.lineage.on_branch(sha) && self.green(sha).is_ok())
                .collect(),
        })
    }

    /// Whether the gate may move from `current` to `candidate` without going backwards.
    ///
    /// A deployed commit that left the branch (force push, deletion) no longer anchors the
    /// gate: the new line of history may be deployed.
    fn forward(&self, current: Option<&Revision>, candidate: &Sha) -> Result<(), String> {
        match current {
            None => Ok(()),
            Some(cur) if !self.lineage.knows(&cur.sha) => Err(format!(
                "deployed {} is not in the mirror yet; waiting for a fetch",
                cur.sha.short()
            )),
            Some(cur) if !self.lineage.on_branch(&cur.sha) => Ok(()),
            Some(cur) if self.lineage.descends_from(candidate, &cur.sha) => Ok(()),
            Some(cur) => Err(format!("not a descendant of deployed {}", cur.sha.short())),
        }
    }

    fn green(&self, sha: &Sha) -> Result<u64, String> {
        match self.refs.verdict(sha) {
            None => Err("no pipeline has run for it yet".to_owned()),
            Some(p) if p.status == PipelineStatus::Success => Ok(p.id),
            Some(p) if self.stages_passed(p) => Ok(p.id),
            Some(p) => Err(format!("pipeline {} is {}", p.id, p.status)),
        }
    }

    /// Why pipeline `id` opened the gate.
    fn green_reason(&self, id: u64) -> String {
        if self.stages.is_empty() {
            format!("pipeline {id} succeeded")
        } else {
            format!("pipeline {id} passed stages {}", self.stages.join(", "))
        }
    }

    /// Whether the required stages of a pipeline that has not failed all passed.
    fn stages_passed(&self, pipeline: &super::model::Pipeline) -> bool {
        let still_going = !pipeline.status.is_final();
        still_going
            && !self.stages.is_empty()
            && self
                .stages
                .iter()
                .all(|stage| pipeline.passed_stages.contains(stage))
    }
}

impl AgentGate {
    /// Whether the agent was ever told to run `sha`: what it is told now, a pin, a commit
    /// the gate moved to, or a deploy decision still in the history. An agent reports only
    /// on those; a report on anything else would claim a deploy that was never asked for.
    pub fn was_told(&self, sha: &Sha) -> bool {
        self.desired.as_ref().is_some_and(|d| &d.sha == sha)
            || self.pinned.as_ref().is_some_and(|p| &p.sha == sha)
            || self.deployed.contains(sha)
            || self
                .decisions
                .iter()
                .any(|d| d.outcome == Outcome::Deploy && d.sha.as_ref() == Some(sha))
    }

    /// Moves the gate after the ref changed, then settles what the agent is told.
    pub fn advance(&mut self, cx: &Context<'_>) -> Step {
        let mut step = Step::default();
        self.advance_into(cx, &mut step);
        step
    }

    /// [`Self::advance`], adding to `step`.
    fn advance_into(&mut self, cx: &Context<'_>, step: &mut Step) {
        match cx.mode {
            Mode::Pipeline => self.advance_on_pipelines(cx, step),
            Mode::Immediate => self.advance_to_head(cx, step),
            Mode::Manual => {}
        }
        self.settle(cx.now_ms, false, step);
    }

    fn advance_on_pipelines(&mut self, cx: &Context<'_>, step: &mut Step) {
        let current = self.position.clone();
        let mut chosen: Option<(Sha, u64)> = None;
        for head in cx.heads() {
            if current.as_ref().is_some_and(|cur| cur.sha == head.sha) {
                break;
            }
            if chosen.is_some() {
                // Older than the winner: see mark_superseded.
                continue;
            }
            if !cx.lineage.on_branch(&head.sha) {
                let why = "not on the branch (force-pushed away, or not fetched yet)".to_owned();
                self.record(step, cx.now_ms, Outcome::Skip, Some(&head.sha), None, why);
                continue;
            }
            match cx.green(&head.sha) {
                Err(why) => self.record(step, cx.now_ms, Outcome::Skip, Some(&head.sha), None, why),
                Ok(pipeline) => match cx.forward(current.as_ref(), &head.sha) {
                    Ok(()) => chosen = Some((head.sha.clone(), pipeline)),
                    Err(why) => self.record(
                        step,
                        cx.now_ms,
                        Outcome::Skip,
                        Some(&head.sha),
                        Some(pipeline),
                        why,
                    ),
                },
            }
        }
        if let Some((sha, pipeline)) = chosen {
            let reason = cx.green_reason(pipeline);
            self.move_to(step, cx.now_ms, sha, Some(pipeline), reason);
        }
        self.mark_superseded(cx, step);
    }

    /// Green commits the deployed one includes but that never went out themselves are
    /// superseded: say so once, so that whoever waits for them stops waiting. Their pipeline
    /// may turn green only after a newer commit was deployed.
    fn mark_superseded(&mut self, cx: &Context<'_>, step: &mut Step) {
        let Some(position) = self.position.as_ref().map(|p| p.sha.clone()) else {
            return;
        };
        // Commits that left the ref's history cannot be superseded any more. This runs for
        // every agent of the ref, whose histories hold hundreds of ids: what does not depend
        // on the agent is the context's, and lookups go through sets of borrowed ids.
        let heads = cx.head_facts();
        self.deployed.retain(|sha| heads.known.contains(sha));
        let superseded: Vec<Sha> = {
            let deployed: ShaSet<'_> = self.deployed.iter().collect();
            heads
                .green
                .iter()
                .filter(|sha| {
                    ***sha != position
                        && !deployed.contains(**sha)
                        && cx.lineage.descends_from(&position, sha)
                })
                .map(|sha| (*sha).clone())
                .collect()
        };
        for sha in superseded {
            let decision = Decision {
                outcome: Outcome::Skip,
                reason: format!("superseded by {}", position.short()),
                sha: Some(sha),
                pipeline_id: None,
                at_ms: cx.now_ms,
                superseded_by: Some(position.clone()),
            };
            self.record_decision(step, decision);
        }
    }

    fn advance_to_head(&mut self, cx: &Context<'_>, step: &mut Step) {
        let Some(head) = cx.heads().first() else {
            return;
        };
        if self
            .position
            .as_ref()
            .is_some_and(|cur| cur.sha == head.sha)
        {
            return;
        }
        if !cx.lineage.on_branch(&head.sha) {
            let why = "not on the branch (force-pushed away, or not fetched yet)".to_owned();
            self.record(step, cx.now_ms, Outcome::Skip, Some(&head.sha), None, why);
            return;
        }
        match cx.forward(self.position.as_ref(), &head.sha) {
            Ok(()) => self.move_to(
                step,
                cx.now_ms,
                head.sha.clone(),
                None,
                "new head (immediate mode)".into(),
            ),
            Err(why) => self.record(step, cx.now_ms, Outcome::Skip, Some(&head.sha), None, why),
        }
    }

    /// An explicit request to sync: in manual mode it deploys `sha` (or the head) whatever
    /// its pipeline; otherwise it re-sends the desired revision, or moves to `sha` if the
    /// gate would allow it. With `force_prune`, the revision this sends may prune beyond the
    /// agent's prune limit.
    pub fn trigger(
        &mut self,
        cx: &Context<'_>,
        sha: Option<&Sha>,
        force_prune: bool,
    ) -> Result<Step, GateError> {
        // An abbreviation could name another commit once the repository grows: what an
        // operator deploys must be unambiguous, as for pins.
        if let Some(sha) = sha.filter(|sha| !sha.is_full()) {
            return Err(GateError::AbbreviatedTrigger(sha.clone()));
        }
        let step = self.trigger_step(cx, sha)?;
        if force_prune
            && step.desired_changed
            && let Some(desired) = &mut self.desired
        {
            desired.force_prune = true;
        }
        Ok(step)
    }

    fn trigger_step(&mut self, cx: &Context<'_>, sha: Option<&Sha>) -> Result<Step, GateError> {
        let mut step = Step::default();
        let target = match (sha, cx.mode) {
            (Some(sha), _) => Some(sha.clone()),
            (None, Mode::Manual) => {
                Some(cx.heads().first().ok_or(GateError::NoCommit)?.sha.clone())
            }
            (None, _) => None,
        };
        let Some(target) = target else {
            if self.desired.is_none() {
                return Err(GateError::NothingToSync);
            }
            self.settle(cx.now_ms, true, &mut step);
            return Ok(step);
        };
        if self.position.as_ref().is_some_and(|cur| cur.sha == target) {
            self.settle(cx.now_ms, true, &mut step);
            return Ok(step);
        }
        if !cx.lineage.on_branch(&target) {
            return Err(GateError::NotOnBranch(target));
        }
        let pipeline = match cx.mode {
            Mode::Pipeline => Some(cx.green(&target).map_err(|reason| GateError::NotGreen {
                sha: target.clone(),
                reason,
            })?),
            Mode::Immediate | Mode::Manual => None,
        };
        cx.forward(self.position.as_ref(), &target)
            .map_err(|reason| GateError::NotForward {
                sha: target.clone(),
                reason,
            })?;
        self.move_to(
            &mut step,
            cx.now_ms,
            target,
            pipeline,
            "triggered by an operator".into(),
        );
        self.settle(cx.now_ms, false, &mut step);
        Ok(step)
    }

    /// Holds the agent on what it has until resumed.
    pub fn pause(&mut self, reason: String, now_ms: i64) -> Step {
        let mut step = Step::default();
        let sha = self.desired.as_ref().map(|r| r.sha.clone());
        self.record_action(
            &mut step,
            now_ms,
            Outcome::Hold,
            sha.as_ref(),
            format!("paused: {reason}"),
        );
        self.paused = Some(Hold {
            reason,
            since_ms: now_ms,
        });
        step
    }

    /// Releases a pause: the agent goes to where the gate stands now, with the facts of
    /// `cx`. The gate runs first: facts recorded since it last ran (a late push that put the
    /// line in order) may show that where it stood is behind what the agent holds.
    pub fn resume(&mut self, cx: &Context<'_>) -> Result<Step, GateError> {
        let mut step = Step::default();
        self.paused.take().ok_or(GateError::NotPaused)?;
        self.record_action(&mut step, cx.now_ms, Outcome::Hold, None, "resumed".into());
        self.advance_into(cx, &mut step);
        Ok(step)
    }

    /// Holds the agent on `sha`, even an older commit: a deliberate, recorded rollback.
    pub fn pin(&mut self, sha: Sha, reason: String, now_ms: i64) -> Result<Step, GateError> {
        if !sha.is_full() {
            return Err(GateError::AbbreviatedPin(sha));
        }
        let mut step = Step::default();
        self.record_action(
            &mut step,
            now_ms,
            Outcome::Deploy,
            Some(&sha),
            format!("pinned: {reason}"),
        );
        self.pinned = Some(Pin {
            sha,
            reason,
            since_ms: now_ms,
        });
        self.settle(now_ms, false, &mut step);
        Ok(step)
    }

    /// Removes a pin: the agent returns to where the gate stands now, run as for a resume.
    pub fn unpin(&mut self, cx: &Context<'_>) -> Result<Step, GateError> {
        let mut step = Step::default();
        self.pinned.take().ok_or(GateError::NotPinned)?;
        self.record_action(
            &mut step,
            cx.now_ms,
            Outcome::Hold,
            None,
            "unpinned: back to the gate".into(),
        );
        self.advance_into(cx, &mut step);
        Ok(step)
    }

    fn move_to(
        &mut self,
        step: &mut Step,
        now_ms: i64,
        sha: Sha,
        pipeline_id: Option<u64>,
        reason: String,
    ) {
        self.record(
            step,
            now_ms,
            Outcome::Deploy,
            Some(&sha),
            pipeline_id,
            reason.clone(),
        );
        self.position = Some(Revision {
            sha,
            pipeline_id,
            reason,
            decided_at_ms: now_ms,
            generation: 0,
            force_prune: false,
        });
        if self.deployed.len() == DEPLOYED_HISTORY {
            self.deployed.pop_front();
        }
        if let Some(position) = &self.position {
            self.deployed.push_back(position.sha.clone());
        }
    }

    /// Derives what the agent is told: a pin wins, a pause keeps what it had, otherwise the
    /// gate's position. `resync` re-sends the same revision under a new generation.
    fn settle(&mut self, now_ms: i64, resync: bool, step: &mut Step) {
        let target = if let Some(pin) = &self.pinned {
            Some(Revision {
                sha: pin.sha.clone(),
                pipeline_id: None,
                reason: format!("pinned: {}", pin.reason),
                decided_at_ms: pin.since_ms,
                generation: 0,
                force_prune: false,
            })
        } else if let Some(hold) = &self.paused {
            if let Some(pos) = &self.position
                && self.desired.as_ref().is_none_or(|d| d.sha != pos.sha)
            {
                let reason = format!("held: paused ({})", hold.reason);
                let sha = pos.sha.clone();
                self.record(
                    step,
                    now_ms,
                    Outcome::Hold,
                    Some(&sha),
                    pos.pipeline_id,
                    reason,
                );
            }
            self.desired.clone()
        } else {
            self.position.clone()
        };
        let Some(mut target) = target else { return };
        // Only the trigger that granted it may: every later revision is limited again.
        target.force_prune = false;
        let unchanged = self.desired.as_ref().is_some_and(|d| d.sha == target.sha);
        if unchanged && !resync {
            return;
        }
        if resync {
            target.reason = format!("re-sync requested ({})", target.reason);
            target.decided_at_ms = now_ms;
        }
        self.generation += 1;
        target.generation = self.generation;
        self.desired = Some(target);
        step.desired_changed = true;
    }

    /// Records an operator's action: unlike re-evaluations, each one is news.
    fn record_action(
        &mut self,
        step: &mut Step,
        at_ms: i64,
        outcome: Outcome,
        sha: Option<&Sha>,
        reason: String,
    ) {
        self.push_decision(
            step,
            Decision {
                outcome,
                sha: sha.cloned(),
                pipeline_id: None,
                reason,
                at_ms,
                superseded_by: None,
            },
        );
    }

    fn record(
        &mut self,
        step: &mut Step,
        at_ms: i64,
        outcome: Outcome,
        sha: Option<&Sha>,
        pipeline_id: Option<u64>,
        reason: String,
    ) {
        let decision = Decision {
            outcome,
            sha: sha.cloned(),
            pipeline_id,
            reason,
            at_ms,
            superseded_by: None,
        };
        self.record_decision(step, decision);
    }

    fn record_decision(&mut self, step: &mut Step, decision: Decision) {
        // Re-evaluations repeat the same verdicts; keep only what is news.
        let repeated = self
            .decisions
            .iter()
            .rev()
            .find(|d| d.sha == decision.sha)
            .is_some_and(|d| d.same_as(&decision));
        if !repeated {
            self.push_decision(step, decision);
        }
    }

    fn push_decision(&mut self, step: &mut Step, decision: Decision) {
        if self.decisions.len() == DECISION_HISTORY {
            self.decisions.pop_front();
        }
        self.decisions.push_back(decision.clone());
        step.decisions.push(decision);
    }
}
