//! Redis: durable, shared by every replica.
//!
//! Every key of a ref and every key of an agent carries the hash tag of its shard
//! (`{gl<n>}`), and each shard has its own change log stream under the same tag: what one
//! script changes atomically lives in one Redis Cluster slot, and the shards spread over
//! the cluster.
//!
//! Each replica tails the logs from the id of the last entry it processed, over a
//! connection of its own (a blocking read would stall every other command on a shared one);
//! commit status publishers read them through a consumer group, which hands each entry to
//! one of them and lets a survivor claim what a dead replica took. Facts are recorded over
//! a connection of their own as well: a webhook's answer must not queue behind the agent
//! writes of an evaluation that fans out to thousands of agents.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use greenlight::backoff::Backoff;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumer, StreamInfoConsumersReply,
    StreamInfoGroupsReply, StreamPendingCountReply, StreamReadReply,
};
use redis::{AsyncCommands, Script, ScriptInvocation};
use tokio::sync::{Mutex, Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::connection::{Conn, Source};
use super::records::{self, LAYOUT_VERSION};
use super::{
    AgentChange, AgentRead, AgentState, AgentStore, AgentWrites, Broadcast, ChangeLog,
    ChangedAgent, DELIVERY_MEMORY_SECS, DecidedChange, DeployedChange, FactRecord, FactStore,
    Facts, Ingested, LOG_MAX_ENTRIES, LeaseStore, LogEntry, Notice, PRESENCE_TTL_SECS, PUSHES_KEPT,
    PresenceStore, QueuedWrite, REPLICA_SILENT, RefKey, ReportStore, Reported, Result, SHARDS,
    STATUS_MEMORY_SECS, StatusClaim, StatusKey, Store, StoreError, SyncError, Told, Versioned,
    Written, agent_shard,
};
use super::{Registry, RegistryRecord, RegistryStore, RegistryWritten};
use crate::clock::{millis, now_ms};
use crate::config::RedisSettings;
use crate::gate::{DECISION_HISTORY, DEPLOYED_HISTORY, MAX_REJECTED, Pipeline, Sha};
use crate::metrics::{LogLag, LogMetrics};

/// Records one fact in one round trip: refuses a redelivery, merges the fact (pipeline
/// updates by the rule of `Pipeline::merged`, so that arrival order never matters), bumps
/// the ref's facts position and appends to the shard's log; or does nothing at all.
const FACT_SCRIPT: &str = r#"
local kind = ARGV[2]
-- Every key this run writes is read first, which fails on a key of the wrong type before
-- anything is written: Redis keeps what a failing script wrote, and a delivery marked as
-- seen without its fact would refuse the redelivery that could still record it.
redis.call('HGET', KEYS[2], 'position')
redis.call('XLEN', KEYS[6])
if kind == 'push' then
  redis.call('LLEN', KEYS[3])
elseif kind == 'rejected' then
  redis.call('LLEN', KEYS[5])
else
  redis.call('HLEN', KEYS[4])
end
if ARGV[1] ~= '' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return -1 end
end
if kind == 'push' then
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
elseif kind == 'rejected' then
  redis.call('RPUSH', KEYS[5], ARGV[3])
  redis.call('LTRIM', KEYS[5], -tonumber(ARGV[6]), -1)
else
  local FINAL = {success = true, failed = true, canceled = true, skipped = true}
  local stages_field = ARGV[4] .. ':stages'
  local ns, na = string.match(ARGV[3], '^([^|]*)|([^|]*)|')
  na = tonumber(na)
  local stages = ARGV[5]
  local old = redis.call('HGET', KEYS[4], ARGV[4])
  if old then
    local old_stages = redis.call('HGET', KEYS[4], stages_field) or '[]'
    if old == ARGV[3] and old_stages == ARGV[5] then return 0 end
    local os, oa = string.match(old, '^([^|]*)|([^|]*)|')
    oa = tonumber(oa)
    local supersedes
    if FINAL[os] and not FINAL[ns] then
      supersedes = na ~= nil and oa ~= nil and na > oa
    elseif FINAL[os] then
      supersedes = (na ~= nil and (oa == nil or na >= oa)) or (na == nil and oa == nil)
    else
      supersedes = true
    end
    if not supersedes then return 0 end
    if ARGV[5] == '[]' and ns == 'running' then stages = old_stages end
  end
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[3], stages_field, stages)
end
local position = redis.call('HINCRBY', KEYS[2], 'position', 1)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[7], '*', 'm',
  '{"kind":"fact","key":' .. ARGV[8] .. ',"position":' .. position .. ARGV[9] .. '}')
return position
"#;

/// Writes agents' states, each if the stored record is its agent's (not of another agent
/// since created under its name), its version is the one read and the stored state was not
/// decided from newer facts; appends each written agent's new decisions and deployed
/// commits to its capped lists (one `RPUSH` each, trimmed only past the cap) and one entry
/// naming every written agent to the shard's log.
///
/// KEYS: each agent's state, decisions and deployed keys, then the log.
/// ARGV: the log's cap, the decisions' cap, the log entry's opening, the number of changes;
/// then per change (8): position, encoded state, deployed mode, deployed kept, and the first
/// argument and count of its decisions and of its deployed commits; then per agent (4): the
/// version read, its change (1-based), its part of the log entry and its incarnation; then
/// the lists' items.
const AGENTS_SCRIPT: &str = r#"
local changes = tonumber(ARGV[4])
local agents_at = 4 + 8 * changes
local written = {}
local entries = {}
local agents = (#KEYS - 1) / 3
-- Every check before any write: Redis keeps what a failing script wrote, so an error after
-- a write would leave an agent changed with no log entry for anyone to hear.
local versions = {}
-- Where each agent's arguments and its change's arguments start.
local agent_at, change_at = {}, {}
for i = 1, agents do
  local a = agents_at + 4 * (i - 1)
  local c = 4 + 8 * (tonumber(ARGV[a + 2]) - 1)
  agent_at[i], change_at[i] = a, c
  local state = KEYS[3 * i - 2]
  local stored = redis.call('HMGET', state, 'v', 'p', 'i')
  local v = versions[state] or tonumber(stored[1] or '0')
  -- Incarnations are compared as the decimal texts Rust wrote: Lua's numbers are doubles.
  local held, mine = stored[3] or '0', ARGV[a + 4]
  if held ~= '0' and mine ~= '0' and held ~= mine then
    written[i] = -4
  elseif v ~= tonumber(ARGV[a + 1]) then
    written[i] = -2
  elseif tonumber(stored[2] or '0') > tonumber(ARGV[c + 1]) then
    written[i] = -3
  else
    -- The lists this write touches: the decisions if it adds any, the deployed set if its
    -- mode changes it.
    local lists = {}
    if tonumber(ARGV[c + 6]) > 0 then lists[#lists + 1] = KEYS[3 * i - 1] end
    if ARGV[c + 3] ~= '' then lists[#lists + 1] = KEYS[3 * i] end
    for _, list in ipairs(lists) do
      local kind = redis.call('TYPE', list)['ok']
      if kind ~= 'none' and kind ~= 'list' then
        return redis.error_reply('WRONGTYPE ' .. list .. ' holds a ' .. kind ..
          ', not a list: no agent of this step was written')
      end
    end
    written[i] = v + 1
    versions[state] = v + 1
  end
end
for i = 1, agents do
  if written[i] > 0 then
    local a, c = agent_at[i], change_at[i]
    local state, decisions, deployed = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
    redis.call('HSET', state, 'v', written[i], 'p', ARGV[c + 1], 'core', ARGV[c + 2])
    -- A writer without an incarnation (of a version that kept none) leaves the record's.
    if ARGV[a + 4] ~= '0' then redis.call('HSET', state, 'i', ARGV[a + 4]) end
    local first, count = tonumber(ARGV[c + 5]), tonumber(ARGV[c + 6])
    if count > 0 then
      local len = redis.call('RPUSH', decisions, unpack(ARGV, first, first + count - 1))
      local cap = tonumber(ARGV[2])
      if len > cap then redis.call('LTRIM', decisions, -cap, -1) end
    end
    local mode = ARGV[c + 3]
    if mode == 'replace' then redis.call('DEL', deployed) end
    if mode ~= '' then
      local keep = tonumber(ARGV[c + 4])
      first, count = tonumber(ARGV[c + 7]), tonumber(ARGV[c + 8])
      local len
      if count > 0 then
        len = redis.call('RPUSH', deployed, unpack(ARGV, first, first + count - 1))
      else
        len = redis.call('LLEN', deployed)
      end
      if keep <= 0 then
        redis.call('DEL', deployed)
      elseif len > keep then
        redis.call('LTRIM', deployed, -keep, -1)
      end
    end
    entries[#entries + 1] = ARGV[a + 3]
  end
end
if #entries > 0 then
  redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', ARGV[1], '*', 'm',
    ARGV[3] .. table.concat(entries, ',') .. ']}')
end
return written
"#;

/// Agents written by one run of the agents script: it blocks Redis while it runs, so a
/// fan-out to thousands of agents is split into steps of a few milliseconds.
const AGENTS_PER_SCRIPT: usize = 128;

/// Agents one evaluation writes at once: two full runs of the agents script.
const AGENTS_IN_FLIGHT: usize = 2 * AGENTS_PER_SCRIPT;

/// Takes or renews a lease held by nobody or by the caller.
const LEASE_SCRIPT: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Claims a commit status for posting: 1 when the caller may post it, 3 when it may but an
/// earlier claim was never finished (KEYS[2] marks a claim taken), 2 when it is shown
/// already, 4 when a later status is shown, 0 when another publisher is posting a status of
/// the agent on the commit. KEYS[3] holds what is shown per commit (ARGV[4]) as
/// `ShownStatus::encode` writes it: its order (ARGV[5]) sorts as text, its generation in the
/// first 20 digits scores the commit in KEYS[4]. KEYS[5] and on are where the previous
/// version marked this state, then the others, posted: for a commit with nothing shown
/// yet, this state alone was shown; with another, which was posted last only GitLab can
/// tell. Compared as `ShownStatus::against` does;
/// a state shown is known to be shown only without a claim left unfinished, which may have
/// posted another.
const BEGIN_STATUS_SCRIPT: &str = r#"
local held = redis.call('GET', KEYS[1])
if held ~= false and held ~= ARGV[1] then return 0 end
local shown = redis.call('HGET', KEYS[3], ARGV[4])
if not shown then
  local this, others = redis.call('GET', KEYS[5]) == 'posted', false
  for i = 6, #KEYS do others = others or redis.call('GET', KEYS[i]) == 'posted' end
  if this and not others then
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[5] .. ':' .. ARGV[6])
    redis.call('ZADD', KEYS[4], tonumber(string.sub(ARGV[5], 1, 20)), ARGV[4])
    return 2
  end
  if this or others then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
    return 3
  end
end
if shown then
  local order, state = string.sub(shown, 1, #ARGV[5]), string.sub(shown, #ARGV[5] + 2)
  if ARGV[5] < order then return 4 end
  if state == ARGV[6] then
    if redis.call('EXISTS', KEYS[2]) == 0 then
      if ARGV[5] > order then
        redis.call('HSET', KEYS[3], ARGV[4], ARGV[5] .. ':' .. ARGV[6])
        redis.call('ZADD', KEYS[4], tonumber(string.sub(ARGV[5], 1, 20)), ARGV[4])
      end
      return 2
    end
  elseif ARGV[5] == order then
    return 4
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then return 1 end
return 3
"#;

/// Ends a claim. Posted (ARGV[2] > 0): the status is remembered as shown unless a later one
/// is, the agent keeping the newest ARGV[3] commits' for ARGV[2] seconds after its last
/// post; the taken mark goes unless another publisher holds the claim now (this one's
/// lease ended), whose post may yet fail. Else released if the caller still holds it, its
/// mark left so that the next claimant looks before posting.
const FINISH_STATUS_SCRIPT: &str = r#"
local held = redis.call('GET', KEYS[1])
if tonumber(ARGV[2]) > 0 then
  local shown = redis.call('HGET', KEYS[3], ARGV[4])
  if not shown or string.sub(shown, 1, #ARGV[5]) < ARGV[5] then
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[5] .. ':' .. ARGV[6])
    redis.call('ZADD', KEYS[4], tonumber(string.sub(ARGV[5], 1, 20)), ARGV[4])
    local over = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[3])
    if over > 0 then
      local popped = redis.call('ZPOPMIN', KEYS[4], over)
      for i = 1, #popped, 2 do
        redis.call('HDEL', KEYS[3], popped[i])
      end
    end
  end
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  if held == false or held == ARGV[1] then redis.call('DEL', KEYS[2]) end
end
if held == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Raises a ref's facts position (KEYS[1], field `position`) to ARGV[1] if below; returns
/// the position now.
const RAISE_POSITION_SCRIPT: &str = r#"
local position = tonumber(redis.call('HGET', KEYS[1], 'position') or '0')
local floor = tonumber(ARGV[1])
if position < floor then
  redis.call('HSET', KEYS[1], 'position', ARGV[1])
  return floor
end
return position
"#;

/// Drops a lease if the caller holds it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
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
/// How often a publisher looks for entries a dead publisher took.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);
/// `XAUTOCLAIM` calls per shard and look, each over ten pending entries, before the look
/// moves on to the next shard.
const RECLAIM_SCANS: usize = 8;
/// Pending entries a stopping publisher hands back per call, and calls per shard: what a
/// long GitLab outage left unacknowledged beyond that waits out the takeover time.
const RELEASE_PAGE: usize = 100;
const RELEASE_PAGES: usize = 10;
/// The cursor `XAUTOCLAIM` starts a scan at and answers once it went through every entry.
const SCAN_DONE: &str = "0-0";

/// The Redis-backed store.
pub struct RedisStore {
    source: Source,
    conn: Conn,
    /// Webhooks' and ingest calls' facts only.
    ingest_conn: Conn,
    keys: Keys,
    fact: Script,
    agents_write: Script,
    lease: Script,
    release: Script,
    begin_status: Script,
    raise_position: Script,
    finish_status: Script,
    registry: Script,
    claim_agent: Script,
    drop_agent: Script,
    mark_alive: Script,
    silence: Script,
    forget_consumer: Script,
    report: Script,
    /// How long a status publisher that holds nothing and belongs to no live replica stays
    /// in the group.
    silent_consumers_forgotten_after: Duration,
    notices: broadcast::Sender<Notice>,
    /// The status publisher's own connection for its blocking reads; `None` until first used
    /// and after it failed.
    status_conn: Mutex<Option<Conn>>,
    /// Rung by the followers when they relay entries: a status publisher on a cluster,
    /// which cannot block on every shard at once, waits for it instead.
    relayed: Arc<Notify>,
    /// When this replica last looked for entries a dead publisher took.
    last_reclaim: Mutex<Option<Instant>>,
    /// Entries one read took from several shards at once, handed out one by one: each is
    /// already this replica's in the group, and would wait out the takeover time if dropped.
    status_taken: Mutex<VecDeque<TakenEntry>>,
    /// Per shard, where the last look for a dead publisher's entries stopped.
    reclaim_cursors: Mutex<Vec<String>>,
    /// On a cluster, the shard the status feed's next read begins at.
    next_shard_read: std::sync::atomic::AtomicUsize,
    /// Counts log entries trimmed before any status publisher read them.
    status_entries_lost: prometheus_client::metrics::counter::Counter,
    /// Per shard, where the status group stood when its loss was last counted, and how many
    /// were counted then.
    status_loss_counted: Mutex<HashMap<String, (EntryId, u64)>>,
    url_for_logs: String,
}

/// Where everything lives under the configured prefix.
#[derive(Clone)]
struct Keys {
    prefix: String,
    /// Each shard's hash-tagged prefix: every key of an agent or a ref starts with one, and
    /// an evaluation names thousands of keys.
    tags: Arc<[String]>,
}

impl Keys {
    fn new(prefix: String) -> Self {
        let tags = (0..SHARDS)
            .map(|shard| format!("{prefix}:{{gl{shard}}}"))
            .collect();
        Self { prefix, tags }
    }

    fn tag(&self, shard: u16) -> std::borrow::Cow<'_, str> {
        match self.tags.get(usize::from(shard)) {
            Some(tag) => tag.into(),
            None => format!("{}:{{gl{shard}}}", self.prefix).into(),
        }
    }

    fn log(&self, shard: u16) -> String {
        format!("{}:log", self.tag(shard))
    }

    fn logs(&self) -> Vec<String> {
        (0..SHARDS).map(|shard| self.log(shard)).collect()
    }

    fn shard_of_log(&self, log: &str) -> Option<u16> {
        (0..SHARDS).find(|shard| self.log(*shard) == log)
    }

    fn fact(&self, key: &RefKey, part: &str) -> String {
        format!(
            "{}:ref:{}:{}:{part}",
            self.tag(key.shard()),
            key.project,
            key.branch
        )
    }

    fn delivery(&self, key: &RefKey, delivery: &str) -> String {
        format!(
            "{}:delivery:{}:{}:{delivery}",
            self.tag(key.shard()),
            key.project,
            key.branch
        )
    }

    fn agent(&self, agent: &str, part: &str) -> String {
        format!("{}:agent:{agent}:{part}", self.tag(agent_shard(agent)))
    }

    fn presence(&self, replica: &str) -> String {
        format!("{}:presence:{{{replica}}}", self.prefix)
    }

    fn replicas(&self) -> String {
        format!("{}:replicas", self.prefix)
    }

    /// Replicas by the store's time of their last mark of life.
    fn alive(&self) -> String {
        format!("{}:alive", self.prefix)
    }

    fn lease(&self, shard: u16) -> String {
        format!("{}:lease", self.tag(shard))
    }

    fn layout(&self) -> String {
        format!("{}:layout", self.prefix)
    }

    /// The single change log of the previous layout.
    fn old_log(&self) -> String {
        format!("{}:log", self.prefix)
    }
}

impl RedisStore {
    /// Connects lazily (the server starts even while Redis is down) and starts following
    /// the change log until `shutdown`, keeping `metrics` of it.
    pub fn connect(
        settings: &RedisSettings,
        shutdown: CancellationToken,
        metrics: LogMetrics,
    ) -> Result<Self> {
        let source = Source::open(settings)?;
        let conn = source.shared()?;
        let ingest_conn = source.shared()?;
        let keys = Keys::new(settings.key_prefix.clone());
        let notices = broadcast::channel(4096).0;
        let relayed = Arc::new(Notify::new());
        // One server answers one read of every shard; a cluster refuses reads across
        // slots, so each shard gets a follower (and a connection) of its own.
        let followers: Vec<Vec<u16>> = if source.is_cluster() {
            (0..SHARDS).map(|shard| vec![shard]).collect()
        } else {
            vec![(0..SHARDS).collect()]
        };
        for shards in followers {
            let follower = Follower {
                source: source.clone(),
                logs: shards.iter().map(|shard| keys.log(*shard)).collect(),
                notices: notices.clone(),
                relayed: relayed.clone(),
                lag: metrics.lag.clone(),
            };
            tokio::spawn(
                follower
                    .run(shutdown.clone())
                    .instrument(info_span!("change_log")),
            );
        }
        let url_for_logs = if settings.cluster_nodes.is_empty() {
            crate::redact::url(&settings.url)
        } else {
            let nodes: Vec<String> = settings
                .cluster_nodes
                .iter()
                .map(|node| crate::redact::url(node))
                .collect();
            format!("cluster {}", nodes.join(", "))
        };
        Ok(Self {
            source,
            conn,
            ingest_conn,
            keys,
            fact: Script::new(FACT_SCRIPT),
            agents_write: Script::new(AGENTS_SCRIPT),
            lease: Script::new(LEASE_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            begin_status: Script::new(BEGIN_STATUS_SCRIPT),
            raise_position: Script::new(RAISE_POSITION_SCRIPT),
            finish_status: Script::new(FINISH_STATUS_SCRIPT),
            registry: Script::new(REGISTRY_SCRIPT),
            claim_agent: Script::new(CLAIM_AGENT_SCRIPT),
            drop_agent: Script::new(DROP_AGENT_SCRIPT),
            mark_alive: Script::new(MARK_ALIVE_SCRIPT),
            silence: Script::new(SILENCE_SCRIPT),
            forget_consumer: Script::new(FORGET_CONSUMER_SCRIPT),
            report: Script::new(REPORT_SCRIPT),
            silent_consumers_forgotten_after: Duration::from_secs(PRESENCE_TTL_SECS),
            notices,
            status_conn: Mutex::new(None),
            relayed,
            last_reclaim: Mutex::new(None),
            status_taken: Mutex::new(VecDeque::new()),
            reclaim_cursors: Mutex::new(vec![SCAN_DONE.to_owned(); usize::from(SHARDS)]),
            next_shard_read: std::sync::atomic::AtomicUsize::new(0),
            status_entries_lost: metrics.status_entries_lost,
            status_loss_counted: Mutex::new(HashMap::new()),
            url_for_logs,
        })
    }

    /// Keeps status publishers that hold nothing and belong to no live replica in the group
    /// for `after` rather than as long as a presence record lives; tests shorten it.
    pub fn forget_silent_consumers_after(mut self, after: Duration) -> Self {
        self.silent_consumers_forgotten_after = after;
        self
    }

    /// Refuses data of another layout under the prefix, and marks an empty prefix as this
    /// layout's: a server must never read or extend state it would misunderstand.
    pub async fn check_layout(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let marker: Option<String> = conn.get(self.keys.layout()).await?;
        match marker.as_deref() {
            Some(LAYOUT_VERSION) => return Ok(()),
            Some(other) => {
                return Err(StoreError::OldLayout {
                    prefix: self.keys.prefix.clone(),
                    found: format!("layout version {other}"),
                });
            }
            None => {}
        }
        let old: bool = conn.exists(self.keys.old_log()).await?;
        if old {
            return Err(StoreError::OldLayout {
                prefix: self.keys.prefix.clone(),
                found: format!("the single change log {}", self.keys.old_log()),
            });
        }
        let _: () = conn.set_nx(self.keys.layout(), LAYOUT_VERSION).await?;
        Ok(())
    }

    fn encode(&self, message: &Broadcast) -> Result<String> {
        log_json(message)
    }

    /// Runs the agents script for the writes of `writes` at `members`, all of agents of
    /// `shard`; returns what became of each, by its index.
    async fn write_agents_of_shard(
        &self,
        writes: &AgentWrites<'_>,
        encoded: &[EncodedChange<'_>],
        shard: u16,
        members: &[usize],
    ) -> Result<Vec<(usize, Written)>> {
        // The changes these agents write, numbered from 1 as the script counts them.
        let mut numbers: HashMap<usize, usize> = HashMap::new();
        let mut used: Vec<&EncodedChange<'_>> = Vec::new();
        let mut agents: Vec<(&QueuedWrite<'_>, usize)> = Vec::with_capacity(members.len());
        for &at in members {
            let write = &writes.agents()[at];
            let number = *numbers.entry(write.change).or_insert_with(|| {
                used.push(&encoded[write.change]);
                used.len()
            });
            agents.push((write, number));
        }
        let logged: Vec<&str> = used.iter().map(|change| change.logged.as_str()).collect();
        let opening = format!(
            r#"{{"kind":"agents_changed","changes":[{}],"agents":["#,
            logged.join(",")
        );
        let mut invocation = self.agents_write.prepare_invoke();
        for (write, _) in &agents {
            invocation
                .key(self.keys.agent(write.agent, "state"))
                .key(self.keys.agent(write.agent, "decisions"))
                .key(self.keys.agent(write.agent, "deployed"));
        }
        invocation
            .key(self.keys.log(shard))
            .arg(LOG_MAX_ENTRIES)
            .arg(DECISION_HISTORY)
            .arg(opening)
            .arg(used.len());
        // The lists' items follow the fixed arguments.
        let mut item = 4 + 8 * used.len() + 4 * agents.len() + 1;
        for change in &used {
            invocation
                .arg(change.position)
                .arg(&change.core)
                .arg(change.mode)
                .arg(change.keep)
                .arg(item)
                .arg(change.decisions.len());
            item += change.decisions.len();
            invocation.arg(item).arg(change.deployed.len());
            item += change.deployed.len();
        }
        for (write, number) in &agents {
            let entry = log_json(&ChangedAgent {
                agent: write.agent.to_owned(),
                // A successful conditional write stores exactly the next version.
                version: write.expected + 1,
                change: number - 1,
                incarnation: write.incarnation,
            })?;
            invocation
                .arg(write.expected)
                .arg(number)
                .arg(entry)
                .arg(write.incarnation);
        }
        for change in &used {
            for decision in &change.decisions {
                invocation.arg(decision);
            }
            for sha in change.deployed {
                invocation.arg(sha.as_str());
            }
        }
        let results: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
        if results.len() != members.len() {
            return Err(StoreError::Corrupt {
                key: self.keys.log(shard),
                reason: format!(
                    "the agents script answered {} results for {} agents",
                    results.len(),
                    members.len()
                ),
            });
        }
        Ok(members
            .iter()
            .zip(results)
            .map(|(at, result)| {
                let written = match result {
                    -2 => Written::Conflict,
                    -3 => Written::Stale,
                    -4 => Written::Replaced,
                    version => Written::Saved {
                        version: version.unsigned_abs(),
                    },
                };
                (*at, written)
            })
            .collect())
    }

    /// The status publisher's connection, made on first use.
    async fn status_connection(&self) -> Result<Conn> {
        let mut held = self.status_conn.lock().await;
        if let Some(conn) = held.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.source.blocking(STATUS_BLOCK).await?;
        *held = Some(conn.clone());
        Ok(conn)
    }

    async fn forget_status_connection(&self) {
        *self.status_conn.lock().await = None;
    }

    /// Creates the status group of every shard that lacks it, at the log's first entry:
    /// what was appended before any publisher asked still gets its statuses (those already
    /// posted are recognised and skipped). Created again after Redis lost its data.
    async fn ensure_status_groups(&self) -> Result<()> {
        for log in self.keys.logs() {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&log)
                .arg(STATUS_GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn.clone())
                .await;
            if let Err(error) = created
                && error.code() != Some("BUSYGROUP")
            {
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// An entry of a dead publisher, if one waited longer than `reclaim_after`; looked for
    /// every few seconds, not on every read.
    async fn reclaim(&self, consumer: &str, reclaim_after: Duration) -> Result<Option<LogEntry>> {
        {
            let mut last = self.last_reclaim.lock().await;
            // Often enough that a takeover waits hardly longer than `reclaim_after`.
            let every = RECLAIM_EVERY.min(reclaim_after / 2);
            if last.is_some_and(|at| at.elapsed() < every) {
                return Ok(None);
            }
            *last = Some(Instant::now());
        }
        // Counting is for the operator: a failure to count must not hold statuses back.
        if let Err(error) = self.count_status_entries_lost().await {
            warn!(%error, "cannot count status entries trimmed unread");
        }
        let min_idle = millis(reclaim_after);
        let handed_back = match self.hand_back_for_the_dead(consumer, min_idle).await {
            Ok(handed_back) => handed_back,
            Err(error) => {
                warn!(%error, "cannot look for status publishers of dead replicas");
                Vec::new()
            }
        };
        // The scan of a shard goes on from the oldest entry handed back there (inclusive),
        // not from the start, where live publishers' entries could fill this look.
        let mut oldest: HashMap<usize, (EntryId, String)> = HashMap::new();
        for (shard, id) in handed_back {
            let Some(parsed) = EntryId::parse(&id) else {
                continue;
            };
            match oldest.get(&shard) {
                Some((held, _)) if *held <= parsed => {}
                _ => {
                    oldest.insert(shard, (parsed, id));
                }
            }
        }
        let mut cursors = self.reclaim_cursors.lock().await;
        for (shard, (_, id)) in oldest {
            if let Some(cursor) = cursors.get_mut(shard) {
                *cursor = id;
            }
        }
        for (shard, log) in self.keys.logs().iter().enumerate() {
            let Some(cursor) = cursors.get_mut(shard) else {
                continue;
            };
            // Each call looks at ten pending entries at most: entries held by live
            // publishers ahead of a dead one's would hide it if every look began at the
            // start, so the scan goes on where the last one stopped.
            for _ in 0..RECLAIM_SCANS {
                let reclaimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(log)
                    .arg(STATUS_GROUP)
                    .arg(consumer)
                    .arg(min_idle)
                    .arg(cursor.as_str())
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut self.conn.clone())
                    .await?;
                *cursor = reclaimed.next_stream_id;
                self.count_pending_entries_trimmed(
                    log,
                    &reclaimed.deleted_ids,
                    reclaimed.invalid_entries,
                );
                if let Some(entry) = reclaimed.claimed.into_iter().next() {
                    // Others may wait too: look again on the next read.
                    *self.last_reclaim.lock().await = None;
                    return Ok(Some(self.entry(shard as u16, entry)));
                }
                if cursor.as_str() == SCAN_DONE {
                    break;
                }
            }
        }
        Ok(None)
    }

    /// Hands back what the status publishers of dead replicas hold, for the next look to
    /// take at once rather than after the takeover time (`idle` ms); returns each shard
    /// where it did with the oldest entry handed back. A replica is dead once its mark of
    /// life ([`PresenceStore::mark_alive`]) is older than [`REPLICA_SILENT`]. One without a
    /// mark is left to the takeover time: a replica of a version that did not mark itself,
    /// or one silent so long that its mark is gone. Consumers of those and of dead replicas
    /// that hold nothing and have been silent as long as a presence record lives leave the
    /// group: every replica's start names a new one, and each look lists them all.
    async fn hand_back_for_the_dead(&self, me: &str, idle: u64) -> Result<Vec<(usize, String)>> {
        let logs = self.keys.logs();
        let held: Vec<Vec<StreamInfoConsumer>> =
            futures_util::future::try_join_all(logs.iter().map(|log| async move {
                let reply: redis::RedisResult<StreamInfoConsumersReply> = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(log)
                    .arg(STATUS_GROUP)
                    .query_async(&mut self.conn.clone())
                    .await;
                match reply {
                    Ok(reply) => Ok(reply.consumers),
                    // No publisher has read this shard yet.
                    Err(error) if error.code() == Some("NOGROUP") => Ok(Vec::new()),
                    Err(error) => Err(StoreError::from(error)),
                }
            }))
            .await?;
        let others: Vec<&str> = {
            let mut names: Vec<&str> = held
                .iter()
                .flatten()
                .map(|consumer| consumer.name.as_str())
                .filter(|name| *name != me)
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        };
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mut asked = self.silence.prepare_invoke();
        asked.key(self.keys.alive()).arg(millis(REPLICA_SILENT));
        for name in &others {
            asked.arg(*name);
        }
        let told: Vec<i64> = asked.invoke_async(&mut self.conn.clone()).await?;
        let liveness: HashMap<&str, Liveness> = others
            .into_iter()
            .zip(told.into_iter().map(Liveness::from_script))
            .collect();
        let forgotten_after = millis(self.silent_consumers_forgotten_after);
        let mut handed_back = Vec::new();
        for (shard, (log, consumers)) in logs.iter().zip(&held).enumerate() {
            for consumer in consumers {
                let Some(liveness) = liveness.get(consumer.name.as_str()) else {
                    continue;
                };
                if consumer.pending > 0 && *liveness == Liveness::Dead {
                    info!(
                        replica = consumer.name,
                        entries = consumer.pending,
                        log,
                        "handing back the status entries of a dead replica"
                    );
                    if let Some(oldest) = self.release_from_shard(log, &consumer.name, idle).await?
                    {
                        handed_back.push((shard, oldest));
                    }
                } else if consumer.pending == 0
                    && *liveness != Liveness::Alive
                    && u64::try_from(consumer.idle).unwrap_or(u64::MAX) >= forgotten_after
                {
                    // Checked again where no read can come in between: a consumer leaving
                    // the group takes what it holds out of it, and those statuses would be
                    // lost.
                    let _: i64 = self
                        .forget_consumer
                        .key(log)
                        .arg(STATUS_GROUP)
                        .arg(&consumer.name)
                        .arg(forgotten_after)
                        .invoke_async(&mut self.conn.clone())
                        .await?;
                }
            }
        }
        Ok(handed_back)
    }

    /// Counts, and warns of, entries taken by a publisher that left them unacknowledged
    /// (its replica died, or GitLab kept failing) and trimmed since: Redis drops them from
    /// the group when a takeover meets them, and their statuses are lost.
    fn count_pending_entries_trimmed(&self, log: &str, deleted: &[String], unreadable: bool) {
        // Redis drops them whether or not their publisher is still posting them, so some
        // counted may yet be posted.
        self.count_status_entries_lost_to_trim(
            log,
            deleted.len() as u64,
            "their status publisher finished them",
        );
        if unreadable {
            // Redis before 7.0 hands such entries over as nil and keeps them pending.
            warn!(
                log,
                "change log entries were trimmed before their status publisher finished them \
                 (Redis before 7.0 keeps them pending; their commit statuses may not be posted)"
            );
        }
    }

    /// Counts, and warns of, entries each shard trimmed before the status group read them:
    /// their statuses are lost, and the group reads on from the oldest entry kept, so each
    /// is counted once.
    async fn count_status_entries_lost(&self) -> Result<()> {
        // Every shard at once: on the shared connection the 32 questions go out together,
        // one round trip rather than 32 in a row holding the status feed up.
        let logs = self.keys.logs();
        let read = futures_util::future::try_join_all(logs.iter().map(|log| async move {
            let mut conn = self.conn.clone();
            let Some(stream) = stream_info(&mut conn, log).await? else {
                return Ok::<_, StoreError>(None);
            };
            let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(log)
                .query_async(&mut conn)
                .await?;
            let delivered = groups
                .groups
                .into_iter()
                .find(|group| group.name == STATUS_GROUP)
                .map(|group| StatusGroupRead {
                    last_delivered: EntryId::parse(&group.last_delivered_id).unwrap_or_default(),
                    entries_read: group.entries_read.map(|read| read as u64),
                });
            Ok(delivered.map(|delivered| (stream, delivered)))
        }))
        .await?;
        for (log, read) in logs.iter().zip(read) {
            let Some((stream, delivered)) = read else {
                continue;
            };
            let lost = {
                // Until the group reads on, later looks see the same loss, or more of it.
                let mut counted = self.status_loss_counted.lock().await;
                delivered.newly_lost(&stream, counted.entry(log.clone()).or_default())
            };
            self.count_status_entries_lost_to_trim(log, lost, "a status publisher read them");
        }
        Ok(())
    }

    /// Counts, and warns of, `lost` entries of `log` trimmed before `what_then` happened.
    fn count_status_entries_lost_to_trim(&self, log: &str, lost: u64, what_then: &str) {
        if lost > 0 {
            warn!(
                log,
                lost,
                "change log entries were trimmed before {what_then}; their commit statuses \
                 are not posted unless a publisher is posting them now"
            );
            self.status_entries_lost.inc_by(lost);
        }
    }

    /// Hands back what `consumer` holds of `log`, page by page, marked idle for `idle` ms;
    /// returns the oldest entry handed back, if any.
    async fn release_from_shard(
        &self,
        log: &str,
        consumer: &str,
        idle: u64,
    ) -> Result<Option<String>> {
        let mut first = None;
        let mut after = "-".to_owned();
        for _ in 0..RELEASE_PAGES {
            let pending: redis::RedisResult<StreamPendingCountReply> = redis::cmd("XPENDING")
                .arg(log)
                .arg(STATUS_GROUP)
                .arg(&after)
                .arg("+")
                .arg(RELEASE_PAGE)
                .arg(consumer)
                .query_async(&mut self.conn.clone())
                .await;
            let pending = match pending {
                // No publisher has read this shard yet: nothing is held.
                Err(error) if error.code() == Some("NOGROUP") => return Ok(None),
                other => other?,
            };
            let Some(last) = pending.ids.last() else {
                break;
            };
            if first.is_none() {
                first = pending.ids.first().map(|held| held.id.clone());
            }
            after = format!("({}", last.id);
            let mut claims = redis::pipe();
            for held in &pending.ids {
                // Only while it is still as idle as it was seen: one another publisher took
                // over since was delivered again, and stays with that publisher.
                claims
                    .cmd("XCLAIM")
                    .arg(log)
                    .arg(STATUS_GROUP)
                    .arg(consumer)
                    .arg(held.last_delivered_ms)
                    .arg(&held.id)
                    .arg("IDLE")
                    .arg(idle)
                    .arg("JUSTID")
                    .ignore();
            }
            claims.exec_async(&mut self.conn.clone()).await?;
            if pending.ids.len() < RELEASE_PAGE {
                break;
            }
        }
        Ok(first)
    }

    async fn take_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>> {
        // First what an earlier read took along, before its half of the takeover time is
        // up; then what a publisher took and never acknowledged: its replica died, or it is
        // this replica's own from before a restart.
        if let Some(entry) = self.taken_earlier(consumer, reclaim_after).await {
            return Ok(Some(entry));
        }
        if let Some(entry) = self.reclaim(consumer, reclaim_after).await? {
            return Ok(Some(entry));
        }
        if self.source.is_cluster() {
            return self.take_from_each_shard(consumer).await;
        }
        let mut conn = self.status_connection().await?;
        let logs = self.keys.logs();
        // COUNT is per stream: a read finding entries on several shards takes one of each.
        let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(STATUS_GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(STATUS_BLOCK))
            .arg("STREAMS")
            .arg(&logs)
            .arg(vec![">"; logs.len()])
            .query_async(&mut conn)
            .await?;
        let taken_at = Instant::now();
        let mut entries = read
            .map(|reply| reply.keys)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|key| {
                let shard = self.keys.shard_of_log(&key.key)?;
                let entry = key.ids.into_iter().next()?;
                Some(self.entry(shard, entry))
            });
        let first = entries.next();
        self.status_taken
            .lock()
            .await
            .extend(entries.map(|entry| TakenEntry {
                consumer: consumer.to_owned(),
                taken_at,
                entry,
            }));
        Ok(first)
    }

    /// The oldest entry an earlier read took for `consumer` and did not hand out yet. One
    /// held for half the takeover time is left to be taken over (by any publisher, this
    /// one too): handed out now, it could be posted while another replica takes it over.
    async fn taken_earlier(&self, consumer: &str, reclaim_after: Duration) -> Option<LogEntry> {
        let mut taken = self.status_taken.lock().await;
        while let Some(at) = taken.iter().position(|held| held.consumer == consumer) {
            let held = taken.remove(at)?;
            if held.taken_at.elapsed() < reclaim_after / 2 {
                return Some(held.entry);
            }
            debug!(
                id = held.entry.id,
                "a status entry waited too long behind others; left to be taken over"
            );
        }
        None
    }

    /// On a cluster, which refuses one read across slots: each shard in turn without
    /// blocking, then a wait for the followers to relay something new. Each read begins
    /// after the shard the last entry came from, so that a busy shard cannot hold the
    /// others' statuses back.
    async fn take_from_each_shard(&self, consumer: &str) -> Result<Option<LogEntry>> {
        let relayed = self.relayed.notified();
        let logs = self.keys.logs();
        let first = self
            .next_shard_read
            .load(std::sync::atomic::Ordering::Relaxed);
        for shard in (first..logs.len()).chain(0..first) {
            let Some(log) = logs.get(shard) else {
                continue;
            };
            let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(STATUS_GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg(log)
                .arg(">")
                .query_async(&mut self.conn.clone())
                .await?;
            let entry = read
                .and_then(|reply| reply.keys.into_iter().next())
                .and_then(|key| key.ids.into_iter().next());
            if let Some(entry) = entry {
                self.next_shard_read.store(
                    (shard + 1) % logs.len(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                return Ok(Some(self.entry(shard as u16, entry)));
            }
        }
        let _ = tokio::time::timeout(STATUS_BLOCK, relayed).await;
        Ok(None)
    }

    /// A log entry as read; one this version cannot decode is handed over as a message
    /// nobody acts on, so that it is still acknowledged and never read again.
    fn entry(&self, shard: u16, entry: StreamId) -> LogEntry {
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
            id: format!("{shard}/{}", entry.id),
            message,
        }
    }

    /// The claim of `status`'s agent on its commit, its taken mark, the agent's hash of
    /// statuses shown with its index by generation, and where the previous version marked
    /// each state posted, this one's first (they expire within `STATUS_MEMORY_SECS`).
    fn status_keys(&self, status: &StatusKey<'_>) -> Vec<String> {
        let claim = self
            .keys
            .agent(status.agent, &format!("status:{}", status.sha));
        let taken = format!("{claim}:taken");
        let mut keys = vec![
            self.keys.agent(status.agent, SHOWN_STATUSES),
            self.keys.agent(status.agent, SHOWN_STATUSES_ORDER),
            // This state's first, then the others'.
            format!("{claim}:{}", status.state),
        ];
        keys.extend(
            STATES_POSTED_BEFORE
                .iter()
                .filter(|state| **state != status.state)
                .map(|state| format!("{claim}:{state}")),
        );
        keys.splice(0..0, [claim, taken]);
        keys
    }

    fn agent_reads(&self, pipe: &mut redis::Pipeline, agent: &str) {
        pipe.cmd("HMGET")
            .arg(self.keys.agent(agent, "state"))
            .arg("v")
            .arg("core")
            .arg("i")
            .lrange(self.keys.agent(agent, "decisions"), 0, -1)
            .lrange(self.keys.agent(agent, "deployed"), 0, -1);
    }

    fn decode_agent(
        &self,
        agent: &str,
        (version, core, incarnation): (Option<u64>, Option<Vec<u8>>, Option<u64>),
        decisions: Vec<Vec<u8>>,
        deployed: Vec<String>,
    ) -> Result<AgentRead> {
        let (version, incarnation) = (version.unwrap_or(0), incarnation.unwrap_or(0));
        let Some(core) = core else {
            return Ok(AgentRead {
                version,
                incarnation,
                value: AgentState::default(),
            });
        };
        let key = self.keys.agent(agent, "state");
        let decisions = decisions
            .iter()
            .map(|d| records::decode_decision(&key, d))
            .collect::<Result<Vec<_>>>()?;
        let deployed_key = self.keys.agent(agent, "deployed");
        let deployed = deployed
            .iter()
            .map(|sha| records::decode_deployed(&deployed_key, sha.as_bytes()))
            .collect::<Result<Vec<_>>>()?;
        Ok(AgentRead {
            version,
            incarnation,
            value: records::decode_agent(&key, &core, decisions, deployed)?,
        })
    }
}

#[async_trait]
impl FactStore for RedisStore {
    async fn record_fact(
        &self,
        key: &RefKey,
        fact: &FactRecord,
        delivery: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Ingested> {
        let (delivery_key, ttl) = match delivery {
            Some(id) => (
                self.keys.delivery(key, id),
                DELIVERY_MEMORY_SECS.to_string(),
            ),
            None => (self.keys.fact(key, "meta"), String::new()),
        };
        let mut extra = match fact {
            FactRecord::Rejected(rejected) => {
                format!(",\"rejected\":{}", records::encode_rejected(rejected))
            }
            _ => String::new(),
        };
        extra.push_str(&format!(",\"at_ms\":{}", now_ms()));
        if let Some(trace) = traceparent {
            let trace = serde_json::to_string(trace).unwrap_or_default();
            extra.push_str(&format!(",\"traceparent\":{trace}"));
        }
        let (kind, payload, field, stages, cap) = match fact {
            FactRecord::Push(push) => (
                "push",
                records::encode_push(push),
                String::new(),
                String::new(),
                PUSHES_KEPT,
            ),
            FactRecord::Pipeline { sha, pipeline } => {
                let (head, stages) = records::encode_pipeline(pipeline);
                let field = records::pipeline_field(sha, pipeline.id);
                ("pipeline", head, field, stages, 0)
            }
            FactRecord::Rejected(rejected) => (
                "rejected",
                records::encode_rejected(rejected),
                String::new(),
                String::new(),
                MAX_REJECTED,
            ),
        };
        let key_json = serde_json::to_string(key).map_err(|error| StoreError::Corrupt {
            key: key.to_string(),
            reason: error.to_string(),
        })?;
        let result: i64 = self
            .fact
            .key(delivery_key)
            .key(self.keys.fact(key, "meta"))
            .key(self.keys.fact(key, "pushes"))
            .key(self.keys.fact(key, "pipelines"))
            .key(self.keys.fact(key, "rejected"))
            .key(self.keys.log(key.shard()))
            .arg(ttl)
            .arg(kind)
            .arg(payload)
            .arg(field)
            .arg(stages)
            .arg(cap)
            .arg(LOG_MAX_ENTRIES)
            .arg(key_json)
            .arg(extra)
            .invoke_async(&mut self.ingest_conn.clone())
            .await?;
        Ok(match result {
            -1 => Ingested::Duplicate,
            0 => Ingested::Unchanged,
            position => Ingested::Recorded {
                position: position.unsigned_abs(),
            },
        })
    }

    async fn facts(&self, key: &RefKey) -> Result<Facts> {
        type Read = (
            Option<u64>,
            Vec<String>,
            HashMap<String, String>,
            Vec<Vec<u8>>,
        );
        let (position, pushes, pipelines, rejected): Read = redis::pipe()
            .hget(self.keys.fact(key, "meta"), "position")
            .lrange(self.keys.fact(key, "pushes"), 0, -1)
            .hgetall(self.keys.fact(key, "pipelines"))
            .lrange(self.keys.fact(key, "rejected"), 0, -1)
            .query_async(&mut self.conn.clone())
            .await?;
        let where_ = key.to_string();
        let mut records = Vec::new();
        for (field, head) in &pipelines {
            if field.ends_with(":stages") {
                continue;
            }
            let stages = pipelines.get(&format!("{field}:stages"));
            records.push(records::decode_pipeline(
                &where_,
                field,
                head,
                stages.map(String::as_str),
            )?);
        }
        records.sort_by(|a, b| (&a.0, a.1.id).cmp(&(&b.0, b.1.id)));
        Ok(Facts {
            position: position.unwrap_or(0),
            pushes: pushes
                .iter()
                .map(|push| records::decode_push(&where_, push))
                .collect::<Result<_>>()?,
            pipelines: records,
            rejected: rejected
                .iter()
                .map(|r| records::decode_rejected(&where_, r))
                .collect::<Result<_>>()?,
        })
    }

    async fn pipeline(&self, key: &RefKey, sha: &Sha, id: u64) -> Result<Option<Pipeline>> {
        let field = records::pipeline_field(sha, id);
        let (head, stages): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.fact(key, "pipelines"))
            .arg(&field)
            .arg(format!("{field}:stages"))
            .query_async(&mut self.conn.clone())
            .await?;
        let Some(head) = head else { return Ok(None) };
        let (_, pipeline) =
            records::decode_pipeline(&key.to_string(), &field, &head, stages.as_deref())?;
        Ok(Some(pipeline))
    }

    async fn forget_pipelines(&self, key: &RefKey, forget: &[(Sha, u64)]) -> Result<()> {
        if forget.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = forget
            .iter()
            .flat_map(|(sha, id)| {
                let field = records::pipeline_field(sha, *id);
                [format!("{field}:stages"), field]
            })
            .collect();
        let _: i64 = self
            .conn
            .clone()
            .hdel(self.keys.fact(key, "pipelines"), fields)
            .await?;
        Ok(())
    }

    async fn raise_position(&self, key: &RefKey, at_least: u64) -> Result<u64> {
        let position: u64 = self
            .raise_position
            .key(self.keys.fact(key, "meta"))
            .arg(at_least)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(position)
    }
}

#[async_trait]
impl AgentStore for RedisStore {
    async fn agent(&self, agent: &str) -> Result<AgentRead> {
        let mut states = self.agents(&[agent.to_owned()]).await?;
        Ok(states.pop().unwrap_or_default())
    }

    async fn agents(&self, agents: &[String]) -> Result<Vec<AgentRead>> {
        type Read = (
            (Option<u64>, Option<Vec<u8>>, Option<u64>),
            Vec<Vec<u8>>,
            Vec<String>,
        );
        // One pipeline per shard (a cluster refuses one across slots), in bounded batches:
        // one round trip each, without one reply holding every agent.
        let mut by_shard: HashMap<u16, Vec<(usize, &String)>> = HashMap::new();
        for (at, agent) in agents.iter().enumerate() {
            by_shard
                .entry(agent_shard(agent))
                .or_default()
                .push((at, agent));
        }
        let mut found: Vec<Option<AgentRead>> = vec![None; agents.len()];
        let batches = by_shard.values().flat_map(|members| members.chunks(256));
        for members in batches {
            let batch: Vec<String> = members.iter().map(|(_, agent)| (*agent).clone()).collect();
            let mut states = Vec::with_capacity(batch.len());
            let mut pipe = redis::pipe();
            for agent in &batch {
                self.agent_reads(&mut pipe, agent);
            }
            let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
            let mut replies = replies.into_iter();
            for agent in &batch {
                let (Some(core), Some(decisions), Some(deployed)) =
                    (replies.next(), replies.next(), replies.next())
                else {
                    return Err(StoreError::Corrupt {
                        key: self.keys.agent(agent, "state"),
                        reason: "short reply".into(),
                    });
                };
                let corrupt = |error: redis::ParsingError| StoreError::Corrupt {
                    key: self.keys.agent(agent, "state"),
                    reason: error.to_string(),
                };
                let read: Read = (
                    redis::from_redis_value(core).map_err(corrupt)?,
                    redis::from_redis_value(decisions).map_err(corrupt)?,
                    redis::from_redis_value(deployed).map_err(corrupt)?,
                );
                states.push(self.decode_agent(agent, read.0, read.1, read.2)?);
            }
            for ((at, _), state) in members.iter().zip(states) {
                found[*at] = Some(state);
            }
        }
        Ok(found.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn write_agents_telling(
        &self,
        writes: &AgentWrites<'_>,
        told: &mut Told<'_>,
    ) -> Result<Vec<Written>> {
        // What each change stores, encoded once however many agents write it.
        let encoded: Vec<EncodedChange> = writes
            .changes()
            .iter()
            .map(EncodedChange::new)
            .collect::<Result<_>>()?;
        // One script per shard's slot, and one log entry per script.
        let mut by_shard: HashMap<u16, Vec<usize>> = HashMap::new();
        for (at, write) in writes.agents().iter().enumerate() {
            by_shard
                .entry(agent_shard(write.agent))
                .or_default()
                .push(at);
        }
        let steps: Vec<(u16, &[usize])> = by_shard
            .iter()
            .flat_map(|(shard, members)| {
                members
                    .chunks(AGENTS_PER_SCRIPT)
                    .map(move |chunk| (*shard, chunk))
            })
            .collect();
        // In waves of at most two full runs' worth of agents. A fan-out to thousands of
        // agents sent at once encoded every run in one burst and queued all of them on
        // Redis's single thread; webhooks arriving meanwhile were answered a quarter slower
        // (docs/BENCHMARKS.md). A few agents spread over every shard still go in one round
        // trip. Every run is made even when another fails, so that one broken agent does
        // not hold back the others' shards.
        let mut waves: Vec<Vec<(u16, &[usize])>> = Vec::new();
        let mut in_wave = 0;
        for step in steps {
            if waves.is_empty() || in_wave + step.1.len() > AGENTS_IN_FLIGHT {
                waves.push(Vec::new());
                in_wave = 0;
            }
            in_wave += step.1.len();
            if let Some(wave) = waves.last_mut() {
                wave.push(step);
            }
        }
        let mut written = vec![Written::Withheld; writes.agents().len()];
        let mut failure = None;
        let mut stopped = false;
        for wave in waves {
            if stopped {
                break;
            }
            let mut runs: FuturesUnordered<_> = wave
                .into_iter()
                .map(|(shard, members)| {
                    self.write_agents_of_shard(writes, &encoded, shard, members)
                })
                .collect();
            while let Some(result) = runs.next().await {
                match result {
                    Ok(outcomes) => {
                        for &(at, outcome) in &outcomes {
                            written[at] = outcome;
                        }
                        // A step already under way is finished and told all the same.
                        stopped |= told(&outcomes).is_break();
                    }
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(written),
        }
    }

    async fn give_agent(&self, agent: &str, from: u64, to: u64) -> Result<bool> {
        self.claim_agent_state(agent, to, Some(from)).await
    }

    async fn set_sync_errors(&self, errors: &[(&str, Option<&SyncError>)]) -> Result<()> {
        // Per shard (a cluster answers a command from one slot), one MSET of the errors and
        // one DEL of the clears: a fan-out clears every agent it reached, and a command per
        // agent cost both sides more than the keys themselves.
        #[derive(Default)]
        struct ShardNotes {
            set: Vec<(String, String)>,
            cleared: Vec<String>,
        }
        let mut by_shard: HashMap<u16, ShardNotes> = HashMap::new();
        for (agent, error) in errors {
            let key = self.keys.agent(agent, "sync_error");
            let notes = by_shard.entry(agent_shard(agent)).or_default();
            match error {
                Some(error) => notes.set.push((key, log_json(error)?)),
                None => notes.cleared.push(key),
            }
        }
        futures_util::future::try_join_all(by_shard.values().map(|notes| {
            let mut pipe = redis::pipe();
            if !notes.set.is_empty() {
                pipe.mset(&notes.set).ignore();
            }
            if !notes.cleared.is_empty() {
                pipe.del(&notes.cleared).ignore();
            }
            async move { pipe.exec_async(&mut self.conn.clone()).await }
        }))
        .await?;
        Ok(())
    }

    async fn sync_error(&self, agent: &str) -> Result<Option<SyncError>> {
        let key = self.keys.agent(agent, "sync_error");
        let json: Option<String> = self.conn.clone().get(&key).await?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                key,
                reason: e.to_string(),
            })
        })
        .transpose()
    }
}

#[async_trait]
impl ReportStore for RedisStore {
    async fn push_report(
        &self,
        agent: &str,
        incarnation: u64,
        report: &[u8],
        keep: usize,
    ) -> Result<Reported> {
        let stop = isize::try_from(keep).unwrap_or(isize::MAX) - 1;
        let message = self.encode(&Broadcast::Report {
            agent: agent.to_owned(),
            report: report.to_vec(),
            incarnation,
        })?;
        let kept: i64 = self
            .report
            .key(self.keys.agent(agent, "state"))
            .key(self.keys.agent(agent, "reports"))
            .key(self.keys.log(agent_shard(agent)))
            .arg(incarnation)
            .arg(report)
            .arg(stop)
            .arg(LOG_MAX_ENTRIES)
            .arg(message)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if kept == 1 {
            Reported::Kept
        } else {
            Reported::Replaced
        })
    }

    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        Ok(self
            .conn
            .clone()
            .lrange(self.keys.agent(agent, "reports"), 0, stop)
            .await?)
    }
}

#[async_trait]
impl PresenceStore for RedisStore {
    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()> {
        let key = self.keys.presence(replica);
        let message = self.encode(&Broadcast::Connection {
            agent: agent.to_owned(),
            connected,
            replica: replica.to_owned(),
        })?;
        // Three keys in three slots: no pipeline spans them on a cluster, and nothing here
        // needs to be atomic (presence expires, and the log entry only informs).
        let mut conn = self.conn.clone();
        if connected {
            redis::pipe()
                .hset(&key, agent, now_ms())
                .expire(&key, PRESENCE_TTL_SECS as i64)
                .exec_async(&mut conn)
                .await?;
            let _: i64 = conn.zadd(self.keys.replicas(), replica, now_ms()).await?;
        } else {
            let _: i64 = conn.hdel(&key, agent).await?;
        }
        let _: String = append_command(&self.keys.log(agent_shard(agent)), &message)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn refresh_presence(&self, replica: &str) -> Result<()> {
        let cutoff = now_ms() - (PRESENCE_TTL_SECS as i64) * 1000;
        let mut conn = self.conn.clone();
        let _: bool = conn
            .expire(self.keys.presence(replica), PRESENCE_TTL_SECS as i64)
            .await?;
        redis::pipe()
            .zadd(self.keys.replicas(), replica, now_ms())
            .zrembyscore(self.keys.replicas(), "-inf", cutoff)
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn mark_alive(&self, replica: &str) -> Result<()> {
        let _: i64 = self
            .mark_alive
            .key(self.keys.alive())
            .arg(replica)
            .arg(PRESENCE_TTL_SECS * 1000)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn all_presence(&self) -> Result<Vec<(String, String)>> {
        let cutoff = now_ms() - (PRESENCE_TTL_SECS as i64) * 1000;
        let mut conn = self.conn.clone();
        let replicas: Vec<String> = conn
            .zrangebyscore(self.keys.replicas(), cutoff, "+inf")
            .await?;
        let mut pairs = Vec::new();
        for replica in replicas {
            let agents: HashMap<String, String> =
                conn.hgetall(self.keys.presence(&replica)).await?;
            pairs.extend(agents.into_keys().map(|agent| (agent, replica.clone())));
        }
        Ok(pairs)
    }
}

#[async_trait]
impl ChangeLog for RedisStore {
    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    async fn next_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>> {
        match self.take_for_statuses(consumer, reclaim_after).await {
            Err(StoreError::Redis(error)) if error.code() == Some("NOGROUP") => {
                // First use, or Redis lost its data: what was taken from the lost data
                // (whose shown statuses and claims are gone too) is not handed out.
                self.status_taken.lock().await.clear();
                self.ensure_status_groups().await?;
                *self.last_reclaim.lock().await = None;
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

    async fn release_statuses(&self, consumer: &str, reclaim_after: Duration) -> Result<()> {
        self.status_taken
            .lock()
            .await
            .retain(|held| held.consumer != consumer);
        // Still the consumer's, but idle for the takeover time already: the next look of
        // any publisher for entries a dead one took takes them.
        let idle = millis(reclaim_after);
        // Every shard at once: the hand-back has a few seconds as the replica stops. One
        // shard's failure (a cluster node down) does not stop the others'.
        let logs = self.keys.logs();
        let released = futures_util::future::join_all(
            logs.iter()
                .map(|log| self.release_from_shard(log, consumer, idle)),
        )
        .await;
        released
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    async fn ack_statuses(&self, id: &str) -> Result<()> {
        let Some((shard, id)) = id
            .split_once('/')
            .and_then(|(shard, id)| Some((shard.parse::<u16>().ok()?, id)))
        else {
            return Ok(());
        };
        let _: i64 = redis::cmd("XACK")
            .arg(self.keys.log(shard))
            .arg(STATUS_GROUP)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn begin_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        lease: Duration,
    ) -> Result<StatusClaim> {
        let claimed: i64 = self
            .begin_status
            .key(self.status_keys(status).as_slice())
            .arg(format!("posting:{holder}"))
            .arg(millis(lease).max(1))
            .arg(STATUS_MEMORY_SECS)
            .arg(status.sha)
            .arg(status.order.sortable())
            .arg(status.state)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match claimed {
            1 => StatusClaim::Mine,
            2 => StatusClaim::Posted,
            3 => StatusClaim::Retaken,
            4 => StatusClaim::Superseded,
            _ => StatusClaim::InFlight,
        })
    }

    async fn finish_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        posted: bool,
    ) -> Result<()> {
        let _: i64 = self
            .finish_status
            .key(self.status_keys(status).as_slice())
            .arg(format!("posting:{holder}"))
            .arg(if posted { STATUS_MEMORY_SECS } else { 0 })
            .arg(SHOWN_STATUSES_KEPT)
            .arg(status.sha)
            .arg(status.order.sortable())
            .arg(status.state)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for RedisStore {
    async fn hold_lease(&self, shard: u16, replica: &str, ttl: Duration) -> Result<bool> {
        let held: i64 = self
            .lease
            .key(self.keys.lease(shard))
            .arg(replica)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(held == 1)
    }

    async fn release_lease(&self, shard: u16, replica: &str) -> Result<()> {
        let _: i64 = self
            .release
            .key(self.keys.lease(shard))
            .arg(replica)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "redis at {} (prefix {})",
            self.url_for_logs, self.keys.prefix
        )
    }
}

/// `value` as JSON for the change log.
fn log_json(value: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt {
        key: "change log entry".into(),
        reason: error.to_string(),
    })
}

/// A change as the agents script takes it, encoded once for all the agents writing it.
struct EncodedChange<'a> {
    position: u64,
    core: String,
    /// How the deployed list changes: `""` not at all, `append` or `replace`.
    mode: &'static str,
    keep: usize,
    decisions: Vec<String>,
    deployed: &'a [Sha],
    /// Its part of the log entry.
    logged: String,
}

impl<'a> EncodedChange<'a> {
    fn new(change: &AgentChange<'a>) -> Result<Self> {
        let (mode, deployed, keep): (&str, &[Sha], usize) = match change.deployed {
            DeployedChange::Unchanged => ("", &[], DEPLOYED_HISTORY),
            DeployedChange::Append { shas, keep } => ("append", shas, *keep),
            DeployedChange::Replace(shas) => ("replace", shas, shas.len()),
        };
        Ok(Self {
            position: change.state.position,
            core: records::encode_agent(change.state),
            mode,
            keep: keep.min(DEPLOYED_HISTORY),
            decisions: change
                .decisions
                .iter()
                .map(records::encode_decision)
                .collect(),
            deployed,
            logged: log_json(&DecidedChange::of(change))?,
        })
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

fn decode_entry(entry: &StreamId) -> Option<Broadcast> {
    let payload: Vec<u8> = entry.get(ENTRY_FIELD)?;
    Broadcast::decode(&payload)
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

/// Where one shard of the log stands, as [`resume_point`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogEnd {
    /// The newest id appended.
    newest: EntryId,
    /// The newest id ever deleted by `XDEL` (trimming does not count).
    max_deleted: EntryId,
    /// Whether the entry last read is still in the log (true when that was not asked).
    holds_last: bool,
}

impl LogEnd {
    /// Whether `last` must still be in the log for [`resume_point`] to resume from it. Its
    /// absence is what tells both losses apart from a log merely read on: Redis does not
    /// count trimming (`MAXLEN`) in the newest id deleted, and trims the oldest first, so
    /// entries after `last` were trimmed unread only if `last` went too; and a log that lost
    /// its data and took new entries since has newer ids and deleted nothing.
    fn must_hold(last: Option<EntryId>, newest: EntryId, max_deleted: EntryId) -> bool {
        last.is_some_and(|last| last != EntryId::default() && max_deleted < last && newest >= last)
    }
}

/// Decides how a follower that last read `last` (none on its first connection) goes on,
/// given where the log stands now.
fn resume_point(last: Option<EntryId>, end: LogEnd) -> Resume {
    match last {
        None => Resume::Resync(end.newest),
        Some(last) => match end.newest.cmp(&last) {
            Ordering::Less => Resume::Resync(end.newest),
            _ if end.max_deleted > last || !end.holds_last => Resume::Resync(end.newest),
            _ => Resume::From(last),
        },
    }
}

/// Where `log` stands for a follower that last read `last`: its newest id, the newest id
/// trimmed from it (zeros when it does not exist), and, when that is what tells, whether it
/// still holds `last`.
async fn log_end(conn: &mut Conn, log: &str, last: Option<EntryId>) -> redis::RedisResult<LogEnd> {
    let (newest, max_deleted) = log_position(conn, log).await?;
    let holds_last = match last {
        Some(last) if LogEnd::must_hold(Some(last), newest, max_deleted) => {
            let found: Vec<redis::Value> = redis::cmd("XRANGE")
                .arg(log)
                .arg(last.to_string())
                .arg(last.to_string())
                .query_async(conn)
                .await?;
            !found.is_empty()
        }
        _ => true,
    };
    Ok(LogEnd {
        newest,
        max_deleted,
        holds_last,
    })
}

/// What `XINFO STREAM` says of a shard of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StreamInfo {
    /// The newest id appended.
    newest: EntryId,
    /// The newest id ever deleted by `XDEL` (trimming does not count).
    max_deleted: EntryId,
    /// The oldest id it holds.
    first_kept: EntryId,
    /// Entries ever appended.
    entries_added: u64,
    /// Entries it holds now.
    length: u64,
}

/// A status entry one read took along with another, waiting to be handed out.
struct TakenEntry {
    consumer: String,
    taken_at: Instant,
    entry: LogEntry,
}

/// What `XINFO GROUPS` says of the status publishers' group on a shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StatusGroupRead {
    last_delivered: EntryId,
    /// Entries the group read, as Redis counts them; `None` when it cannot tell.
    entries_read: Option<u64>,
}

impl StatusGroupRead {
    /// How many entries `stream` trimmed that the group never read. The oldest go first, and
    /// so do the group's reads, so they are the trimmed ones beyond those it read; none when
    /// what it was last given is still kept, or Redis cannot tell how many it read.
    fn lost_from(&self, stream: &StreamInfo) -> u64 {
        if stream.length > 0 && self.last_delivered >= stream.first_kept {
            return 0;
        }
        let trimmed = stream.entries_added.saturating_sub(stream.length);
        self.entries_read
            .map_or(0, |read| trimmed.saturating_sub(read))
    }
}

impl StatusGroupRead {
    /// What [`Self::lost_from`] finds that was not counted yet, given where the group stood
    /// and how many were lost when last counted (`counted`, updated).
    fn newly_lost(&self, stream: &StreamInfo, counted: &mut (EntryId, u64)) -> u64 {
        let lost = self.lost_from(stream);
        let already = if counted.0 == self.last_delivered {
            counted.1
        } else {
            0
        };
        *counted = (self.last_delivered, lost.max(already));
        lost.saturating_sub(already)
    }
}

/// An id field of an `XINFO` reply; zeros when missing.
fn info_id(info: &HashMap<String, redis::Value>, field: &str) -> EntryId {
    info.get(field)
        .and_then(|value| redis::from_redis_value_ref::<String>(value).ok())
        .and_then(|text| EntryId::parse(&text))
        .unwrap_or_default()
}

/// A count field of an `XINFO` reply; `None` when missing or nil.
fn info_count(info: &HashMap<String, redis::Value>, field: &str) -> Option<u64> {
    info.get(field)
        .and_then(|value| redis::from_redis_value_ref::<u64>(value).ok())
}

/// `XINFO STREAM` of `log`; `None` when it does not exist.
async fn stream_info(conn: &mut Conn, log: &str) -> redis::RedisResult<Option<StreamInfo>> {
    let info: redis::RedisResult<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(log)
        .query_async(conn)
        .await;
    let info = match info {
        Ok(info) => info,
        Err(error) if error.to_string().contains("no such key") => return Ok(None),
        Err(error) => return Err(error),
    };
    Ok(Some(StreamInfo {
        newest: info_id(&info, "last-generated-id"),
        max_deleted: info_id(&info, "max-deleted-entry-id"),
        first_kept: info_id(&info, "recorded-first-entry-id"),
        entries_added: info_count(&info, "entries-added").unwrap_or_default(),
        length: info_count(&info, "length").unwrap_or_default(),
    }))
}

/// The log's newest id and the newest id trimmed from it; zeros when it does not exist.
async fn log_position(conn: &mut Conn, log: &str) -> redis::RedisResult<(EntryId, EntryId)> {
    let info = stream_info(conn, log).await?.unwrap_or_default();
    Ok((info.newest, info.max_deleted))
}

/// Relays shards of the change log to local subscribers, resuming after every reconnection
/// from the last entry relayed per shard; subscribers are asked to re-read everything only
/// when entries were lost.
struct Follower {
    source: Source,
    /// The log streams it reads, one per shard.
    logs: Vec<String>,
    notices: broadcast::Sender<Notice>,
    relayed: Arc<Notify>,
    lag: LogLag,
}

impl Follower {
    async fn run(self, shutdown: CancellationToken) {
        let mut last: Vec<Option<EntryId>> = vec![None; self.logs.len()];
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.session(&mut last, &mut backoff) => result,
            };
            if let Err(error) = result {
                warn!(%error, "change log connection lost; resuming");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.delay()) => {}
            }
        }
    }

    /// Reads until the connection fails.
    async fn session(
        &self,
        last: &mut [Option<EntryId>],
        backoff: &mut Backoff,
    ) -> redis::RedisResult<()> {
        let mut conn = self.source.blocking(LOG_BLOCK).await?;
        let mut positions = self.resume(&mut conn, last).await?;
        info!(shards = self.logs.len(), "following the change log");
        backoff.reset();
        loop {
            let read: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(LOG_BATCH)
                .arg("BLOCK")
                .arg(millis(LOG_BLOCK))
                .arg("STREAMS")
                .arg(&self.logs)
                .arg(
                    positions
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                )
                .query_async(&mut conn)
                .await?;
            let shards = read.map(|reply| reply.keys).unwrap_or_default();
            if shards.iter().all(|shard| shard.ids.is_empty()) {
                self.lag.set(0.0);
                // An empty answer is also the moment to notice a log that was reset
                // (Redis restarted without its data) under a live connection.
                positions = self.resume(&mut conn, last).await?;
                continue;
            }
            let mut newest = EntryId::default();
            for shard in shards {
                let Some(index) = self.logs.iter().position(|log| *log == shard.key) else {
                    continue;
                };
                for entry in shard.ids {
                    let Some(id) = EntryId::parse(&entry.id) else {
                        continue;
                    };
                    match decode_entry(&entry) {
                        Some(message) => {
                            let _ = self.notices.send(Notice::Message(message));
                        }
                        None => debug!(
                            id = entry.id,
                            "skipping an entry this version does not understand"
                        ),
                    }
                    positions[index] = id;
                    last[index] = Some(id);
                    newest = newest.max(id);
                }
            }
            self.relayed.notify_waiters();
            self.lag.set(seconds_behind(newest, now_ms()));
        }
    }

    /// Where to read each shard from, given what was read before (`last`): one resync
    /// notice when any shard lost entries this replica never read.
    async fn resume(
        &self,
        conn: &mut Conn,
        last: &mut [Option<EntryId>],
    ) -> redis::RedisResult<Vec<EntryId>> {
        let mut positions = Vec::with_capacity(self.logs.len());
        let mut lost = false;
        // Every shard is asked before any is moved on: a shard moved past its lost entries
        // by a resume that then failed would be resumed quietly by the next one.
        for (index, log) in self.logs.iter().enumerate() {
            let end = log_end(conn, log, last[index]).await?;
            let position = match resume_point(last[index], end) {
                Resume::From(id) => id,
                Resume::Resync(id) => {
                    lost = true;
                    id
                }
            };
            positions.push(position);
        }
        if lost {
            info!("change log entries may have been missed; re-reading every agent's state");
            let _ = self.notices.send(Notice::Resync);
        }
        for (last, position) in last.iter_mut().zip(&positions) {
            *last = Some(*position);
        }
        Ok(positions)
    }
}

/// Seconds from the append of entry `id` (its id starts with Redis's clock in ms) to
/// `now_ms`; 0 when the clocks disagree the other way.
fn seconds_behind(id: EntryId, now_ms: i64) -> f64 {
    let appended = i64::try_from(id.0).unwrap_or(i64::MAX);
    now_ms.saturating_sub(appended).max(0) as f64 / 1000.0
}

/// Changes one runtime agent's record if its version is the one expected, bumping the
/// registry's change number and appending the change, record included, to the log.
const REGISTRY_SCRIPT: &str = r#"
-- The log is read first, so that one of the wrong type fails the run before the registry
-- is changed without the entry that tells the replicas.
redis.call('XLEN', KEYS[2])
local v = redis.call('HGET', KEYS[1], 'v:' .. ARGV[1]) or '0'
if v ~= ARGV[2] then
  -- The very record asked for is there: this write, sent again after a dropped connection
  -- (a cluster client resends), is answered as it was made.
  if ARGV[3] ~= '' and v ~= '0' and redis.call('HGET', KEYS[1], 'r:' .. ARGV[1]) == ARGV[3] then
    return tonumber(v)
  end
  return -1
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local msg = '{"kind":"registry","agent":' .. ARGV[5] .. ',"seq":' .. seq
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'v:' .. ARGV[1], 'r:' .. ARGV[1])
  msg = msg .. '}'
else
  redis.call('HSET', KEYS[1], 'v:' .. ARGV[1], seq, 'r:' .. ARGV[1], ARGV[3])
  msg = msg .. ',"record":' .. ARGV[3] .. '}'
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'm', msg)
return seq
"#;

/// Marks replica ARGV[1] alive in KEYS[1] at the server's time, and forgets marks older
/// than ARGV[2] ms. The server's clock, not the replica's: the marks of replicas on
/// different hosts are compared with one another.
const MARK_ALIVE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return now
"#;

/// For each replica ARGV[2..], by its mark in KEYS[1] at the server's time: 1 when it has
/// been silent longer than ARGV[1] ms, 0 when it has not, -1 when it has no mark.
const SILENCE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local since = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local told = {}
for i = 2, #ARGV do
  local mark = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not mark then told[#told + 1] = -1
  elseif tonumber(mark) < since then told[#told + 1] = 1
  else told[#told + 1] = 0 end
end
return told
"#;

/// Keeps report ARGV[2] of agent incarnation ARGV[1] as the newest in list KEYS[2], trimmed
/// to indexes 0..ARGV[3], and appends entry ARGV[5] to log KEYS[3] (at most ~ARGV[4]
/// entries); answers 0, writing nothing, when the agent's state KEYS[1] belongs to another
/// incarnation. 0 on either side is one that did not record incarnations.
const REPORT_SCRIPT: &str = r#"
local held = redis.call('HGET', KEYS[1], 'i')
if held and held ~= '0' and ARGV[1] ~= '0' and held ~= ARGV[1] then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'm', ARGV[5])
return 1
"#;

/// Removes consumer ARGV[2] from group ARGV[1] of stream KEYS[1] if it holds no entry and
/// has been idle for ARGV[3] ms; answers 1 if it did.
const FORGET_CONSUMER_SCRIPT: &str = r#"
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, consumer in ipairs(consumers) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['name'] == ARGV[2] then
    if fields['pending'] == 0 and fields['idle'] >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"#;

/// What a replica's mark of life says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Alive,
    /// Marked, then silent for longer than [`REPLICA_SILENT`].
    Dead,
    /// Never marked, or its mark was forgotten.
    Unknown,
}

impl Liveness {
    /// The answer of [`SILENCE_SCRIPT`] for one replica.
    fn from_script(told: i64) -> Self {
        match told {
            0 => Self::Alive,
            1 => Self::Dead,
            _ => Self::Unknown,
        }
    }
}

/// Makes an agent's state the empty record of incarnation ARGV[1], dropping what is stored
/// about another (its gate, history, reports and shown statuses): whoever holds it, or
/// only incarnation ARGV[2] (0 for a record without one) when given. The version goes on
/// past the record's: replicas take a lower or equal one for a state they have.
/// Answers 0 if the record already is ARGV[1]'s, -1 if it is not ARGV[2]'s, 1 once claimed.
///
/// KEYS: the agent's [`AGENT_STATE_PARTS`], its state first.
const CLAIM_AGENT_SCRIPT: &str = r#"
local stored = redis.call('HMGET', KEYS[1], 'i', 'v')
if stored[1] == ARGV[1] then return 0 end
if ARGV[2] ~= '' and (stored[1] or '0') ~= ARGV[2] then return -1 end
redis.call('DEL', unpack(KEYS))
redis.call('HSET', KEYS[1], 'i', ARGV[1], 'v', tonumber(stored[2] or '0') + 1)
return 1
"#;

/// Drops an agent's state, held by the deleted incarnation ARGV[1]: not when it holds
/// another's (a creation's claim that came first). Answers 1 when dropped.
///
/// KEYS: the agent's [`AGENT_STATE_PARTS`], its state first.
const DROP_AGENT_SCRIPT: &str = r#"
local held = redis.call('HGET', KEYS[1], 'i')
if held and held ~= '0' and ARGV[1] ~= '0' and held ~= ARGV[1] then return 0 end
redis.call('DEL', unpack(KEYS))
return 1
"#;

/// The shard whose hash tag the registry and its log entries carry: the registry is one
/// hash, changed atomically with its log entry, so it lives in one slot.
const REGISTRY_SHARD: u16 = 0;

/// The parts of an agent's state a new or deleted runtime agent starts without.
const AGENT_STATE_PARTS: [&str; 7] = [
    "state",
    "decisions",
    "deployed",
    "reports",
    "sync_error",
    SHOWN_STATUSES,
    SHOWN_STATUSES_ORDER,
];

/// The states the previous version marked posted, each under its own key.
const STATES_POSTED_BEFORE: [&str; 5] = ["pending", "running", "success", "failed", "canceled"];

/// An agent's statuses shown on GitLab, by commit.
const SHOWN_STATUSES: &str = "statuses";
/// The commits of [`SHOWN_STATUSES`], scored by generation, so that the oldest go first.
const SHOWN_STATUSES_ORDER: &str = "statuses:order";
/// Commits whose shown status an agent keeps: a log entry about an older one is long
/// acknowledged.
const SHOWN_STATUSES_KEPT: usize = 1024;

impl Keys {
    /// The hash of runtime agents: `seq`, and per agent `v:<name>` and `r:<name>`.
    fn registry(&self) -> String {
        format!("{}:registry", self.tag(REGISTRY_SHARD))
    }
}

impl RedisStore {
    /// `script` on every part of `agent`'s state, its state hash first.
    fn on_agent_parts<'a>(&self, script: &'a Script, agent: &str) -> ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for part in AGENT_STATE_PARTS {
            invocation.key(self.keys.agent(agent, part));
        }
        invocation
    }

    /// Drops what is stored about deleted agent `agent` (its `incarnation`): its gate,
    /// history, reports and shown statuses, unless the record is another's by now.
    async fn drop_agent_state(&self, agent: &str, incarnation: u64) -> Result<()> {
        let _: i64 = self
            .on_agent_parts(&self.drop_agent, agent)
            .arg(incarnation)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Makes `agent`'s state the empty record of `incarnation`, unless it already is: from
    /// whoever holds it, or only from incarnation `from` when given. Returns whether the
    /// record is `incarnation`'s now.
    async fn claim_agent_state(
        &self,
        agent: &str,
        incarnation: u64,
        from: Option<u64>,
    ) -> Result<bool> {
        let claimed: i64 = self
            .on_agent_parts(&self.claim_agent, agent)
            .arg(incarnation)
            .arg(from.map(|from| from.to_string()).unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(claimed >= 0)
    }

    /// Gives `name`'s state to the agent the registry now holds under it, if any: a replica
    /// that lost a race to create an agent of the same name has claimed the state for its
    /// own agent, which the registry never took.
    async fn settle_claim(&self, name: &str) -> Result<()> {
        if let Some(current) = self.registered(name).await? {
            self.claim_agent_state(name, current.value.incarnation(), None)
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl RegistryStore for RedisStore {
    async fn registry(&self) -> Result<Registry> {
        let key = self.keys.registry();
        let fields: HashMap<String, Vec<u8>> = self.conn.clone().hgetall(&key).await?;
        let mut registry = Registry::default();
        for (field, value) in &fields {
            if field == "seq" {
                registry.seq = std::str::from_utf8(value)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .unwrap_or(0);
            } else if let Some(name) = field.strip_prefix("r:") {
                let version = fields
                    .get(&format!("v:{name}"))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0);
                registry.agents.push(Versioned {
                    version,
                    value: RegistryRecord::parse(&format!("{key} {field}"), value)?,
                });
            }
        }
        registry
            .agents
            .sort_by(|a, b| a.value.name().cmp(b.value.name()));
        Ok(registry)
    }

    async fn registered(&self, name: &str) -> Result<Option<Versioned<RegistryRecord>>> {
        let key = self.keys.registry();
        let (version, record): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&key)
            .arg(format!("v:{name}"))
            .arg(format!("r:{name}"))
            .query_async(&mut self.conn.clone())
            .await?;
        record
            .map(|record| {
                Ok(Versioned {
                    version: version.unwrap_or(0),
                    value: RegistryRecord::parse(&format!("{key} r:{name}"), &record)?,
                })
            })
            .transpose()
    }

    async fn change_registered(
        &self,
        name: &str,
        record: Option<&RegistryRecord>,
        expected: u64,
    ) -> Result<RegistryWritten> {
        // The agent's state lives in its own slot, so it cannot change in the registry's
        // script. A new agent claims it first, dropping what another left and refusing
        // writes for another from then on: an evaluation of a deleted agent of the same
        // name may still be running. A deleted agent's state is dropped after.
        // Read only for a creation or a deletion: an update's record has what it needs.
        let registered = if expected == 0 || record.is_none() {
            self.registered(name).await?
        } else {
            None
        };
        let creating = match record {
            Some(record) if expected == 0 && registered.is_none() => {
                self.claim_agent_state(name, record.incarnation(), None)
                    .await?;
                true
            }
            _ => false,
        };
        // A creation's claim may come between the deletion and the drop: only the deleted
        // agent's state goes.
        let deleting = registered
            .filter(|_| record.is_none())
            .map(|deleted| deleted.value.incarnation());
        let quoted = serde_json::to_string(name).map_err(|error| StoreError::Corrupt {
            key: "registry change".into(),
            reason: error.to_string(),
        })?;
        let written: redis::RedisResult<i64> = self
            .registry
            .key(self.keys.registry())
            .key(self.keys.log(REGISTRY_SHARD))
            .arg(name)
            .arg(expected)
            .arg(record.map(RegistryRecord::encode).unwrap_or_default())
            .arg(LOG_MAX_ENTRIES)
            .arg(quoted)
            .invoke_async(&mut self.conn.clone())
            .await;
        // Whatever the registry answered, even nothing: the creation may have been written.
        // The state belongs to whichever agent holds the name; a failure here is repaired
        // by the evaluator, which finds the state held by an agent the registry lacks.
        if creating && let Err(error) = self.settle_claim(name).await {
            warn!(%error, agent = name, "cannot give a new agent's state to the agent registered");
        }
        let Ok(seq) = u64::try_from(written?) else {
            return Ok(RegistryWritten::Conflict);
        };
        if let Some(incarnation) = deleting {
            self.drop_agent_state(name, incarnation).await?;
        }
        Ok(RegistryWritten::Saved { seq })
    }
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
        let end = |newest, max_deleted| LogEnd {
            newest,
            max_deleted,
            holds_last: true,
        };
        // First connection: nothing read yet, so everything is re-read once.
        assert_eq!(
            resume_point(None, end(id(9, 0), id(0, 0))),
            Resume::Resync(id(9, 0))
        );
        // Reconnected, nothing trimmed past what was read: resume.
        assert_eq!(
            resume_point(Some(id(5, 0)), end(id(9, 0), id(0, 0))),
            Resume::From(id(5, 0))
        );
        assert_eq!(
            resume_point(Some(id(5, 0)), end(id(9, 0), id(5, 0))),
            Resume::From(id(5, 0))
        );
        // Trimmed past the last entry read: some were never seen.
        assert_eq!(
            resume_point(Some(id(5, 0)), end(id(9, 0), id(7, 0))),
            Resume::Resync(id(9, 0))
        );
        // The log is behind what was read: Redis lost its data.
        assert_eq!(
            resume_point(Some(id(5, 0)), end(id(2, 0), id(0, 0))),
            Resume::Resync(id(2, 0))
        );
        assert_eq!(
            resume_point(Some(id(5, 0)), end(id(0, 0), id(0, 0))),
            Resume::Resync(id(0, 0))
        );
        // Redis lost its data and took new entries since: newer ids, nothing trimmed, but
        // the entry last read is gone.
        assert_eq!(
            resume_point(
                Some(id(5, 0)),
                LogEnd {
                    holds_last: false,
                    ..end(id(9, 0), id(0, 0))
                }
            ),
            Resume::Resync(id(9, 0))
        );
    }

    #[test]
    fn status_entries_are_lost_when_trimmed_past_what_the_group_was_given() {
        // Entry n has id n: 1 to 50 trimmed, 51 to 90 kept.
        let stream = StreamInfo {
            newest: id(90, 0),
            max_deleted: id(0, 0),
            first_kept: id(51, 0),
            entries_added: 90,
            length: 40,
        };
        let group = |last, read| StatusGroupRead {
            last_delivered: id(last, 0),
            entries_read: read,
        };
        // Read up to the trim or past it: nothing lost.
        assert_eq!(group(50, Some(50)).lost_from(&stream), 0);
        assert_eq!(group(70, Some(70)).lost_from(&stream), 0);
        // Read 20, then 50 trimmed: 30 never read.
        assert_eq!(group(20, Some(20)).lost_from(&stream), 30);
        // Never read anything.
        assert_eq!(group(0, Some(0)).lost_from(&stream), 50);
        // Redis cannot tell how many were read: not counted.
        assert_eq!(group(20, None).lost_from(&stream), 0);
        // Everything trimmed, the last 10 unread.
        let emptied = StreamInfo {
            length: 0,
            first_kept: id(0, 0),
            ..stream
        };
        assert_eq!(group(80, Some(80)).lost_from(&emptied), 10);

        // Looked at again before the group read on: only what was trimmed since counts.
        let mut counted = (EntryId::default(), 0);
        assert_eq!(group(20, Some(20)).newly_lost(&stream, &mut counted), 30);
        assert_eq!(group(20, Some(20)).newly_lost(&stream, &mut counted), 0);
        let trimmed_more = StreamInfo {
            first_kept: id(61, 0),
            entries_added: 100,
            ..stream
        };
        assert_eq!(
            group(20, Some(20)).newly_lost(&trimmed_more, &mut counted),
            10
        );
        // Read on past the gap: nothing more, and a later loss counts whole.
        assert_eq!(
            group(61, Some(61)).newly_lost(&trimmed_more, &mut counted),
            0
        );
        let much_later = StreamInfo {
            first_kept: id(81, 0),
            entries_added: 110,
            length: 30,
            ..stream
        };
        assert_eq!(
            group(70, Some(70)).newly_lost(&much_later, &mut counted),
            10
        );
    }

    #[test]
    fn the_entry_last_read_is_looked_for_only_where_its_absence_tells() {
        // Nothing read, or nothing ever in the log.
        assert!(!LogEnd::must_hold(None, id(9, 0), id(0, 0)));
        assert!(!LogEnd::must_hold(Some(id(0, 0)), id(0, 0), id(0, 0)));
        // Trimmed up to it or past it: gone either way, and the trim says which.
        assert!(!LogEnd::must_hold(Some(id(5, 0)), id(9, 0), id(5, 0)));
        assert!(!LogEnd::must_hold(Some(id(5, 0)), id(9, 0), id(7, 0)));
        // A log behind what was read says so itself.
        assert!(!LogEnd::must_hold(Some(id(5, 0)), id(2, 0), id(0, 0)));
        // Otherwise it must be there.
        assert!(LogEnd::must_hold(Some(id(5, 0)), id(5, 0), id(0, 0)));
        assert!(LogEnd::must_hold(Some(id(5, 0)), id(9, 0), id(3, 0)));
    }
}
