//! Where previews are kept, and how a request reaches the replica an agent is connected to:
//! a narrow store of its own, in memory or in Redis (keys under the configured prefix, and a
//! Redis Stream every replica tails for requests and answers; no pub/sub, so a replica that
//! was briefly away catches up from the stream).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use greenlight::backoff::Backoff;
use greenlight::v1::Preview;
use prost::Message;
use redb::{ReadableTable, TableDefinition};
use redis::AsyncCommands;
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::config::RedisSettings;
use crate::store::{RedisConn, RedisSource};

/// How long a stored preview, a requested head and a note id are kept.
const KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
/// Previews listed per agent (the status page shows the newest).
pub const LATEST: usize = 20;
/// Entries kept in the announcement stream: far more than are in flight at once.
const STREAM_MAX: usize = 1000;
/// How long one blocking read of the stream waits.
const STREAM_BLOCK: Duration = Duration::from_secs(5);

/// Why the preview store failed.
#[derive(Debug, thiserror::Error)]
pub enum PreviewStoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored preview {0} is corrupt")]
    Corrupt(String),
    #[error("preview file: {0}")]
    File(String),
}

type Result<T, E = PreviewStoreError> = std::result::Result<T, E>;

/// A merge request's head an agent is asked to preview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewRequest {
    /// Unique per agent, merge request and head.
    pub id: String,
    pub agent: String,
    pub project: String,
    pub merge_request_iid: u64,
    pub sha: String,
    /// Unix milliseconds when it was asked for.
    pub at_ms: i64,
}

/// What every replica hears of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Announcement {
    /// A head to preview: the replica holding the agent's stream sends it.
    Requested(PreviewRequest),
    /// The agent answered `id`: nobody needs to send it again.
    Answered { agent: String, id: String },
}

/// Requests, results and note ids of previews.
#[async_trait]
pub trait PreviewStore: Send + Sync {
    /// Records `request` as the newest head of its merge request for its agent; `false`
    /// when that very head was asked for already.
    async fn request(&self, request: &PreviewRequest) -> Result<bool>;
    /// The newest head asked for of merge request `iid` of `project` by `agent`.
    async fn requested(&self, agent: &str, project: &str, iid: u64) -> Result<Option<String>>;
    /// Tells every replica (this one included).
    async fn announce(&self, announcement: &Announcement) -> Result<()>;
    /// What is announced from now on.
    fn announcements(&self) -> broadcast::Receiver<Announcement>;
    /// Keeps `preview` as the agent's newest.
    async fn save(&self, preview: &Preview) -> Result<()>;
    /// The preview of `sha` by `agent`, or its newest.
    async fn load(&self, agent: &str, sha: Option<&str>) -> Result<Option<Preview>>;
    /// The newest `limit` previews of `agent`, newest first.
    async fn latest(&self, agent: &str, limit: usize) -> Result<Vec<Preview>>;
    /// The id of the note `agent` keeps on the merge request.
    async fn note(&self, agent: &str, project: &str, iid: u64) -> Result<Option<u64>>;
    async fn set_note(&self, agent: &str, project: &str, iid: u64, note: u64) -> Result<()>;
}

fn mr_key(agent: &str, project: &str, iid: u64) -> String {
    format!("{agent}\0{project}\0{iid}")
}

/// Previews of a server on the embedded store: one replica. Requests, results and note ids
/// are also kept in a file (`previews.redb` in `data_dir`), so that a restart neither drops a
/// request its agent has not answered, nor forgets what the status page shows, nor posts a
/// second note on a merge request.
pub struct MemoryPreviews {
    inner: Mutex<MemoryInner>,
    announced: broadcast::Sender<Announcement>,
    file: Option<Arc<redb::Database>>,
}

/// Note ids: agent, project and merge request (as `mr_key`) → note id.
const NOTES: TableDefinition<&str, u64> = TableDefinition::new("notes");
/// Requests: agent, project and merge request (as `mr_key`) → its newest request as JSON.
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
/// Results: agent SEP sha → the encoded `Preview`.
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// The newest results of each agent: agent → their shas, newest first, joined by ','.
const NEWEST: TableDefinition<&str, &str> = TableDefinition::new("newest");
const SEP: char = '\u{1f}';

#[derive(Default)]
struct MemoryInner {
    requested: HashMap<String, String>,
    /// Requests not answered yet, by merge request (`mr_key`).
    unanswered: HashMap<String, PreviewRequest>,
    /// The unanswered requests the file held at start, for the first subscriber.
    replay: Vec<Announcement>,
    previews: HashMap<(String, String), Preview>,
    latest: HashMap<String, VecDeque<String>>,
    notes: HashMap<String, u64>,
}

impl Default for MemoryPreviews {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            announced: broadcast::channel(1024).0,
            file: None,
        }
    }
}

/// A merge request's newest request as the file keeps it.
#[derive(Serialize, Deserialize)]
struct StoredRequest {
    request: PreviewRequest,
    answered: bool,
}

/// One change to the preview file.
enum FileChange {
    Note(String, u64),
    /// A merge request's newest request, under its `mr_key`.
    Request(String, StoredRequest),
    /// An agent's newest shas, the result saved, and the one that fell off.
    Saved {
        agent: String,
        newest: String,
        preview: Box<Preview>,
        gone: Option<String>,
    },
}

impl MemoryPreviews {
    /// Previews kept in `data_dir/previews.redb` as well, loading what it holds.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let failed = |error: &dyn std::fmt::Display| PreviewStoreError::File(error.to_string());
        std::fs::create_dir_all(data_dir).map_err(|e| failed(&e))?;
        let db = redb::Database::create(data_dir.join("previews.redb")).map_err(|e| failed(&e))?;
        let write = db.begin_write().map_err(|e| failed(&e))?;
        let mut inner = MemoryInner::default();
        {
            let notes = write.open_table(NOTES).map_err(|e| failed(&e))?;
            for entry in notes.iter().map_err(|e| failed(&e))? {
                let (key, note) = entry.map_err(|e| failed(&e))?;
                inner.notes.insert(key.value().to_owned(), note.value());
            }
            let mut requests = write.open_table(REQUESTS).map_err(|e| failed(&e))?;
            let mut expired = Vec::new();
            let oldest =
                crate::clock::now_ms() - i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
            for entry in requests.iter().map_err(|e| failed(&e))? {
                let (key, bytes) = entry.map_err(|e| failed(&e))?;
                let key = key.value().to_owned();
                let stored: StoredRequest = serde_json::from_slice(bytes.value())
                    .map_err(|_| PreviewStoreError::Corrupt(key.clone()))?;
                if stored.request.at_ms < oldest {
                    expired.push(key);
                    continue;
                }
                inner
                    .requested
                    .insert(key.clone(), stored.request.sha.clone());
                if !stored.answered {
                    inner
                        .replay
                        .push(Announcement::Requested(stored.request.clone()));
                    inner.unanswered.insert(key, stored.request);
                }
            }
            for key in expired {
                requests.remove(key.as_str()).map_err(|e| failed(&e))?;
            }
            let results = write.open_table(RESULTS).map_err(|e| failed(&e))?;
            for entry in results.iter().map_err(|e| failed(&e))? {
                let (key, bytes) = entry.map_err(|e| failed(&e))?;
                let preview = decode(key.value(), bytes.value())?;
                inner
                    .previews
                    .insert((preview.agent.clone(), preview.sha.clone()), preview);
            }
            let newest = write.open_table(NEWEST).map_err(|e| failed(&e))?;
            for entry in newest.iter().map_err(|e| failed(&e))? {
                let (agent, shas) = entry.map_err(|e| failed(&e))?;
                let shas = shas.value().split(',').filter(|s| !s.is_empty());
                inner
                    .latest
                    .insert(agent.value().to_owned(), shas.map(str::to_owned).collect());
            }
        }
        write.commit().map_err(|e| failed(&e))?;
        Ok(Self {
            inner: Mutex::new(inner),
            announced: broadcast::channel(1024).0,
            file: Some(Arc::new(db)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `change` to the file, when there is one, durably before returning.
    async fn persist(&self, change: FileChange) -> Result<()> {
        let Some(db) = self.file.clone() else {
            return Ok(());
        };
        let failed = |error: &dyn std::fmt::Display| PreviewStoreError::File(error.to_string());
        tokio::task::spawn_blocking(move || {
            let write = db.begin_write().map_err(|e| failed(&e))?;
            match change {
                FileChange::Note(key, note) => {
                    let mut notes = write.open_table(NOTES).map_err(|e| failed(&e))?;
                    notes.insert(key.as_str(), note).map_err(|e| failed(&e))?;
                }
                FileChange::Request(key, stored) => {
                    let bytes = serde_json::to_vec(&stored).map_err(|e| failed(&e))?;
                    let mut requests = write.open_table(REQUESTS).map_err(|e| failed(&e))?;
                    requests
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| failed(&e))?;
                }
                FileChange::Saved {
                    agent,
                    newest,
                    preview,
                    gone,
                } => {
                    let mut results = write.open_table(RESULTS).map_err(|e| failed(&e))?;
                    let key = format!("{agent}{SEP}{}", preview.sha);
                    let bytes = preview.encode_to_vec();
                    results
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| failed(&e))?;
                    if let Some(gone) = gone {
                        results
                            .remove(format!("{agent}{SEP}{gone}").as_str())
                            .map_err(|e| failed(&e))?;
                    }
                    let mut table = write.open_table(NEWEST).map_err(|e| failed(&e))?;
                    table
                        .insert(agent.as_str(), newest.as_str())
                        .map_err(|e| failed(&e))?;
                }
            }
            write.commit().map_err(|e| failed(&e))
        })
        .await
        .map_err(|e| failed(&e))?
    }
}

#[async_trait]
impl PreviewStore for MemoryPreviews {
    async fn request(&self, request: &PreviewRequest) -> Result<bool> {
        let key = mr_key(&request.agent, &request.project, request.merge_request_iid);
        let old = self.lock().requested.insert(key, request.sha.clone());
        Ok(old.as_deref() != Some(request.sha.as_str()))
    }

    async fn requested(&self, agent: &str, project: &str, iid: u64) -> Result<Option<String>> {
        Ok(self
            .lock()
            .requested
            .get(&mr_key(agent, project, iid))
            .cloned())
    }

    async fn announce(&self, announcement: &Announcement) -> Result<()> {
        // On disk before anyone hears of it: a request heard of and then lost in a restart
        // would leave its merge request waiting for the next push.
        let change = {
            let mut inner = self.lock();
            match announcement {
                Announcement::Requested(request) => {
                    let key = mr_key(&request.agent, &request.project, request.merge_request_iid);
                    inner.unanswered.insert(key.clone(), request.clone());
                    Some(FileChange::Request(
                        key,
                        StoredRequest {
                            request: request.clone(),
                            answered: false,
                        },
                    ))
                }
                Announcement::Answered { agent, id } => {
                    let key = inner
                        .unanswered
                        .iter()
                        .find(|(_, r)| r.agent == *agent && r.id == *id)
                        .map(|(key, _)| key.clone());
                    key.and_then(|key| inner.unanswered.remove_entry(&key))
                        .map(|(key, request)| {
                            FileChange::Request(
                                key,
                                StoredRequest {
                                    request,
                                    answered: true,
                                },
                            )
                        })
                }
            }
        };
        if let Some(change) = change {
            self.persist(change).await?;
        }
        let _ = self.announced.send(announcement.clone());
        Ok(())
    }

    /// The first subscriber (the replica's preview service: one replica runs on an embedded
    /// store) hears first of the requests the file kept unanswered.
    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        let receiver = self.announced.subscribe();
        for announcement in std::mem::take(&mut self.lock().replay) {
            let _ = self.announced.send(announcement);
        }
        receiver
    }

    async fn save(&self, preview: &Preview) -> Result<()> {
        let change = {
            let mut inner = self.lock();
            inner.previews.insert(
                (preview.agent.clone(), preview.sha.clone()),
                preview.clone(),
            );
            let latest = inner.latest.entry(preview.agent.clone()).or_default();
            latest.retain(|sha| *sha != preview.sha);
            latest.push_front(preview.sha.clone());
            let gone = (latest.len() > LATEST).then(|| latest.pop_back()).flatten();
            let newest = latest
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",");
            if let Some(gone) = &gone {
                inner
                    .previews
                    .remove(&(preview.agent.clone(), gone.clone()));
            }
            FileChange::Saved {
                agent: preview.agent.clone(),
                newest,
                preview: Box::new(preview.clone()),
                gone,
            }
        };
        self.persist(change).await
    }

    async fn load(&self, agent: &str, sha: Option<&str>) -> Result<Option<Preview>> {
        let inner = self.lock();
        let sha = match sha {
            Some(sha) => sha.to_owned(),
            None => match inner.latest.get(agent).and_then(|l| l.front()) {
                Some(sha) => sha.clone(),
                None => return Ok(None),
            },
        };
        Ok(inner.previews.get(&(agent.to_owned(), sha)).cloned())
    }

    async fn latest(&self, agent: &str, limit: usize) -> Result<Vec<Preview>> {
        let inner = self.lock();
        Ok(inner
            .latest
            .get(agent)
            .into_iter()
            .flatten()
            .take(limit)
            .filter_map(|sha| {
                inner
                    .previews
                    .get(&(agent.to_owned(), sha.clone()))
                    .cloned()
            })
            .collect())
    }

    async fn note(&self, agent: &str, project: &str, iid: u64) -> Result<Option<u64>> {
        Ok(self.lock().notes.get(&mr_key(agent, project, iid)).copied())
    }

    async fn set_note(&self, agent: &str, project: &str, iid: u64, note: u64) -> Result<()> {
        let key = mr_key(agent, project, iid);
        self.lock().notes.insert(key.clone(), note);
        self.persist(FileChange::Note(key, note)).await
    }
}

/// Previews in Redis or a Redis Cluster, shared by every replica. An agent's keys share the
/// hash tag of its name: what one command touches together lives in one slot.
pub struct RedisPreviews {
    conn: RedisConn,
    prefix: String,
    stream: String,
    announced: broadcast::Sender<Announcement>,
}

impl RedisPreviews {
    /// Connects lazily, and tails the announcement stream until `shutdown`.
    pub fn connect(settings: &RedisSettings, shutdown: CancellationToken) -> Result<Self> {
        let source = RedisSource::open(settings)?;
        let conn = source.shared()?;
        let prefix = format!("{}:preview", settings.key_prefix);
        let stream = format!("{prefix}:stream");
        let announced = broadcast::channel(1024).0;
        tokio::spawn(
            follow(source, stream.clone(), announced.clone(), shutdown)
                .instrument(info_span!("preview_stream")),
        );
        Ok(Self {
            conn,
            prefix,
            stream,
            announced,
        })
    }

    /// `<prefix>:preview:{<agent>}:<what>:<rest…>`.
    fn key(&self, agent: &str, what: &str, rest: &[&str]) -> String {
        let mut key = format!("{}:{{{agent}}}:{what}", self.prefix);
        for part in rest {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    fn mr(&self, what: &str, agent: &str, project: &str, iid: u64) -> String {
        self.key(agent, what, &[project, &iid.to_string()])
    }
}

fn keep_secs() -> u64 {
    KEEP.as_secs()
}

fn decode(key: &str, bytes: &[u8]) -> Result<Preview> {
    Preview::decode(bytes).map_err(|_| PreviewStoreError::Corrupt(key.to_owned()))
}

#[async_trait]
impl PreviewStore for RedisPreviews {
    async fn request(&self, request: &PreviewRequest) -> Result<bool> {
        let key = self.mr(
            "requested",
            &request.agent,
            &request.project,
            request.merge_request_iid,
        );
        let old: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&request.sha)
            .arg("EX")
            .arg(keep_secs())
            .arg("GET")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(old.as_deref() != Some(request.sha.as_str()))
    }

    async fn requested(&self, agent: &str, project: &str, iid: u64) -> Result<Option<String>> {
        let key = self.mr("requested", agent, project, iid);
        Ok(self.conn.clone().get(key).await?)
    }

    async fn announce(&self, announcement: &Announcement) -> Result<()> {
        let payload = serde_json::to_string(announcement)
            .map_err(|_| PreviewStoreError::Corrupt(self.stream.clone()))?;
        let _: String = redis::cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAX)
            .arg("*")
            .arg("m")
            .arg(payload)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.announced.subscribe()
    }

    async fn save(&self, preview: &Preview) -> Result<()> {
        let key = self.key(&preview.agent, "result", &[&preview.sha]);
        let list = self.key(&preview.agent, "latest", &[]);
        let limit = isize::try_from(LATEST).unwrap_or(isize::MAX) - 1;
        let _: () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&key)
            .arg(preview.encode_to_vec())
            .arg("EX")
            .arg(keep_secs())
            .ignore()
            .lrem(&list, 0, &preview.sha)
            .ignore()
            .lpush(&list, &preview.sha)
            .ignore()
            .ltrim(&list, 0, limit)
            .ignore()
            .expire(&list, i64::try_from(keep_secs()).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn load(&self, agent: &str, sha: Option<&str>) -> Result<Option<Preview>> {
        let sha = match sha {
            Some(sha) => sha.to_owned(),
            None => {
                let list = self.key(agent, "latest", &[]);
                let newest: Option<String> = self.conn.clone().lindex(list, 0).await?;
                match newest {
                    Some(sha) => sha,
                    None => return Ok(None),
                }
            }
        };
        let key = self.key(agent, "result", &[&sha]);
        let bytes: Option<Vec<u8>> = self.conn.clone().get(&key).await?;
        bytes.map(|b| decode(&key, &b)).transpose()
    }

    async fn latest(&self, agent: &str, limit: usize) -> Result<Vec<Preview>> {
        let list = self.key(agent, "latest", &[]);
        let end = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        let shas: Vec<String> = self.conn.clone().lrange(list, 0, end).await?;
        if shas.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = shas
            .iter()
            .map(|sha| self.key(agent, "result", &[sha]))
            .collect();
        let found: Vec<Option<Vec<u8>>> = self.conn.clone().mget(&keys).await?;
        let mut previews = Vec::new();
        for (key, bytes) in keys.iter().zip(found) {
            if let Some(bytes) = bytes {
                previews.push(decode(key, &bytes)?);
            }
        }
        Ok(previews)
    }

    async fn note(&self, agent: &str, project: &str, iid: u64) -> Result<Option<u64>> {
        Ok(self
            .conn
            .clone()
            .get(self.mr("note", agent, project, iid))
            .await?)
    }

    async fn set_note(&self, agent: &str, project: &str, iid: u64, note: u64) -> Result<()> {
        let _: () = self
            .conn
            .clone()
            .set_ex(self.mr("note", agent, project, iid), note, keep_secs())
            .await?;
        Ok(())
    }
}

/// Tails the announcement stream from its start (what is retained: the requests still in
/// flight are among them), then as it grows, until `shutdown`.
async fn follow(
    source: RedisSource,
    stream: String,
    announced: broadcast::Sender<Announcement>,
    shutdown: CancellationToken,
) {
    let mut position = "0-0".to_owned();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let session = async {
            let mut conn = source.blocking(STREAM_BLOCK).await?;
            backoff.reset();
            loop {
                let read: Option<StreamReadReply> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(256)
                    .arg("BLOCK")
                    .arg(crate::clock::millis(STREAM_BLOCK))
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&position)
                    .query_async(&mut conn)
                    .await?;
                let entries = read
                    .and_then(|reply| reply.keys.into_iter().next())
                    .map(|key| key.ids)
                    .unwrap_or_default();
                for entry in entries {
                    position = entry.id.clone();
                    let payload: Option<String> = entry.get("m");
                    match payload.and_then(|p| serde_json::from_str(&p).ok()) {
                        Some(announcement) => {
                            let _ = announced.send(announcement);
                        }
                        None => debug!(id = entry.id, "skipping an undecodable announcement"),
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), redis::RedisError>(())
        };
        let error = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session => match result {
                Ok(()) => continue,
                Err(error) => error,
            },
        };
        warn!(%error, "preview stream read failed; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.delay()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preview(agent: &str, sha: &str) -> Preview {
        Preview {
            agent: agent.into(),
            sha: sha.into(),
            ..Preview::default()
        }
    }

    async fn newest_shas(store: &MemoryPreviews, agent: &str) -> Vec<String> {
        let latest = store.latest(agent, 5).await.unwrap();
        latest.into_iter().map(|p| p.sha).collect()
    }

    /// An embedded server's note ids, results and requests survive a restart; a request
    /// still unanswered is heard of again, an answered one is not.
    #[tokio::test]
    async fn notes_results_and_requests_are_kept_in_the_file_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = MemoryPreviews::open(dir.path()).unwrap();
            store.set_note("prod", "g/app", 7, 42).await.unwrap();
            for sha in ["a", "b"] {
                store.save(&preview("prod", sha)).await.unwrap();
            }
            let request = PreviewRequest {
                id: "x".into(),
                agent: "prod".into(),
                project: "g/app".into(),
                merge_request_iid: 7,
                sha: "b".into(),
                at_ms: crate::clock::now_ms(),
            };
            assert!(store.request(&request).await.unwrap());
            store
                .announce(&Announcement::Requested(request.clone()))
                .await
                .unwrap();
            let staging = PreviewRequest {
                id: "y".into(),
                agent: "staging".into(),
                ..request
            };
            assert!(store.request(&staging).await.unwrap());
            store
                .announce(&Announcement::Requested(staging))
                .await
                .unwrap();
            store
                .announce(&Announcement::Answered {
                    agent: "staging".into(),
                    id: "y".into(),
                })
                .await
                .unwrap();
        }
        let store = MemoryPreviews::open(dir.path()).unwrap();
        let mut heard = store.announcements();
        match heard.try_recv() {
            Ok(Announcement::Requested(request)) => {
                assert_eq!((request.agent.as_str(), request.id.as_str()), ("prod", "x"));
            }
            other => panic!("the unanswered request is heard of again, got {other:?}"),
        }
        assert!(heard.try_recv().is_err(), "the answered one is not");
        assert_eq!(
            store
                .requested("staging", "g/app", 7)
                .await
                .unwrap()
                .as_deref(),
            Some("b"),
            "an answered head is not asked for again"
        );
        assert_eq!(store.note("prod", "g/app", 7).await.unwrap(), Some(42));
        let latest = newest_shas(&store, "prod").await;
        assert_eq!(latest, ["b", "a"]);
        assert_eq!(
            store
                .requested("prod", "g/app", 7)
                .await
                .unwrap()
                .as_deref(),
            Some("b")
        );
    }

    #[tokio::test]
    async fn memory_keeps_the_newest_head_and_previews_newest_first() {
        let store = MemoryPreviews::default();
        let request = |sha: &str| PreviewRequest {
            id: sha.into(),
            agent: "prod".into(),
            project: "g/app".into(),
            merge_request_iid: 7,
            sha: sha.into(),
            at_ms: 0,
        };
        assert!(store.request(&request("a")).await.unwrap());
        assert!(
            !store.request(&request("a")).await.unwrap(),
            "asked already"
        );
        assert!(store.request(&request("b")).await.unwrap());
        assert_eq!(
            store
                .requested("prod", "g/app", 7)
                .await
                .unwrap()
                .as_deref(),
            Some("b")
        );
        for sha in ["a", "b", "a"] {
            store.save(&preview("prod", sha)).await.unwrap();
        }
        let latest = newest_shas(&store, "prod").await;
        assert_eq!(latest, ["a", "b"]);
        assert_eq!(store.load("prod", None).await.unwrap().unwrap().sha, "a");
        assert!(store.load("staging", None).await.unwrap().is_none());
        store.set_note("prod", "g/app", 7, 42).await.unwrap();
        assert_eq!(store.note("prod", "g/app", 7).await.unwrap(), Some(42));
    }
}
