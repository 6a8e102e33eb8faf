//! Previews on merge requests: a merge request into a branch an agent with `preview: true`
//! watches asks that agent what its head would change in the cluster; the answer becomes
//! one note on the merge request (posted once, then edited in place) and a commit status
//! `greenlight/<agent>/preview` on the head.
//!
//! The request reaches the replica holding the agent's Sync stream through the store's
//! announcements ([`store`]); the agent answers with `ReportPreview` on any replica. The note
//! is rendered in [`note`], which does no I/O. Previews never touch the gate: they are not
//! facts, and nothing here waits on or delays a deploy.

pub mod note;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use greenlight::backoff::Backoff;
use greenlight::preview::{MAX_FIELDS, MAX_OBJECTS};
use greenlight::v1::Preview;
use greenlight::v1::preview::Outcome;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::catalog::LiveCatalog;
use crate::clock::now_ms;
use crate::config::AgentSpec;
use crate::gitlab::{CommitStatus, GitLab};
pub use store::{Announcement, PreviewRequest, PreviewStore, PreviewStoreError};

/// A request older than this is dropped unanswered: its merge request has moved on or the
/// agent is away; the next push asks again.
const REQUEST_LIFETIME_MS: i64 = 3600 * 1000;
/// Agents asked for a preview at once by one merge request hook.
const CONCURRENT_ASKS: usize = 16;
/// Attempts at posting one note or status.
const PUBLISH_ATTEMPTS: u32 = 4;

/// The most characters per text a stored preview keeps: an agent of another version may send
/// more than this one would (objects and fields are bounded by the shared limits).
const MAX_TEXT: usize = 1024;

/// Cuts `preview` down to what is stored and shown.
pub fn bound(preview: &mut Preview) {
    let cut = |text: &mut String| {
        if text.len() > MAX_TEXT {
            *text = crate::gitlab::truncate(text, MAX_TEXT);
        }
    };
    if preview.objects.len() > MAX_OBJECTS {
        preview.objects.truncate(MAX_OBJECTS);
        preview.truncated = true;
    }
    cut(&mut preview.reason);
    for object in &mut preview.objects {
        cut(&mut object.message);
        if object.fields.len() > MAX_FIELDS {
            object.fields.truncate(MAX_FIELDS);
            preview.truncated = true;
        }
        for field in &mut object.fields {
            cut(&mut field.path);
            for value in [&mut field.before, &mut field.after].into_iter().flatten() {
                cut(value);
            }
        }
    }
}

/// A merge request's head, as a webhook announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewTrigger {
    pub project_path: Option<String>,
    pub project_id: Option<u64>,
    /// The branch it would merge into.
    pub target_branch: String,
    pub merge_request_iid: u64,
    /// Full SHA of its head commit.
    pub sha: String,
}

/// The requests of one agent this replica knows are unanswered: one per merge request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    pub requests: BTreeMap<(String, u64), PreviewRequest>,
}

/// The preview service of one replica.
pub struct Previews {
    catalog: Arc<LiveCatalog>,
    store: Arc<dyn PreviewStore>,
    gitlab: Option<GitLab>,
    /// Base of the links to full previews (`gitlab.status_target_url`).
    link_base: Option<String>,
    pending: Mutex<HashMap<String, watch::Sender<Pending>>>,
    tasks: TaskTracker,
    /// One note write at a time on this replica, so that two results for one merge request
    /// cannot both post a new note.
    notes: tokio::sync::Mutex<()>,
    /// Subscribed at creation, so that nothing announced before [`Previews::run`] starts
    /// is missed.
    announcements: Mutex<Option<tokio::sync::broadcast::Receiver<Announcement>>>,
}

impl Previews {
    /// The service over `store`; notes and statuses go to `gitlab` when configured.
    pub fn new(
        catalog: Arc<LiveCatalog>,
        store: Arc<dyn PreviewStore>,
        gitlab: Option<GitLab>,
        link_base: Option<String>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            announcements: Mutex::new(Some(store.announcements())),
            catalog,
            store,
            gitlab,
            link_base,
            pending: Mutex::new(HashMap::new()),
            tasks,
            notes: tokio::sync::Mutex::new(()),
        })
    }

    /// Keeps this replica's pending requests up to date from the announcements until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let taken = self
            .announcements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut announcements = taken.unwrap_or_else(|| self.store.announcements());
        loop {
            let announcement = tokio::select! {
                _ = shutdown.cancelled() => return,
                received = announcements.recv() => match received {
                    Ok(announcement) => announcement,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "missed preview announcements; the next push asks again");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            self.apply(announcement);
        }
    }

    fn sender(&self, agent: &str) -> watch::Sender<Pending> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .entry(agent.to_owned())
            .or_insert_with(|| watch::channel(Pending::default()).0)
            .clone()
    }

    fn apply(&self, announcement: Announcement) {
        let now = now_ms();
        match announcement {
            Announcement::Requested(request) => {
                if now - request.at_ms > REQUEST_LIFETIME_MS {
                    return;
                }
                self.sender(&request.agent).send_modify(|pending| {
                    pending
                        .requests
                        .retain(|_, r| now - r.at_ms <= REQUEST_LIFETIME_MS);
                    let key = (request.project.clone(), request.merge_request_iid);
                    pending.requests.insert(key, request);
                });
            }
            Announcement::Answered { agent, id } => {
                self.sender(&agent).send_if_modified(|pending| {
                    let before = pending.requests.len();
                    pending.requests.retain(|_, r| r.id != id);
                    pending.requests.len() != before
                });
            }
        }
    }

    /// The unanswered requests of `agent`, as they change.
    pub fn watch(&self, agent: &str) -> watch::Receiver<Pending> {
        self.sender(agent).subscribe()
    }

    /// Asks every agent with previews that watches the target branch for a preview of the
    /// head; returns the agents asked (none when each had been asked for this head).
    pub async fn request(
        &self,
        trigger: &PreviewTrigger,
    ) -> Result<Vec<String>, PreviewStoreError> {
        // One snapshot for the whole request: runtime agents may change meanwhile.
        let catalog = self.catalog.load();
        let refs = catalog.refs_for(
            trigger.project_path.as_deref(),
            trigger.project_id,
            &trigger.target_branch,
        );
        let previewing: Vec<_> = refs
            .iter()
            .flat_map(|key| catalog.watchers(key))
            .filter_map(|name| catalog.agent_arc(name).filter(|agent| agent.preview))
            .collect();
        // The hook waits for every agent to be asked: each costs store round trips, so they
        // overlap, a few at a time, rather than adding up.
        let asked: Vec<Option<String>> = futures_util::stream::iter(previewing)
            .map(|agent| async move { self.ask(&agent, trigger).await })
            .buffered(CONCURRENT_ASKS)
            .try_collect()
            .await?;
        Ok(asked.into_iter().flatten().collect())
    }

    /// Asks `agent` for a preview of `trigger`'s head: its name, or `None` when it had been
    /// asked for this head already.
    async fn ask(
        &self,
        agent: &AgentSpec,
        trigger: &PreviewTrigger,
    ) -> Result<Option<String>, PreviewStoreError> {
        let at_ms = now_ms();
        let request = PreviewRequest {
            id: format!(
                "{}-{}-{}-{at_ms}",
                agent.name, trigger.merge_request_iid, trigger.sha
            ),
            agent: agent.name.clone(),
            project: agent.project.clone(),
            merge_request_iid: trigger.merge_request_iid,
            sha: trigger.sha.clone(),
            at_ms,
        };
        if !self.store.request(&request).await? {
            return Ok(None);
        }
        self.store
            .announce(&Announcement::Requested(request.clone()))
            .await?;
        info!(
            agent = agent.name,
            mr = trigger.merge_request_iid,
            sha = trigger.sha,
            "preview requested"
        );
        if let Some(gitlab) = self.gitlab.clone() {
            let status = CommitStatus {
                state: "pending",
                name: note::context(&agent.name),
                description: "preview requested".into(),
                target_url: None,
                pipeline_id: None,
                git_ref: None,
            };
            let (project, sha) = (agent.project.clone(), trigger.sha.clone());
            self.tasks.spawn(
                async move { post_status(&gitlab, &project, &sha, &status).await }
                    .instrument(info_span!("preview_status")),
            );
        }
        Ok(Some(agent.name.clone()))
    }

    /// Records `preview` (the agent's answer, or the server's when it cannot send the
    /// head), and publishes it unless a newer head of its merge request was asked for since.
    pub async fn answered(self: &Arc<Self>, preview: Preview) -> Result<(), PreviewStoreError> {
        self.store.save(&preview).await?;
        self.store
            .announce(&Announcement::Answered {
                agent: preview.agent.clone(),
                id: preview.id.clone(),
            })
            .await?;
        let newest = self
            .store
            .requested(&preview.agent, &preview.project, preview.merge_request_iid)
            .await?;
        if newest.as_deref().is_some_and(|sha| sha != preview.sha) {
            info!(
                agent = preview.agent,
                sha = preview.sha,
                "preview superseded by a newer head; not published"
            );
            return Ok(());
        }
        if self.gitlab.is_some() {
            let this = self.clone();
            self.tasks.spawn(
                async move { this.publish(&preview).await }.instrument(info_span!("preview_note")),
            );
        }
        Ok(())
    }

    /// Records that `request` could not be sent to its agent (its commit cannot be read).
    pub async fn unavailable(self: &Arc<Self>, request: &PreviewRequest, reason: String) {
        let preview = Preview {
            id: request.id.clone(),
            agent: request.agent.clone(),
            sha: request.sha.clone(),
            project: request.project.clone(),
            merge_request_iid: request.merge_request_iid,
            outcome: Outcome::Error.into(),
            reason,
            received_at_unix_ms: now_ms(),
            ..Preview::default()
        };
        if let Err(error) = self.answered(preview).await {
            warn!(%error, "cannot record a preview that could not be made");
        }
    }

    /// Posts or edits the note, and posts the commit status.
    async fn publish(&self, preview: &Preview) {
        let Some(gitlab) = &self.gitlab else {
            return;
        };
        let link = note::full_preview(self.link_base.as_deref(), &preview.agent, &preview.sha);
        let body = note::render(preview, &link);
        {
            let _one = self.notes.lock().await;
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
            // A note posted by an attempt whose id the store then failed to keep: the next
            // attempt edits it and keeps its id again, rather than posting a second note.
            let mut posted = None;
            for attempt in 1..=PUBLISH_ATTEMPTS {
                match self.write_note(gitlab, preview, &body, &mut posted).await {
                    Ok(()) => break,
                    Err(error) if attempt < PUBLISH_ATTEMPTS => {
                        warn!(%error, "cannot write the preview note; retrying");
                        tokio::time::sleep(backoff.delay()).await;
                    }
                    Err(error) => warn!(%error, "cannot write the preview note; giving up"),
                }
            }
        }
        let (state, description) = note::status(preview);
        let status = CommitStatus {
            state,
            name: note::context(&preview.agent),
            description,
            target_url: self
                .link_base
                .as_ref()
                .map(|_| link.trim_matches('`').to_owned()),
            pipeline_id: None,
            git_ref: None,
        };
        post_status(gitlab, &preview.project, &preview.sha, &status).await;
    }

    async fn write_note(
        &self,
        gitlab: &GitLab,
        preview: &Preview,
        body: &str,
        posted: &mut Option<u64>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (agent, project, iid) = (&preview.agent, &preview.project, preview.merge_request_iid);
        let known = match *posted {
            Some(id) => Some(id),
            None => self.store.note(agent, project, iid).await?,
        };
        if let Some(id) = known
            && gitlab.edit_note(project, iid, id, body).await?
        {
            if posted.is_some() {
                self.store.set_note(agent, project, iid, id).await?;
            }
            return Ok(());
        }
        let id = gitlab.post_note(project, iid, body).await?;
        *posted = Some(id);
        self.store.set_note(agent, project, iid, id).await?;
        Ok(())
    }

    /// The preview of `sha` by `agent`, or its newest.
    pub async fn get(
        &self,
        agent: &str,
        sha: Option<&str>,
    ) -> Result<Option<Preview>, PreviewStoreError> {
        self.store.load(agent, sha).await
    }

    /// The newest `limit` previews of `agent`, newest first.
    pub async fn latest(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<Preview>, PreviewStoreError> {
        self.store.latest(agent, limit).await
    }
}

async fn post_status(gitlab: &GitLab, project: &str, sha: &str, status: &CommitStatus) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match gitlab.post_status(project, sha, status).await {
            Ok(()) => return,
            Err(error) if error.retryable() && attempt < PUBLISH_ATTEMPTS => {
                warn!(%error, "cannot post the preview status; retrying");
                tokio::time::sleep(backoff.delay()).await;
            }
            Err(error) => {
                warn!(%error, "cannot post the preview status");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};
    use store::MemoryPreviews;

    fn previews() -> Arc<Previews> {
        let hash = |n: u8| hex::encode([n; 32]);
        let yaml = format!(
            "agents:\n  - {{name: prod, token_sha256: {}, project: g/app, ref: main, preview: true}}\n  - {{name: staging, token_sha256: {}, project: g/app, ref: main}}\n  - {{name: other, token_sha256: {}, project: g/app, ref: next, preview: true}}\n",
            hash(1),
            hash(2),
            hash(3)
        );
        let agents = Config::from_yaml(&yaml, &Overrides::default())
            .unwrap()
            .agents;
        Previews::new(
            Arc::new(crate::catalog::LiveCatalog::new(
                crate::catalog::Catalog::new(&agents, None),
            )),
            Arc::new(MemoryPreviews::default()),
            None,
            None,
            TaskTracker::new(),
        )
    }

    fn trigger(sha: &str) -> PreviewTrigger {
        PreviewTrigger {
            project_path: Some("g/app".into()),
            project_id: None,
            target_branch: "main".into(),
            merge_request_iid: 3,
            sha: sha.into(),
        }
    }

    #[tokio::test]
    async fn only_agents_with_previews_on_the_target_branch_are_asked_and_an_answer_clears_it() {
        let previews = previews();
        let shutdown = CancellationToken::new();
        tokio::spawn(previews.clone().run(shutdown.clone()));
        let mut prod = previews.watch("prod");
        let head = "a".repeat(40);
        assert_eq!(previews.request(&trigger(&head)).await.unwrap(), ["prod"]);
        assert!(
            previews.request(&trigger(&head)).await.unwrap().is_empty(),
            "the same head asks nothing"
        );
        prod.changed().await.unwrap();
        let request = {
            let pending = prod.borrow_and_update();
            assert_eq!(pending.requests.len(), 1);
            pending.requests.values().next().unwrap().clone()
        };
        assert_eq!(
            (request.sha.as_str(), request.merge_request_iid),
            (head.as_str(), 3)
        );
        // A newer head of the same merge request replaces it.
        let newer = "b".repeat(40);
        previews.request(&trigger(&newer)).await.unwrap();
        prod.changed().await.unwrap();
        let newest = prod
            .borrow_and_update()
            .requests
            .values()
            .next()
            .unwrap()
            .clone();
        assert_eq!(newest.sha, newer);
        previews
            .answered(Preview {
                id: newest.id.clone(),
                agent: "prod".into(),
                project: "g/app".into(),
                sha: newer.clone(),
                merge_request_iid: 3,
                ..Preview::default()
            })
            .await
            .unwrap();
        prod.changed().await.unwrap();
        assert!(prod.borrow().requests.is_empty(), "answered");
        assert_eq!(
            previews.get("prod", None).await.unwrap().unwrap().sha,
            newer
        );
        assert!(previews.watch("staging").borrow().requests.is_empty());
        shutdown.cancel();
    }

    /// Previews kept in memory, except that keeping a note id fails `failures` times.
    struct NoteIdsFail {
        inner: MemoryPreviews,
        failures: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl PreviewStore for NoteIdsFail {
        async fn request(&self, request: &PreviewRequest) -> Result<bool, PreviewStoreError> {
            self.inner.request(request).await
        }
        async fn requested(
            &self,
            agent: &str,
            project: &str,
            iid: u64,
        ) -> Result<Option<String>, PreviewStoreError> {
            self.inner.requested(agent, project, iid).await
        }
        async fn announce(&self, announcement: &Announcement) -> Result<(), PreviewStoreError> {
            self.inner.announce(announcement).await
        }
        fn announcements(&self) -> tokio::sync::broadcast::Receiver<Announcement> {
            self.inner.announcements()
        }
        async fn save(&self, preview: &Preview) -> Result<(), PreviewStoreError> {
            self.inner.save(preview).await
        }
        async fn load(
            &self,
            agent: &str,
            sha: Option<&str>,
        ) -> Result<Option<Preview>, PreviewStoreError> {
            self.inner.load(agent, sha).await
        }
        async fn latest(
            &self,
            agent: &str,
            limit: usize,
        ) -> Result<Vec<Preview>, PreviewStoreError> {
            self.inner.latest(agent, limit).await
        }
        async fn note(
            &self,
            agent: &str,
            project: &str,
            iid: u64,
        ) -> Result<Option<u64>, PreviewStoreError> {
            self.inner.note(agent, project, iid).await
        }
        async fn set_note(
            &self,
            agent: &str,
            project: &str,
            iid: u64,
            note: u64,
        ) -> Result<(), PreviewStoreError> {
            let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                self.failures
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                return Err(PreviewStoreError::File("the disk is full".into()));
            }
            self.inner.set_note(agent, project, iid, note).await
        }
    }

    /// A GitLab that answers note posts with ids 101, 102, …, edits of notes it never
    /// posted with 404, and everything else with 200; returns its URL and the bodies of the
    /// notes posted.
    async fn gitlab_counting_notes() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::extract::Request;
        use axum::http::{Method, StatusCode};
        let posted = Arc::new(Mutex::new(Vec::new()));
        let seen = posted.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let posted = seen.clone();
            async move {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let body = axum::body::to_bytes(request.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let mut posted = posted.lock().unwrap();
                if method == Method::POST && path.ends_with("/notes") {
                    posted.push(String::from_utf8_lossy(&body).into_owned());
                    return (
                        StatusCode::OK,
                        format!("{{\"id\": {}}}", 100 + posted.len()),
                    );
                }
                let edited = path
                    .rsplit_once("/notes/")
                    .and_then(|(_, id)| id.parse::<usize>().ok());
                match edited {
                    Some(id)
                        if method == Method::PUT && !(101..=100 + posted.len()).contains(&id) =>
                    {
                        (StatusCode::NOT_FOUND, "{}".to_owned())
                    }
                    _ => (StatusCode::OK, "{}".to_owned()),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, posted)
    }

    /// The previews of `store`, publishing to the GitLab at `url`, and a preview by `prod`
    /// of merge request 3 of `g/app` to publish.
    fn publishing(url: &str, store: Arc<dyn PreviewStore>) -> (Arc<Previews>, Preview) {
        let gitlab = GitLab::new(url, crate::config::Secret::new("token")).unwrap();
        let catalog = previews().catalog.clone();
        let previews = Previews::new(catalog, store, Some(gitlab), None, TaskTracker::new());
        let preview = Preview {
            agent: "prod".into(),
            project: "g/app".into(),
            sha: "a".repeat(40),
            merge_request_iid: 3,
            ..Preview::default()
        };
        (previews, preview)
    }

    #[tokio::test]
    async fn a_note_whose_id_could_not_be_kept_is_edited_on_retry_not_posted_twice() {
        let (url, posted) = gitlab_counting_notes().await;
        let store = Arc::new(NoteIdsFail {
            inner: MemoryPreviews::default(),
            failures: std::sync::atomic::AtomicUsize::new(1),
        });
        let (previews, preview) = publishing(&url, store.clone());
        previews.publish(&preview).await;
        assert_eq!(
            posted.lock().unwrap().len(),
            1,
            "one note, edited on the retry"
        );
        assert_eq!(
            store.note("prod", "g/app", 3).await.unwrap(),
            Some(101),
            "the retry kept the posted note's id"
        );
        // The next head edits that note too.
        previews.publish(&preview).await;
        assert_eq!(posted.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_note_someone_deleted_is_posted_again_and_its_new_id_kept() {
        let (url, posted) = gitlab_counting_notes().await;
        let store = Arc::new(MemoryPreviews::default());
        // The id of a note GitLab no longer has: deleted by someone on the merge request.
        store.set_note("prod", "g/app", 3, 999).await.unwrap();
        let (previews, preview) = publishing(&url, store.clone());
        previews.publish(&preview).await;
        assert_eq!(
            posted.lock().unwrap().len(),
            1,
            "posted anew after the edit's 404"
        );
        assert_eq!(store.note("prod", "g/app", 3).await.unwrap(), Some(101));
        previews.publish(&preview).await;
        assert_eq!(posted.lock().unwrap().len(), 1, "and edited from then on");
    }
}
