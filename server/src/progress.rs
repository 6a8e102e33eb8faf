//! Where one commit stands on one agent, from the gate's state and the agent's last report:
//! what `greenlightctl wait` follows. Pure: no I/O.

use greenlight::v1::{Phase, RevisionState, StatusReport, revision_state::State};

use crate::gate::{AgentGate, Lineage, Outcome, Sha};

/// Whether a state ends the wait.
pub fn is_final(state: State) -> bool {
    matches!(
        state,
        State::Healthy | State::Failed | State::Degraded | State::Superseded
    )
}

/// The state of `sha` on an agent with `gate`, whose last report is `report`.
pub fn progress(
    sha: &Sha,
    gate: &AgentGate,
    report: Option<&StatusReport>,
    lineage: &dyn Lineage,
) -> RevisionState {
    let state = |state: State, message: String, deployed: &str, report: Option<&StatusReport>| {
        RevisionState {
            state: state.into(),
            message,
            deployed_sha: deployed.to_owned(),
            objects_done: report.map_or(0, |r| r.objects_done),
            objects_total: report.map_or(0, |r| r.objects_total),
        }
    };
    if let Some(report) = report
        && let Ok(reported) = Sha::parse(&report.revision)
        && lineage.descends_from(&reported, sha)
        && reported_is_current(gate, &reported, report)
    {
        let exact = reported == *sha;
        let (kind, message) = match report.phase() {
            Phase::Healthy if exact => (State::Healthy, "deployed and healthy".to_owned()),
            Phase::Healthy => (
                State::Superseded,
                format!("included in {}, deployed and healthy", reported.short()),
            ),
            Phase::Failed => (State::Failed, report.message.clone()),
            Phase::Degraded => (State::Degraded, report.message.clone()),
            Phase::Applying | Phase::Applied | Phase::Unspecified => {
                (State::Applying, report.message.clone())
            }
        };
        return state(kind, message, reported.as_str(), Some(report));
    }
    if let Some(desired) = &gate.desired
        && lineage.descends_from(&desired.sha, sha)
    {
        let message = if desired.sha == *sha {
            format!("deploying: {}", desired.reason)
        } else {
            format!(
                "superseded by {}; waiting for its result",
                desired.sha.short()
            )
        };
        return state(State::Waiting, message, desired.sha.as_str(), None);
    }
    let why = gate
        .decisions
        .iter()
        .rev()
        .find(|d| d.sha.as_ref() == Some(sha) && d.outcome != Outcome::Deploy)
        .map(|d| d.reason.clone())
        .or_else(|| {
            gate.paused
                .as_ref()
                .map(|p| format!("paused: {}", p.reason))
        })
        .unwrap_or_else(|| "not decided yet".to_owned());
    state(State::Waiting, why, "", None)
}

/// A report about an older revision than the one desired, or about an earlier delivery of
/// it (a re-sync since), says nothing about the wait.
fn reported_is_current(gate: &AgentGate, reported: &Sha, report: &StatusReport) -> bool {
    gate.desired
        .as_ref()
        .is_none_or(|d| d.sha == *reported && report.generation >= d.generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{Before, Context, Mode, Pipeline, PipelineStatus, Push, PushOrder, RefState};

    fn sha(n: u8) -> Sha {
        Sha::parse(&format!("{n:040x}")).unwrap()
    }

    fn deployed(shas: &[u8]) -> (RefState, AgentGate) {
        let mut refs = RefState::default();
        let mut gate = AgentGate::default();
        for (i, n) in shas.iter().enumerate() {
            refs.record_push(&Push {
                before: Before::Created,
                after: Some(sha(*n)),
                at_ms: 0,
            });
            let pipeline = Pipeline {
                id: i as u64 + 1,
                status: PipelineStatus::Success,
                source: "push".into(),
                as_of_ms: None,
                passed_stages: Vec::new(),
            };
            refs.record_pipeline(&sha(*n), pipeline);
        }
        let lineage = PushOrder::new(&refs);
        gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &lineage, 0));
        (refs, gate)
    }

    /// A report about the latest delivery (generations only grow).
    fn report(n: u8, phase: Phase) -> StatusReport {
        StatusReport {
            revision: sha(n).to_string(),
            phase: phase.into(),
            message: "detail".into(),
            generation: 1_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_report_from_before_a_resync_does_not_end_the_wait() {
        let (refs, gate) = deployed(&[1]);
        let lineage = PushOrder::new(&refs);
        let desired = gate.desired.clone().unwrap();
        let stale = StatusReport {
            generation: desired.generation - 1,
            ..report(1, Phase::Failed)
        };
        assert_eq!(
            progress(&sha(1), &gate, Some(&stale), &lineage).state(),
            State::Waiting
        );
        let current = StatusReport {
            generation: desired.generation,
            ..report(1, Phase::Failed)
        };
        assert_eq!(
            progress(&sha(1), &gate, Some(&current), &lineage).state(),
            State::Failed
        );
    }

    #[test]
    fn the_exact_commit_healthy_ends_the_wait() {
        let (refs, gate) = deployed(&[1]);
        let lineage = PushOrder::new(&refs);
        let waiting = progress(&sha(1), &gate, None, &lineage);
        assert_eq!(waiting.state(), State::Waiting);
        assert!(
            waiting.message.starts_with("deploying"),
            "{}",
            waiting.message
        );
        assert_eq!(
            progress(&sha(1), &gate, Some(&report(1, Phase::Applying)), &lineage).state(),
            State::Applying
        );
        assert_eq!(
            progress(&sha(1), &gate, Some(&report(1, Phase::Healthy)), &lineage).state(),
            State::Healthy
        );
        assert_eq!(
            progress(&sha(1), &gate, Some(&report(1, Phase::Degraded)), &lineage).state(),
            State::Degraded
        );
    }

    #[test]
    fn a_descendant_deployed_instead_supersedes() {
        let (refs, gate) = deployed(&[1, 2]);
        let lineage = PushOrder::new(&refs);
        let before = progress(&sha(1), &gate, None, &lineage);
        assert_eq!(
            (before.state(), before.deployed_sha.as_str()),
            (State::Waiting, sha(2).as_str())
        );
        let after = progress(&sha(1), &gate, Some(&report(2, Phase::Healthy)), &lineage);
        assert_eq!(after.state(), State::Superseded);
        assert_eq!(
            progress(&sha(1), &gate, Some(&report(2, Phase::Failed)), &lineage).state(),
            State::Failed
        );
    }

    #[test]
    fn an_undecided_commit_waits_with_the_gates_reason() {
        let (mut refs, mut gate) = deployed(&[1]);
        refs.record_push(&Push {
            before: Before::Created,
            after: Some(sha(2)),
            at_ms: 0,
        });
        let running = Pipeline {
            id: 9,
            status: PipelineStatus::Running,
            source: "push".into(),
            as_of_ms: None,
            passed_stages: Vec::new(),
        };
        refs.record_pipeline(&sha(2), running);
        let lineage = PushOrder::new(&refs);
        gate.advance(&Context::new(Mode::Pipeline, &[], &refs, &lineage, 0));
        let state = progress(&sha(2), &gate, Some(&report(1, Phase::Healthy)), &lineage);
        assert_eq!(state.state(), State::Waiting);
        assert!(
            state.message.contains("pipeline 9 is running"),
            "{}",
            state.message
        );
    }
}
