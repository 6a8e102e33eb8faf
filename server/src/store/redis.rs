//! Redis: durable, shared by every replica. Keys carry a hash tag per project so that a
//! ref document and its delivery markers live in one Redis Cluster slot.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use greenlight::backoff::Backoff;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    Broadcast, DELIVERY_MEMORY_SECS, Notice, PRESENCE_TTL_SECS, RefDoc, RefKey, Result,
    SaveOutcome, Store, StoreError, Versioned,
};
use crate::config::RedisSettings;

/// Conditional write of a ref document: checks the delivery marker and the version, writes,
/// marks the delivery and publishes, or does nothing at all.
const SAVE_SCRIPT: &str = r#"
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -2 end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'doc', ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], '1', 'EX', ARGV[3]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return v
"#;

/// How often the subscription connection proves it is alive.
const PUBSUB_PING_INTERVAL: Duration = Duration::from_secs(30);
const PUBSUB_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The Redis-backed store.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    channel: String,
    save: Script,
    notices: broadcast::Sender<Notice>,
    url_for_logs: String,
}

impl RedisStore {
    /// Connects lazily (the server starts even while Redis is down) and starts listening for
    /// other replicas' announcements until `shutdown`.
    pub fn connect(settings: &RedisSettings, shutdown: CancellationToken) -> Result<Self> {
        let client = redis::Client::open(settings.url.as_str())?;
        // Fail fast while Redis is down: webhooks must answer 503 well within GitLab's 10 s.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let prefix = settings.key_prefix.clone();
        let channel = format!("{prefix}:events");
        let notices = broadcast::channel(4096).0;
        tokio::spawn(
            listen(client, channel.clone(), notices.clone(), shutdown)
                .instrument(info_span!("redis_subscriber")),
        );
        Ok(Self {
            conn,
            channel,
            save: Script::new(SAVE_SCRIPT),
            notices,
            url_for_logs: crate::redact::url(&settings.url),
            prefix,
        })
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
        let message = serde_json::to_string(notice).map_err(|source| StoreError::Corrupt {
            key: doc_key.clone(),
            source,
        })?;
        let result: i64 = self
            .save
            .key(&doc_key)
            .key(&delivery_key)
            .arg(expected)
            .arg(json)
            .arg(ttl)
            .arg(&self.channel)
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

    async fn push_report(&self, agent: &str, report: &[u8], keep: usize) -> Result<()> {
        let key = self.reports_key(agent);
        let stop = isize::try_from(keep).unwrap_or(isize::MAX) - 1;
        redis::pipe()
            .atomic()
            .lpush(&key, report)
            .ltrim(&key, 0, stop)
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

    async fn publish(&self, message: &Broadcast) -> Result<()> {
        let payload = serde_json::to_string(message).map_err(|source| StoreError::Corrupt {
            key: self.channel.clone(),
            source,
        })?;
        let _: i64 = self.conn.clone().publish(&self.channel, payload).await?;
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

/// Relays the channel to local subscribers; after every (re)connection it asks them to
/// re-read everything, since messages published meanwhile are lost.
async fn listen(
    client: redis::Client,
    channel: String,
    notices: broadcast::Sender<Notice>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = attempt => result,
        };
        match pubsub {
            Ok(pubsub) => {
                info!(%channel, "subscribed");
                backoff.reset();
                let _ = notices.send(Notice::Resync);
                let (mut sink, mut messages) = pubsub.split();
                let mut ping = tokio::time::interval(PUBSUB_PING_INTERVAL);
                ping.reset();
                loop {
                    let message = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = messages.next() => message,
                        _ = ping.tick() => {
                            // A connection dropped silently (NAT, load balancer) never ends
                            // the stream; only an unanswered ping reveals it.
                            match tokio::time::timeout(PUBSUB_PING_TIMEOUT, sink.ping::<()>()).await {
                                Ok(Ok(())) => continue,
                                _ => break,
                            }
                        }
                    };
                    let Some(message) = message else { break };
                    match serde_json::from_slice::<Broadcast>(message.get_payload_bytes()) {
                        Ok(broadcast) => {
                            let _ = notices.send(Notice::Message(broadcast));
                        }
                        Err(error) => {
                            debug!(%error, "ignoring a message this version does not understand")
                        }
                    }
                }
                warn!(%channel, "subscription lost; reconnecting");
            }
            Err(error) => warn!(%error, "cannot subscribe"),
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
