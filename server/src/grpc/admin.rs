//! `greenlight.v1.AdminService`: what operators and control planes read and do.

use std::sync::Arc;

use greenlight::v1::{self, admin_service_server::AdminService};
use prost::Message;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, warn};

use super::streams::{Outbox, OutboxStream, Slot, StreamSettings, StreamSlots};
use super::{bearer, decision_to_proto, mode_to_proto, revision_to_proto, status_to_proto};
use crate::clock::now_ms;
use crate::config::{AgentSpec, TokenHash};
use crate::engine::{Engine, EngineError};
use crate::evaluate::Operation;

/// Watches (events and revisions) the admin token may hold open on one replica: a control
/// plane and its operators, not one per cluster.
const MAX_ADMIN_STREAMS: usize = 64;
/// Revision watches one agent's CI token may hold: one per concurrent `greenlightctl wait`.
const MAX_CI_STREAMS: usize = 16;
/// Bytes a revision watch may hold unread: its states are small.
const REVISION_WATCH_BYTES: usize = 256 * 1024;
/// Events an event watch may hold unread, and their bytes. Each watch decodes its own copy
/// of every report (up to hundreds of KB once cut), and the admin token may hold 64 watches:
/// 1 MiB each keeps the token's worst case near 64 × (1 MiB + one report).
const EVENT_WATCH_BUFFER: usize = 64;
const EVENT_WATCH_BYTES: usize = 1024 * 1024;
use crate::catalog::Catalog;
use crate::gate::{AgentGate, Decision, Lineage, Outcome, PushOrder, Sha};
use crate::progress::is_final;
use crate::store::{Broadcast, RefKey};

/// How often a revision watch re-reads state even without events (missed announcements).
const REVISION_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `message` is about `agent`.
fn concerns(message: &Broadcast, agent: &str) -> bool {
    match message {
        Broadcast::AgentsChanged(changes) => changes.concerns(agent),
        Broadcast::Report { agent: a, .. } | Broadcast::Connection { agent: a, .. } => a == agent,
        // The agent's own state changes when the gate acts on a fact.
        Broadcast::Fact { .. } => false,
        Broadcast::Registry { .. } => false,
    }
}

/// What a CI token may do, for the refusal message.
const CI_SCOPE: &str =
    "a CI token may only trigger, read the status and previews of and wait for its own agent";

/// Who is calling.
enum Caller {
    Admin,
    /// A CI job of this agent.
    Ci(String),
}

/// Reports returned by `GetAgentHistory`.
const HISTORY_LIMIT: usize = 50;

/// Serves operators.
pub struct AdminApi {
    engine: Arc<Engine>,
    previews: Arc<crate::preview::Previews>,
    token: Option<TokenHash>,
    shutdown: CancellationToken,
    streams: StreamSlots,
    settings: StreamSettings,
}

impl AdminApi {
    /// Requests must carry a bearer token hashing to `token`. Watches end when their reader
    /// reads nothing for `stall`.
    pub fn new(
        engine: Arc<Engine>,
        previews: Arc<crate::preview::Previews>,
        token: Option<TokenHash>,
        shutdown: CancellationToken,
        stall: std::time::Duration,
    ) -> Self {
        let settings = StreamSettings {
            stall,
            buffer: engine.metrics().stream_buffer(),
        };
        Self {
            engine,
            previews,
            token,
            shutdown,
            streams: StreamSlots::default(),
            settings,
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let token = bearer(request).ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
        })?;
        if self
            .token
            .as_ref()
            .is_some_and(|admin| admin.matches(token))
        {
            return Ok(Caller::Admin);
        }
        match self.engine.catalog().agent_by_ci_token(token) {
            Some(agent) => Ok(Caller::Ci(agent.name.clone())),
            None => Err(Status::unauthenticated("invalid admin or CI token")),
        }
    }

    /// Admits only the admin token.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match self.caller(request)? {
            Caller::Admin => Ok(()),
            Caller::Ci(_) => Err(Status::permission_denied(CI_SCOPE)),
        }
    }

    /// Admits the admin token, and the CI token of `agent`.
    fn authorize_for<T>(&self, request: &Request<T>, agent: &str) -> Result<(), Status> {
        match self.caller(request)? {
            Caller::Admin => Ok(()),
            Caller::Ci(own) if own == agent => Ok(()),
            Caller::Ci(_) => Err(Status::permission_denied(CI_SCOPE)),
        }
    }

    /// A slot for one more long-lived stream of the request's caller.
    fn stream_slot<T>(&self, request: &Request<T>, what: &str) -> Result<Slot, Status> {
        match self.caller(request)? {
            Caller::Admin => self
                .streams
                .acquire("the admin token", MAX_ADMIN_STREAMS, what),
            Caller::Ci(agent) => self.streams.acquire(
                &format!("the CI token of agent {agent}"),
                MAX_CI_STREAMS,
                what,
            ),
        }
    }

    fn spec(&self, name: &str) -> Result<Arc<AgentSpec>, Status> {
        self.engine
            .catalog()
            .agent_arc(name)
            .ok_or_else(|| Status::not_found(format!("no agent named {name:?} is configured")))
    }

    async fn status(&self, name: &str) -> Result<v1::AgentStatus, Status> {
        let gate = self.engine.gate_of(name).await?;
        self.status_with(name, &gate).await
    }

    /// The status of `name`, whose gate state was read already.
    async fn status_with(&self, name: &str, gate: &AgentGate) -> Result<v1::AgentStatus, Status> {
        let mut status = Self::read_status(&self.engine, name, gate).await?;
        // Only admin and this agent's CI token get here, who may see its badge.
        status.badge_path = self.engine.catalog().badge_path(name).unwrap_or_default();
        Ok(status)
    }

    /// What `GetAgent` answers about `name`, whose gate state was read already, except the
    /// badge path: the status page shows the same and must not show that key. Associated
    /// rather than free so that the page reaches it.
    pub(crate) async fn read_status(
        engine: &Engine,
        name: &str,
        gate: &AgentGate,
    ) -> Result<v1::AgentStatus, EngineError> {
        let spec = engine
            .catalog()
            .agent_arc(name)
            .ok_or_else(|| EngineError::UnknownAgent(name.to_owned()))?;
        let replica = engine.presence(name);
        let last_report = engine.last_report(name).await?;
        let applied_revision = last_report
            .as_ref()
            .filter(|r| {
                matches!(
                    r.phase(),
                    v1::Phase::Applied | v1::Phase::Healthy | v1::Phase::Degraded
                )
            })
            .map(|r| r.revision.clone())
            .unwrap_or_default();
        Ok(v1::AgentStatus {
            name: spec.name.clone(),
            project: spec.project.clone(),
            r#ref: spec.branch.clone(),
            mode: mode_to_proto(spec.mode).into(),
            connected: replica.is_some(),
            replica: replica.unwrap_or_default(),
            desired: gate.desired.as_ref().map(revision_to_proto),
            applied_revision,
            last_report,
            paused: gate.paused.as_ref().map(|h| v1::Hold {
                reason: h.reason.clone(),
                since_unix_ms: h.since_ms,
                sha: String::new(),
            }),
            pinned: gate.pinned.as_ref().map(|p| v1::Hold {
                reason: p.reason.clone(),
                since_unix_ms: p.since_ms,
                sha: p.sha.to_string(),
            }),
            last_decision: gate.decisions.back().map(decision_to_proto),
            sync_error: engine
                .sync_error(name)
                .await?
                .map(|error| error.message().to_owned())
                .unwrap_or_default(),
            badge_path: String::new(),
            runtime: engine.catalog().is_runtime(name),
        })
    }

    /// What `GetAgentHistory` answers about `name`, whose gate state was read already: its
    /// newest reports and its gate's decisions, newest first. Shared with the status page.
    pub(crate) async fn read_history(
        engine: &Engine,
        name: &str,
        gate: &AgentGate,
    ) -> Result<v1::GetAgentHistoryResponse, EngineError> {
        let reports = engine.reports(name, HISTORY_LIMIT).await?;
        let decisions = gate.decisions.iter().rev().map(decision_to_proto).collect();
        Ok(v1::GetAgentHistoryResponse { reports, decisions })
    }

    async fn operate(
        &self,
        name: &str,
        operation: Operation,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.spec(name)?;
        self.engine
            .evaluator()
            .operate(name, operation)
            .await
            .map_err(EngineError::from)?;
        Ok(Response::new(self.status(name).await?))
    }
}

fn parse_sha(field: &str, value: &str) -> Result<Sha, Status> {
    Sha::parse(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn require_reason(reason: &str) -> Result<String, Status> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(Status::invalid_argument(
            "reason is required: say why, for the record",
        ));
    }
    Ok(reason.to_owned())
}

fn event_to_proto(message: &Broadcast, catalog: &Catalog) -> Vec<v1::Event> {
    use v1::event::Event;
    let at = now_ms();
    match message {
        Broadcast::AgentsChanged(changes) => changes
            .iter()
            .flat_map(|(written, change)| {
                change.decisions.iter().map(|decision| v1::Event {
                    agent: written.agent.clone(),
                    at_unix_ms: decision.at_ms,
                    event: Some(Event::Decision(decision_to_proto(decision))),
                })
            })
            .collect(),
        // A refused claim changes no agent's state; its watchers hear of it all the same.
        Broadcast::Fact {
            key,
            rejected: Some(rejected),
            ..
        } => {
            let decision = Decision {
                outcome: Outcome::Skip,
                sha: Some(rejected.sha.clone()),
                pipeline_id: Some(rejected.pipeline_id),
                reason: format!(
                    "pipeline {} rejected: {}",
                    rejected.pipeline_id, rejected.reason
                ),
                at_ms: rejected.at_ms,
                superseded_by: None,
            };
            catalog
                .watchers(key)
                .iter()
                .map(|agent| v1::Event {
                    agent: agent.clone(),
                    at_unix_ms: rejected.at_ms,
                    event: Some(Event::Decision(decision_to_proto(&decision))),
                })
                .collect()
        }
        Broadcast::Fact { .. } | Broadcast::Registry { .. } => Vec::new(),
        Broadcast::Report { agent, report, .. } => v1::StatusReport::decode(report.as_slice())
            .map(|report| v1::Event {
                agent: agent.clone(),
                at_unix_ms: at,
                event: Some(Event::Report(report)),
            })
            .into_iter()
            .collect(),
        Broadcast::Connection {
            agent,
            connected,
            replica,
        } => vec![v1::Event {
            agent: agent.clone(),
            at_unix_ms: at,
            event: Some(Event::Connection(v1::Connection {
                connected: *connected,
                replica: replica.clone(),
            })),
        }],
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    type WatchEventsStream = OutboxStream<v1::Event>;
    type WatchRevisionStream = OutboxStream<v1::RevisionState>;

    async fn watch_revision(
        &self,
        request: Request<v1::WatchRevisionRequest>,
    ) -> Result<Response<Self::WatchRevisionStream>, Status> {
        self.authorize_for(&request, &request.get_ref().name)?;
        let slot = self.stream_slot(&request, "revision watches")?;
        let request = request.into_inner();
        self.spec(&request.name)?;
        let sha = parse_sha("sha", &request.sha)?;
        if !sha.is_full() {
            return Err(Status::invalid_argument(
                "sha must be the full commit SHA (in GitLab CI: $CI_COMMIT_SHA)",
            ));
        }
        // Subscribed before the first read, so nothing between them is missed.
        let mut events = self.engine.events();
        let first = self.engine.revision_progress(&request.name, &sha).await?;
        let (mut tx, rx) = Outbox::new(16, REVISION_WATCH_BYTES, &self.settings);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("watch_revision");
        tokio::spawn(
            async move {
                let mut last = first;
                if !tx.send(last.clone()).await || is_final(last.state()) {
                    return;
                }
                let mut tick = tokio::time::interval(REVISION_POLL);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        _ = tick.tick() => {}
                        event = events.recv() => match event {
                            Ok(message) if !concerns(&message, &request.name) => continue,
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                    let state = match engine.revision_progress(&request.name, &sha).await {
                        Ok(state) => state,
                        Err(error) => {
                            warn!(%error, "cannot read revision progress; retrying");
                            continue;
                        }
                    };
                    if state != last {
                        if !tx.send(state.clone()).await || is_final(state.state()) {
                            return;
                        }
                        last = state;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(rx.holding(slot)))
    }

    async fn create_agent(
        &self,
        request: Request<v1::CreateAgentRequest>,
    ) -> Result<Response<v1::CreateAgentResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let definition = super::registry::definition(request.agent)?;
        let created = self
            .engine
            .create_agent(definition, request.ci_token)
            .await?;
        Ok(Response::new(v1::CreateAgentResponse {
            agent: Some(self.status(&created.spec.name).await?),
            token: created.token,
            ci_token: created.ci_token.unwrap_or_default(),
        }))
    }

    async fn update_agent(
        &self,
        request: Request<v1::UpdateAgentRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize(&request)?;
        let definition = super::registry::definition(request.into_inner().agent)?;
        let spec = self.engine.update_agent(definition).await?;
        Ok(Response::new(self.status(&spec.name).await?))
    }

    async fn delete_agent(
        &self,
        request: Request<v1::DeleteAgentRequest>,
    ) -> Result<Response<v1::DeleteAgentResponse>, Status> {
        self.authorize(&request)?;
        self.engine.delete_agent(&request.get_ref().name).await?;
        Ok(Response::new(v1::DeleteAgentResponse {}))
    }

    async fn rotate_agent_token(
        &self,
        request: Request<v1::RotateAgentTokenRequest>,
    ) -> Result<Response<v1::RotateAgentTokenResponse>, Status> {
        self.authorize(&request)?;
        let rotated = super::registry::rotate(&self.engine, request.into_inner()).await?;
        Ok(Response::new(rotated))
    }

    async fn list_agents(
        &self,
        request: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        self.authorize(&request)?;
        let names: Vec<String> = self
            .engine
            .catalog()
            .agents()
            .map(|a| a.name.clone())
            .collect();
        let states = self
            .engine
            .store()
            .agents(&names)
            .await
            .map_err(EngineError::from)?;
        let mut agents = Vec::with_capacity(names.len());
        for (name, state) in names.iter().zip(states) {
            agents.push(self.status_with(name, &state.value.gate).await?);
        }
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(v1::ListAgentsResponse { agents }))
    }

    async fn get_agent(
        &self,
        request: Request<v1::GetAgentRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize_for(&request, &request.get_ref().name)?;
        Ok(Response::new(self.status(&request.get_ref().name).await?))
    }

    async fn get_agent_history(
        &self,
        request: Request<v1::GetAgentHistoryRequest>,
    ) -> Result<Response<v1::GetAgentHistoryResponse>, Status> {
        self.authorize(&request)?;
        let name = &request.get_ref().name;
        self.spec(name)?;
        let gate = self.engine.gate_of(name).await?;
        Ok(Response::new(
            Self::read_history(&self.engine, name, &gate).await?,
        ))
    }

    async fn get_preview(
        &self,
        request: Request<v1::GetPreviewRequest>,
    ) -> Result<Response<v1::Preview>, Status> {
        let name = request.get_ref().name.clone();
        self.authorize_for(&request, &name)?;
        self.spec(&name)?;
        let sha = request.into_inner().sha.filter(|s| !s.is_empty());
        let found = self
            .previews
            .get(&name, sha.as_deref())
            .await
            .map_err(|e| Status::unavailable(format!("cannot read previews: {e}")))?;
        found.map(Response::new).ok_or_else(|| {
            Status::not_found(match sha {
                Some(sha) => format!("agent {name} has no preview of {sha}"),
                None => format!("agent {name} has no preview yet"),
            })
        })
    }

    async fn get_ref(
        &self,
        request: Request<v1::GetRefRequest>,
    ) -> Result<Response<v1::RefStatus>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let branch = request
            .r#ref
            .strip_prefix("refs/heads/")
            .unwrap_or(&request.r#ref)
            .to_owned();
        let key = RefKey {
            project: request.project.clone(),
            branch: branch.clone(),
        };
        if self.engine.catalog().watchers(&key).is_empty() {
            return Err(Status::not_found(format!("no agent watches {key}")));
        }
        let (refs, git) = self.engine.facts_with_lineage(&key).await?;
        let push_order = PushOrder::new(&refs);
        let lineage: &dyn Lineage = match &git {
            Some(git) => git,
            None => &push_order,
        };
        // A commit the mirror has not fetched yet is not known to be off the branch.
        let on_branch = |sha: &Sha| {
            if lineage.knows(sha) {
                lineage.on_branch(sha)
            } else {
                push_order.on_branch(sha)
            }
        };
        // The current line as the gate walks it, then older lines' heads, newest first.
        let current = refs.newest_first(lineage);
        let older = refs
            .heads
            .iter()
            .rev()
            .filter(|head| refs.deleted || head.line != refs.line);
        let commits = current
            .iter()
            .copied()
            .chain(older)
            .map(|head| v1::CommitInfo {
                sha: head.sha.to_string(),
                seq: head.seq,
                pushed_at_unix_ms: head.pushed_at_ms,
                pipelines: refs
                    .pipelines
                    .get(&head.sha)
                    .into_iter()
                    .flatten()
                    .rev()
                    .map(|p| v1::PipelineInfo {
                        id: p.id,
                        status: status_to_proto(p.status).into(),
                        source: p.source.clone(),
                    })
                    .collect(),
                on_branch: on_branch(&head.sha),
            })
            .collect();
        Ok(Response::new(v1::RefStatus {
            project: key.project,
            r#ref: branch,
            commits,
            head: current
                .first()
                .map(|h| h.sha.to_string())
                .unwrap_or_default(),
            rejected: refs
                .rejected
                .iter()
                .rev()
                .map(|r| v1::RejectedFact {
                    sha: r.sha.to_string(),
                    pipeline_id: r.pipeline_id,
                    reason: r.reason.clone(),
                    at_unix_ms: r.at_ms,
                })
                .collect(),
        }))
    }

    async fn trigger_sync(
        &self,
        request: Request<v1::TriggerSyncRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize_for(&request, &request.get_ref().name)?;
        // Overriding the prune limit is an operator's decision: a CI job that could grant it
        // would make the limit no protection against a broken merge it deploys.
        if request.get_ref().force_prune && !matches!(self.caller(&request)?, Caller::Admin) {
            return Err(Status::permission_denied(
                "force_prune needs the admin token; a CI token may only trigger",
            ));
        }
        let request = request.into_inner();
        let sha = request
            .sha
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| parse_sha("sha", s))
            .transpose()?;
        let force_prune = request.force_prune;
        self.operate(&request.name, Operation::Trigger { sha, force_prune })
            .await
    }

    async fn pause_sync(
        &self,
        request: Request<v1::PauseSyncRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let reason = require_reason(&request.reason)?;
        self.operate(&request.name, Operation::Pause { reason })
            .await
    }

    async fn resume_sync(
        &self,
        request: Request<v1::ResumeSyncRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize(&request)?;
        self.operate(&request.get_ref().name, Operation::Resume)
            .await
    }

    async fn pin_revision(
        &self,
        request: Request<v1::PinRevisionRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let sha = parse_sha("sha", &request.sha)?;
        let reason = require_reason(&request.reason)?;
        self.operate(&request.name, Operation::Pin { sha, reason })
            .await
    }

    async fn unpin_revision(
        &self,
        request: Request<v1::UnpinRevisionRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.authorize(&request)?;
        self.operate(&request.get_ref().name, Operation::Unpin)
            .await
    }

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.authorize(&request)?;
        let slot = self.stream_slot(&request, "event watches")?;
        let only = request.into_inner().agent;
        if !only.is_empty() {
            self.spec(&only)?;
        }
        let mut events = self.engine.events();
        let buffer = self.settings.buffer.clone();
        let (mut tx, rx) = Outbox::new(EVENT_WATCH_BUFFER, EVENT_WATCH_BYTES, &self.settings);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("watch_events");
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    message = events.recv() => message,
                };
                match message {
                    Ok(message) => {
                        for event in event_to_proto(&message, &engine.catalog()) {
                            if (only.is_empty() || event.agent == only) && !tx.send(event).await {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "event watcher too slow; events dropped");
                        buffer.closed("behind");
                        let status = Status::data_loss(format!(
                            "{missed} events were dropped because the watcher fell behind; re-read state and watch again"
                        ));
                        tx.finish(status);
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }.instrument(span));
        Ok(Response::new(rx.holding(slot)))
    }
}
