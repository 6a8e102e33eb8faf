//! Redis: durable, shared by every replica. Keys carry a hash tag per project so that a
//! ref document and its delivery markers live in one Redis Cluster slot.
//!
//! The change log is a Redis Stream. Each replica tails it from the id of the last entry it
//! processed, over a connection of its own (a blocking read would stall every other command
//! on a shared one); commit status publishers read it through a consumer group, which hands
//! each entry to one of them and lets a survivor claim what a dead replica took.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use greenlight::backoff::Backoff;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Script};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    Broadcast, DELIVERY_MEMORY_SECS, LOG_MAX_ENTRIES, LogEntry, Notice, PRESENCE_TTL_SECS, RefDoc,
    RefKey, Result, SaveOutcome, Store, StoreError, Versioned,
};
use crate::config::RedisSettings;
use crate::metrics::LogLag;

/// Conditional write of a ref document: checks the delivery marker and the version, writes,
/// marks the delivery and appends to the change log, or does nothing at all.
const SAVE_SCRIPT: &str = r#"
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -2 end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'doc', ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], '1', 'EX', ARGV[3]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'm', ARGV[5])
return v
"#;

/// The field of a log entry that holds its message.
const ENTRY_FIELD: &str = "m";
/// The consumer group of the commit status publishers.
const STATUS_GROUP: &str = "statuses";
/// How long one blocking read of the log waits; an empty answer doubles as a liveness check.
const LOG_BLOCK: Duration = Duration::from_secs(5);
/// Entries read at once by a follower.
const LOG_BATCH: usize = 512;
/// How long a status publisher's read waits for an entry.
const STATUS_BLOCK: Duration = Duration::from_secs(2);

/// The Redis-backed store.
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    log: String,
    save: Script,
    notices: broadcast::Sender<Notice>,
    /// The status publisher's own connection for its blocking reads; `None` until first used
    /// and after it failed.
    status_conn: Mutex<Option<MultiplexedConnection>>,
    url_for_logs: String,
}

impl RedisStore {
    /// Connects lazily (the server starts even while Redis is down) and starts listening for
    /// other replicas' announcements until `shutdown`, keeping `lag` at how far behind the
    /// change log that is.
    pub fn connect(
        settings: &RedisSettings,
        shutdown: CancellationToken,
        lag: LogLag,
    ) -> Result<Self> {
        let client = redis::Client::open(settings.url.as_str())?;
        // Fail fast while Redis is down: webhooks must answer 503 well within GitLab's 10 s.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let prefix = settings.key_prefix.clone();
        let log = format!("{prefix}:log");
        let notices = broadcast::channel(4096).0;
        tokio::spawn(
            follow_log(client.clone(), log.clone(), notices.clone(), lag, shutdown)
                .instrument(info_span!("change_log")),
        );
        Ok(Self {
            client,
            conn,
            log,
            save: Script::new(SAVE_SCRIPT),
            notices,
            status_conn: Mutex::new(None),
            url_for_logs: crate::redact::url(&settings.url),
            prefix,
        })
    }

    fn encode(&self, message: &Broadcast) -> Result<String> {
        serde_json::to_string(message).map_err(|source| StoreError::Corrupt {
            key: self.log.clone(),
            source,
        })
    }

    /// The status publisher's connection, made on first use.
    async fn status_connection(&self) -> Result<MultiplexedConnection> {
        let mut held = self.status_conn.lock().await;
        if let Some(conn) = held.as_ref() {
            return Ok(conn.clone());
        }
        let conn = blocking_connection(&self.client, STATUS_BLOCK).await?;
        *held = Some(conn.clone());
        Ok(conn)
    }

    async fn forget_status_connection(&self) {
        *self.status_conn.lock().await = None;
    }

    /// Creates the status group, unless it exists, at the log's first entry: what was
    /// appended before any publisher asked still gets its statuses (those already posted are
    /// recognised and skipped). Created again after Redis lost its data.
    async fn ensure_status_group(&self) -> Result<()> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.log)
            .arg(STATUS_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Err(error) if error.code() != Some("BUSYGROUP") => Err(error.into()),
            _ => Ok(()),
        }
    }

    async fn take_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>> {
        // First what a publisher took and never acknowledged: its replica died, or it is
        // this replica's own from before a restart.
        let min_idle = u64::try_from(reclaim_after.as_millis()).unwrap_or(u64::MAX);
        let reclaimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.log)
            .arg(STATUS_GROUP)
            .arg(consumer)
            .arg(min_idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await?;
        if let Some(entry) = reclaimed.claimed.into_iter().next() {
            return Ok(Some(self.entry(entry)));
        }
        let mut conn = self.status_connection().await?;
        let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(STATUS_GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block_ms(STATUS_BLOCK))
            .arg("STREAMS")
            .arg(&self.log)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        Ok(read
            .and_then(|reply| reply.keys.into_iter().next())
            .and_then(|key| key.ids.into_iter().next())
            .map(|entry| self.entry(entry)))
    }

    /// A log entry as read; one this version cannot decode is handed over as a message
    /// nobody acts on, so that it is still acknowledged and never read again.
    fn entry(&self, entry: StreamId) -> LogEntry {
        let message = decode_entry(&entry).unwrap_or_else(|| {
            debug!(
                id = entry.id,
                "a log entry this version does not understand"
            );
            Broadcast::Connection {
                agent: String::new(),
                connected: false,
                replica: String::new(),
            }
        });
        LogEntry {
            id: entry.id,
            message,
        }
    }

    fn doc_key(&self, key: &RefKey) -> String {
        format!("{}:{{{}}}:ref:{}", self.prefix, key.project, key.branch)
    }

    fn delivery_key(&self, key: &RefKey, delivery: &str) -> String {
        format!("{}:{{{}}}:delivery:{}", self.prefix, key.project, delivery)
    }

    fn reports_key(&self, agent: &str) -> String {
        format!("{}:agent:{{{}}}:reports", self.prefix, agent)
    }

    fn presence_key(&self, replica: &str) -> String {
        format!("{}:presence:{{{}}}", self.prefix, replica)
    }

    fn status_key(&self, agent: &str, sha: &str, state: &str) -> String {
        format!(
            "{}:agent:{{{}}}:status:{}:{}",
            self.prefix, agent, sha, state
        )
    }

    fn replicas_key(&self) -> String {
        format!("{}:replicas", self.prefix)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self, key: &RefKey) -> Result<Versioned<RefDoc>> {
        let doc_key = self.doc_key(key);
        let (version, doc): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(&doc_key)
            .arg("v")
            .arg("doc")
            .query_async(&mut self.conn.clone())
            .await?;
        let value = match doc {
            None => RefDoc::default(),
            Some(json) => serde_json::from_str(&json).map_err(|source| StoreError::Corrupt {
                key: doc_key,
                source,
            })?,
        };
        Ok(Versioned {
            version: version.unwrap_or(0),
            value,
        })
    }

    async fn save(
        &self,
        key: &RefKey,
        expected: u64,
        doc: &RefDoc,
        delivery: Option<&str>,
        notice: &Broadcast,
    ) -> Result<SaveOutcome> {
        let doc_key = self.doc_key(key);
        let (delivery_key, ttl) = match delivery {
            Some(id) => (self.delivery_key(key, id), DELIVERY_MEMORY_SECS.to_string()),
            None => (doc_key.clone(), String::new()),
        };
        let json = serde_json::to_string(doc).map_err(|source| StoreError::Corrupt {
            key: doc_key.clone(),
            source,
        })?;
        let message = self.encode(notice)?;
        let result: i64 = self
            .save
            .key(&doc_key)
            .key(&delivery_key)
            .key(&self.log)
            .arg(expected)
            .arg(json)
            .arg(ttl)
            .arg(LOG_MAX_ENTRIES)
            .arg(message)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match result {
            -1 => SaveOutcome::Duplicate,
            -2 => SaveOutcome::Conflict,
            version => SaveOutcome::Saved {
                version: version.unsigned_abs(),
            },
        })
    }

    async fn seen_delivery(&self, key: &RefKey, delivery: &str) -> Result<bool> {
        Ok(self
            .conn
            .clone()
            .exists(self.delivery_key(key, delivery))
            .await?)
    }

    async fn push_report(
        &self,
        agent: &str,
        report: &[u8],
        keep: usize,
        notice: &Broadcast,
    ) -> Result<()> {
        let key = self.reports_key(agent);
        let stop = isize::try_from(keep).unwrap_or(isize::MAX) - 1;
        let message = self.encode(notice)?;
        redis::pipe()
            .atomic()
            .lpush(&key, report)
            .ltrim(&key, 0, stop)
            .add_command(append_command(&self.log, &message))
            .ignore()
            .exec_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        Ok(self
            .conn
            .clone()
            .lrange(self.reports_key(agent), 0, stop)
            .await?)
    }

    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()> {
        let key = self.presence_key(replica);
        let mut pipe = redis::pipe();
        if connected {
            pipe.hset(&key, agent, now_ms())
                .expire(&key, PRESENCE_TTL_SECS as i64)
                .zadd(self.replicas_key(), replica, now_ms());
        } else {
            pipe.hdel(&key, agent);
        }
        pipe.exec_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn refresh_presence(&self, replica: &str) -> Result<()> {
        let cutoff = now_ms() - (PRESENCE_TTL_SECS as i64) * 1000;
        redis::pipe()
            .expire(self.presence_key(replica), PRESENCE_TTL_SECS as i64)
            .zadd(self.replicas_key(), replica, now_ms())
            .zrembyscore(self.replicas_key(), "-inf", cutoff)
            .exec_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn presence(&self, agent: &str) -> Result<Option<String>> {
        let cutoff = now_ms() - (PRESENCE_TTL_SECS as i64) * 1000;
        let mut conn = self.conn.clone();
        let replicas: Vec<String> = conn
            .zrangebyscore(self.replicas_key(), cutoff, "+inf")
            .await?;
        for replica in replicas {
            let here: bool = conn.hexists(self.presence_key(&replica), agent).await?;
            if here {
                return Ok(Some(replica));
            }
        }
        Ok(None)
    }

    async fn set_sync_error(&self, agent: &str, error: Option<&str>) -> Result<()> {
        let key = format!("{}:agent:{{{}}}:sync_error", self.prefix, agent);
        let mut conn = self.conn.clone();
        match error {
            Some(error) => conn.set::<_, _, ()>(key, error).await?,
            None => conn.del::<_, ()>(key).await?,
        }
        Ok(())
    }

    async fn sync_error(&self, agent: &str) -> Result<Option<String>> {
        let key = format!("{}:agent:{{{}}}:sync_error", self.prefix, agent);
        Ok(self.conn.clone().get(key).await?)
    }

    async fn status_posted(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        Ok(self
            .conn
            .clone()
            .exists(self.status_key(agent, sha, state))
            .await?)
    }

    async fn claim_status(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        let key = self.status_key(agent, sha, state);
        let claimed: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(crate::clock::now_ms())
            .arg("NX")
            .arg("EX")
            .arg(super::STATUS_MEMORY_SECS)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(claimed.is_some())
    }

    async fn append(&self, message: &Broadcast) -> Result<()> {
        let message = self.encode(message)?;
        let _: String = append_command(&self.log, &message)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn next_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>> {
        match self.take_for_statuses(consumer, reclaim_after).await {
            Err(StoreError::Redis(error)) if error.code() == Some("NOGROUP") => {
                // First use, or Redis lost its data.
                self.ensure_status_group().await?;
                self.take_for_statuses(consumer, reclaim_after).await
            }
            Err(error) => {
                // The blocking connection may be the broken part: make a new one next time.
                self.forget_status_connection().await;
                Err(error)
            }
            ok => ok,
        }
    }

    async fn ack_statuses(&self, id: &str) -> Result<()> {
        let _: i64 = redis::cmd("XACK")
            .arg(&self.log)
            .arg(STATUS_GROUP)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("redis at {} (prefix {})", self.url_for_logs, self.prefix)
    }
}

/// `XADD log MAXLEN ~ N * m message`.
fn append_command(log: &str, message: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(log)
        .arg("MAXLEN")
        .arg("~")
        .arg(LOG_MAX_ENTRIES)
        .arg("*")
        .arg(ENTRY_FIELD)
        .arg(message);
    cmd
}

/// A connection of its own for blocking reads of `block`, which must not count as a hung
/// server.
async fn blocking_connection(
    client: &redis::Client,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(block + Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

fn block_ms(block: Duration) -> u64 {
    u64::try_from(block.as_millis()).unwrap_or(u64::MAX)
}

fn decode_entry(entry: &StreamId) -> Option<Broadcast> {
    let payload: Vec<u8> = entry.get(ENTRY_FIELD)?;
    serde_json::from_slice(&payload).ok()
}

/// A stream entry id, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Where a follower stands against the log as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Every entry after the last one read is still there: read on from it.
    From(EntryId),
    /// Entries were lost (trimmed unread, or the log is younger than what was read): re-read
    /// everything, then follow from the log's end.
    Resync(EntryId),
}

/// Decides how a follower that last read `last` (none on its first connection) goes on,
/// given the log's newest id and the newest id ever trimmed from it.
fn resume_point(last: Option<EntryId>, newest: EntryId, max_deleted: EntryId) -> Resume {
    match last {
        None => Resume::Resync(newest),
        Some(last) => match newest.cmp(&last) {
            Ordering::Less => Resume::Resync(newest),
            _ if max_deleted > last => Resume::Resync(newest),
            _ => Resume::From(last),
        },
    }
}

/// The log's newest id and the newest id trimmed from it; zeros when it does not exist.
async fn log_position(
    conn: &mut MultiplexedConnection,
    log: &str,
) -> redis::RedisResult<(EntryId, EntryId)> {
    let info: redis::RedisResult<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(log)
        .query_async(conn)
        .await;
    let info = match info {
        Ok(info) => info,
        Err(error) if error.to_string().contains("no such key") => {
            return Ok((EntryId::default(), EntryId::default()));
        }
        Err(error) => return Err(error),
    };
    let id = |field: &str| {
        info.get(field)
            .and_then(|value| redis::from_redis_value_ref::<String>(value).ok())
            .and_then(|text| EntryId::parse(&text))
            .unwrap_or_default()
    };
    Ok((id("last-generated-id"), id("max-deleted-entry-id")))
}

/// Relays the change log to local subscribers in order, resuming after every reconnection
/// from the last entry relayed; subscribers are asked to re-read everything only when
/// entries were lost.
async fn follow_log(
    client: redis::Client,
    log: String,
    notices: broadcast::Sender<Notice>,
    lag: LogLag,
    shutdown: CancellationToken,
) {
    let mut last: Option<EntryId> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let session = async {
            let mut conn = blocking_connection(&client, LOG_BLOCK).await?;
            let (newest, max_deleted) = log_position(&mut conn, &log).await?;
            let mut position = match resume_point(last, newest, max_deleted) {
                Resume::From(id) => id,
                Resume::Resync(id) => {
                    info!(%log, "entries may have been missed; re-reading everything");
                    let _ = notices.send(Notice::Resync);
                    id
                }
            };
            last = Some(position);
            info!(%log, from = %position, "following the change log");
            backoff.reset();
            loop {
                let read: Option<StreamReadReply> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(LOG_BATCH)
                    .arg("BLOCK")
                    .arg(block_ms(LOG_BLOCK))
                    .arg("STREAMS")
                    .arg(&log)
                    .arg(position.to_string())
                    .query_async(&mut conn)
                    .await?;
                let entries = read
                    .and_then(|reply| reply.keys.into_iter().next())
                    .map(|key| key.ids)
                    .unwrap_or_default();
                if entries.is_empty() {
                    lag.set(0.0);
                    // An empty answer is also the moment to notice a log that was reset
                    // (Redis restarted without its data) under a live connection.
                    let (newest, max_deleted) = log_position(&mut conn, &log).await?;
                    if let Resume::Resync(id) = resume_point(last, newest, max_deleted) {
                        info!(%log, "the change log was reset; re-reading everything");
                        let _ = notices.send(Notice::Resync);
                        position = id;
                        last = Some(id);
                    }
                    continue;
                }
                for entry in entries {
                    let Some(id) = EntryId::parse(&entry.id) else {
                        continue;
                    };
                    match decode_entry(&entry) {
                        Some(message) => {
                            let _ = notices.send(Notice::Message(message));
                        }
                        None => debug!(
                            id = entry.id,
                            "skipping an entry this version does not understand"
                        ),
                    }
                    position = id;
                    last = Some(id);
                }
                lag.set(seconds_behind(position, now_ms()));
            }
            #[allow(unreachable_code)]
            Ok::<(), redis::RedisError>(())
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session => result,
        };
        if let Err(error) = result {
            warn!(%error, %log, "change log connection lost; resuming");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.delay()) => {}
        }
    }
}

fn now_ms() -> i64 {
    crate::clock::now_ms()
}

/// Seconds from the append of entry `id` (its id starts with Redis's clock in ms) to
/// `now_ms`; 0 when the clocks disagree the other way.
fn seconds_behind(id: EntryId, now_ms: i64) -> f64 {
    let appended = i64::try_from(id.0).unwrap_or(i64::MAX);
    now_ms.saturating_sub(appended).max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId(ms, seq)
    }

    #[test]
    fn entry_ids_parse_and_order_as_redis_orders_them() {
        assert_eq!(
            EntryId::parse("1700000000000-3"),
            Some(id(1_700_000_000_000, 3))
        );
        assert_eq!(EntryId::parse("0-0"), Some(EntryId::default()));
        assert_eq!(EntryId::parse("12"), None);
        assert_eq!(EntryId::parse("a-1"), None);
        assert!(id(5, 10) < id(6, 0));
        assert!(id(5, 2) < id(5, 10), "numeric, not textual");
        assert_eq!(id(5, 10).to_string(), "5-10");
    }

    #[test]
    fn lag_is_read_from_the_time_in_the_entry_id() {
        assert_eq!(
            seconds_behind(id(1_700_000_000_000, 4), 1_700_000_001_500),
            1.5
        );
        assert_eq!(
            seconds_behind(id(1_700_000_000_000, 0), 1_700_000_000_000),
            0.0
        );
        // Redis's clock ahead of this replica's.
        assert_eq!(
            seconds_behind(id(1_700_000_002_000, 0), 1_700_000_000_000),
            0.0
        );
    }

    #[test]
    fn a_follower_resumes_unless_entries_were_lost() {
        // First connection: nothing read yet, so everything is re-read once.
        assert_eq!(
            resume_point(None, id(9, 0), id(0, 0)),
            Resume::Resync(id(9, 0))
        );
        // Reconnected, nothing trimmed past what was read: resume.
        assert_eq!(
            resume_point(Some(id(5, 0)), id(9, 0), id(0, 0)),
            Resume::From(id(5, 0))
        );
        assert_eq!(
            resume_point(Some(id(5, 0)), id(9, 0), id(5, 0)),
            Resume::From(id(5, 0))
        );
        // Trimmed past the last entry read: some were never seen.
        assert_eq!(
            resume_point(Some(id(5, 0)), id(9, 0), id(7, 0)),
            Resume::Resync(id(9, 0))
        );
        // The log is behind what was read: Redis lost its data.
        assert_eq!(
            resume_point(Some(id(5, 0)), id(2, 0), id(0, 0)),
            Resume::Resync(id(2, 0))
        );
        assert_eq!(
            resume_point(Some(id(5, 0)), id(0, 0), id(0, 0)),
            Resume::Resync(id(0, 0))
        );
    }
}
