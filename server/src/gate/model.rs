//! What the gate knows about a ref: commits in push order and the pipelines seen for each.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Heads kept per ref; older ones can no longer be deployed anyway.
pub const MAX_HEADS: usize = 256;
/// Pipelines kept per commit, newest ids.
pub const MAX_PIPELINES_PER_COMMIT: usize = 16;
/// Pipelines kept for commits that no push has announced yet (webhooks arrive out of order).
pub const MAX_ORPHAN_PIPELINE_COMMITS: usize = 64;

/// A commit id: lowercase hex, 7 to 64 characters (SHA-1 or SHA-256 object names).
///
/// Shared rather than owned: every agent's state holds hundreds of the same ids (its
/// deployed commits and decisions), and an evaluation clones those states per agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Sha(Arc<str>);

/// Why a string is not a commit id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a commit SHA (7 to 64 hexadecimal characters)")]
pub struct InvalidSha(pub String);

/// Why a string is not a full commit id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a full commit SHA (40 or 64 hexadecimal characters)")]
pub struct NotFullSha(pub String);

impl Sha {
    /// Parses and lowercases a commit id.
    pub fn parse(s: &str) -> Result<Self, InvalidSha> {
        let valid = (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
        if valid {
            Ok(Self(s.to_ascii_lowercase().into()))
        } else {
            Err(InvalidSha(s.to_owned()))
        }
    }

    /// Parses a full commit id (40 or 64 hexadecimal characters), as GitLab and git name
    /// commits: an abbreviation could name another commit once the repository grows.
    pub fn parse_full(s: &str) -> Result<Self, NotFullSha> {
        match Self::parse(s) {
            Ok(sha) if sha.is_full() => Ok(sha),
            _ => Err(NotFullSha(s.to_owned())),
        }
    }

    /// Whether this is the all-zeros id GitLab sends for a created or deleted branch.
    pub fn is_null(&self) -> bool {
        self.0.bytes().all(|b| b == b'0')
    }

    /// Whether this names a full object id rather than an abbreviation.
    pub fn is_full(&self) -> bool {
        self.0.len() == 40 || self.0.len() == 64
    }

    /// The first 8 characters, as people quote commits.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(8)]
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sha {
    type Error = InvalidSha;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Sha::parse(&s)
    }
}

impl Serialize for Sha {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Display for Sha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pipeline's state, as GitLab names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineStatus {
    Created,
    WaitingForResource,
    Preparing,
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
    Skipped,
    Manual,
    Scheduled,
}

/// A pipeline status string that GitLab does not document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pipeline status {0:?}")]
pub struct UnknownStatus(pub String);

impl PipelineStatus {
    /// All statuses, for parsers and generators.
    pub const ALL: [PipelineStatus; 11] = [
        Self::Created,
        Self::WaitingForResource,
        Self::Preparing,
        Self::Pending,
        Self::Running,
        Self::Success,
        Self::Failed,
        Self::Canceled,
        Self::Skipped,
        Self::Manual,
        Self::Scheduled,
    ];

    /// GitLab's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::WaitingForResource => "waiting_for_resource",
            Self::Preparing => "preparing",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Skipped => "skipped",
            Self::Manual => "manual",
            Self::Scheduled => "scheduled",
        }
    }

    /// Parses GitLab's name of a status (`canceled` and `cancelled` both occur). The steps
    /// newer GitLab versions name on the way to a result (`canceling`, and
    /// `waiting_for_callback` for a job) are still running to the gate.
    pub fn parse(s: &str) -> Result<Self, UnknownStatus> {
        match s {
            "cancelled" => return Ok(Self::Canceled),
            "canceling" | "waiting_for_callback" => return Ok(Self::Running),
            _ => {}
        }
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }

    /// Whether the pipeline has ended; a later non-final update of the same pipeline is stale.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Failed | Self::Canceled | Self::Skipped
        )
    }
}

impl fmt::Display for PipelineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// [`aggregate_jobs`] of jobs as GitLab names their statuses, with whether each may fail.
/// A status this version does not know holds the pipeline as unfinished, since leaving the
/// job out could let the jobs around it make a pipeline look green.
pub fn aggregate_named_jobs<'a>(
    jobs: impl IntoIterator<Item = (&'a str, bool)>,
) -> Option<PipelineStatus> {
    let jobs: Vec<(PipelineStatus, bool)> = jobs
        .into_iter()
        .map(|(status, optional)| {
            let status = PipelineStatus::parse(status).unwrap_or(PipelineStatus::Running);
            (status, optional)
        })
        .collect();
    aggregate_jobs(&jobs)
}

/// GitLab's status of a pipeline from its jobs' (status, allow_failure); `None` without jobs.
/// Used where the pipeline's own status counts jobs that must not count (our statuses).
pub fn aggregate_jobs(jobs: &[(PipelineStatus, bool)]) -> Option<PipelineStatus> {
    use PipelineStatus as S;
    if jobs.is_empty() {
        return None;
    }
    let waiting = |s: &S| matches!(s, S::Manual | S::Scheduled);
    // Optional manual jobs do not hold a pipeline back, as on GitLab.
    let counted: Vec<S> = jobs
        .iter()
        .filter(|(s, optional)| !(*optional && waiting(s)))
        .map(|(s, _)| *s)
        .collect();
    let failed = jobs
        .iter()
        .any(|(s, optional)| *s == S::Failed && !optional);
    let status = if counted.iter().any(|s| !s.is_final() && !waiting(s)) {
        S::Running
    } else if let Some(held) = counted.iter().find(|s| waiting(s)) {
        *held
    } else if failed {
        S::Failed
    } else if counted.contains(&S::Canceled) {
        S::Canceled
    } else if !counted.is_empty() && counted.iter().all(|s| *s == S::Skipped) {
        S::Skipped
    } else {
        S::Success
    };
    Some(status)
}

/// The GitLab pipeline source of merge request pipelines, which never open the gate.
pub const MERGE_REQUEST_SOURCE: &str = "merge_request_event";
/// The source of pipelines GitLab creates for commit statuses posted on a commit without a
/// pipeline: Greenlight's own statuses make them, so they never open the gate.
pub const EXTERNAL_SOURCE: &str = "external";

/// One pipeline run for a commit on this ref.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    pub id: u64,
    pub status: PipelineStatus,
    #[serde(default)]
    pub source: String,
    /// When this state was true: the finish time of a final result, else the latest job
    /// activity. Orders updates of one pipeline that arrive out of order.
    #[serde(default)]
    pub as_of_ms: Option<i64>,
    /// Stages all of whose jobs succeeded, while the pipeline may still run later stages.
    #[serde(default)]
    pub passed_stages: Vec<String>,
}

impl Pipeline {
    /// Whether this update replaces `recorded`, an earlier-received update of the same pipeline.
    ///
    /// Deliveries can arrive out of order: a late "running" never hides a final result, and of
    /// two final results the one that finished later wins (a job retried inside the pipeline).
    fn supersedes(&self, recorded: &Pipeline) -> bool {
        match (recorded.status.is_final(), self.status.is_final()) {
            // A job retried in a finished pipeline makes it run again: believe a non-final
            // update only when its activity is newer than the recorded finish.
            (true, false) => {
                matches!((self.as_of_ms, recorded.as_of_ms), (Some(new), Some(old)) if new > old)
            }
            (true, true) => self.as_of_ms >= recorded.as_of_ms,
            (false, _) => true,
        }
    }

    /// What `update` makes of the pipeline's state so far (`recorded`, if any): `None` when
    /// it changes nothing. The one merge rule of pipeline updates, which the Redis store's
    /// script mirrors: updates may arrive in any order and still end in the same state.
    pub fn merged(recorded: Option<&Pipeline>, update: Pipeline) -> Option<Pipeline> {
        let Some(recorded) = recorded else {
            return Some(update);
        };
        if *recorded == update || !update.supersedes(recorded) {
            return None;
        }
        // Updates without job details (catch-up, other CI systems) keep what the webhooks
        // said about passed stages.
        let keep_stages = update.passed_stages.is_empty() && !update.status.is_final();
        let mut merged = update;
        if keep_stages && merged.status == PipelineStatus::Running {
            merged.passed_stages = recorded.passed_stages.clone();
        }
        Some(merged)
    }

    /// Whether this pipeline's result may open the gate for a branch.
    pub fn counts_for_branch(&self) -> bool {
        self.source != MERGE_REQUEST_SOURCE && self.source != EXTERNAL_SOURCE
    }
}

/// Rejected pipeline claims kept per ref, for operators.
pub const MAX_REJECTED: usize = 20;

/// A pipeline claim that was not recorded because GitLab's API contradicts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub sha: Sha,
    pub pipeline_id: u64,
    pub reason: String,
    pub at_ms: i64,
}

/// A head the branch pointed to, in the order pushes were recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub sha: Sha,
    /// Position in push order, increasing.
    pub seq: u64,
    pub pushed_at_ms: i64,
    /// The line of history the head belongs to; a branch deletion starts a new one.
    pub line: u64,
    /// Where its push moved the branch from.
    pub before: Before,
}

/// Where a push moved the branch from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Before {
    /// The push created the branch.
    Created,
    /// The head the branch pointed to before the push.
    Head(Sha),
    /// Not known: the head was read from GitLab's API, which does not say what came before.
    /// A push that names it later tells where it belongs.
    Unknown,
}

impl Before {
    /// The head the push continued from, when known.
    pub fn head(&self) -> Option<&Sha> {
        match self {
            Self::Head(sha) => Some(sha),
            Self::Created | Self::Unknown => None,
        }
    }
}

/// A push to the watched ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub before: Before,
    /// The new head; `None` when the branch was deleted.
    pub after: Option<Sha>,
    pub at_ms: i64,
}

/// What recording an event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The ref state changed.
    Changed,
    /// The event carried nothing new (a redelivery, or a stale update).
    Unchanged,
}

/// Everything known about one (project, ref): heads in push order and pipelines per commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefState {
    /// Oldest first; the oldest are dropped past [`MAX_HEADS`], one per push once full.
    pub heads: std::collections::VecDeque<Head>,
    pub pipelines: BTreeMap<Sha, Vec<Pipeline>>,
    pub next_seq: u64,
    /// The current line of history.
    pub line: u64,
    /// Whether the branch is deleted.
    #[serde(default)]
    pub deleted: bool,
    /// Claims refused after checking with GitLab, oldest first.
    #[serde(default)]
    pub rejected: Vec<Rejected>,
}

impl RefState {
    /// Records a push. A head that was already announced on the current line is not
    /// appended again, so a redelivered old push cannot look like a newer commit; it only
    /// learns where it came from, if that was not known.
    pub fn record_push(&mut self, push: &Push) -> Recorded {
        let mut index = HeadIndex::of(self);
        self.record_indexed(push, &mut index)
    }

    /// Records `pushes` in order, as [`Self::record_push`] would one by one. Replaying a
    /// ref's stored pushes (four times as many as the heads kept) asks each push's questions
    /// of up to [`MAX_HEADS`] heads: answered from one index, not by scanning every head.
    pub fn record_pushes<'a>(&mut self, pushes: impl IntoIterator<Item = &'a Push>) {
        let mut index = HeadIndex::of(self);
        for push in pushes {
            self.record_indexed(push, &mut index);
        }
    }

    /// [`Self::record_push`], with `index` describing `self.heads` before and after.
    fn record_indexed(&mut self, push: &Push, index: &mut HeadIndex) -> Recorded {
        let Some(after) = &push.after else {
            if self.deleted {
                return Recorded::Unchanged;
            }
            self.deleted = true;
            self.line += 1;
            index.start_line();
            return Recorded::Changed;
        };
        if !self.deleted && index.current.contains(after) {
            // A head read from GitLab's API learns where it came from when its push arrives,
            // and only then can take its place among the heads around it.
            let line = self.line;
            let known = self
                .heads
                .iter_mut()
                .rev()
                .find(|h| h.line == line && &h.sha == after);
            if let Some(head) = known
                && head.before == Before::Unknown
                && push.before != Before::Unknown
            {
                head.before = push.before.clone();
                if let Some(before) = head.before.head() {
                    index.befores.add(before);
                }
                self.order_line();
                return Recorded::Changed;
            }
            return Recorded::Unchanged;
        }
        // A push that continues from an earlier commit yet names a head of an older line is a
        // late redelivery, not news; re-creating a branch has no `before`.
        if push.before.head().is_some() && index.older.contains(after) {
            return Recorded::Unchanged;
        }
        self.deleted = false;
        let head = Head {
            sha: after.clone(),
            seq: self.next_seq,
            pushed_at_ms: push.at_ms,
            line: self.line,
            before: push.before.clone(),
        };
        // The common case, a push from the newest head (or from anything this line does not
        // know, with nothing known after it), goes last; a push delivered late puts the line
        // back in the order of its commits.
        // A push that fills a gap below a head already known (that head was pushed on top of
        // this one) is late however it continues the line: even on top of the newest head.
        let newest = self.heads.iter().rev().find(|h| h.line == self.line);
        let in_order = !index.befores.contains(after)
            && match head.before.head() {
                Some(before) => {
                    newest.is_some_and(|n| &n.sha == before) || !index.current.contains(before)
                }
                None => true,
            };
        index.add_current(&head);
        self.heads.push_back(head);
        self.next_seq += 1;
        if !in_order {
            self.order_line();
        }
        // Only a head dropped can make a commit's pipelines orphans.
        if self.trim_heads(index) {
            self.trim_orphans();
        }
        Recorded::Changed
    }

    /// Orders the current line's heads by their pushes' `before`: each after the head it was
    /// pushed on top of; where that leaves a choice, first the push that created the branch,
    /// then the head whose pushes (its own or those of the heads pushed on top of it) came
    /// first. Pushes delivered out of order then leave the commits' order, whatever order
    /// they came in, and heads whose relation is not known (a head read from GitLab's API
    /// among them) keep the order they arrived in.
    fn order_line(&mut self) {
        let start = self
            .heads
            .iter()
            .position(|h| h.line == self.line)
            .unwrap_or(self.heads.len());
        let line: Vec<Head> = self.heads.drain(start..).collect();
        let order = line_order(&line);
        let mut line: Vec<Option<Head>> = line.into_iter().map(Some).collect();
        self.heads
            .extend(order.into_iter().filter_map(|i| line[i].take()));
        for (seq, head) in self.heads.iter_mut().enumerate() {
            head.seq = seq as u64;
        }
        self.next_seq = self.heads.len() as u64;
    }

    /// Records a pipeline update for `sha`.
    pub fn record_pipeline(&mut self, sha: &Sha, update: Pipeline) -> Recorded {
        let (outcome, new_commit) = self.merge_pipeline(sha, update);
        // Only a commit new to the pipelines and no head adds an orphan; recording another
        // run of a commit already there leaves the orphans as many as they were.
        if new_commit && !self.heads.iter().any(|head| &head.sha == sha) {
            self.trim_orphans();
        }
        outcome
    }

    /// Records a ref's stored pipelines, then trims the orphans once: the newest
    /// `MAX_ORPHAN_PIPELINE_COMMITS` by their newest run stay, whatever the order of
    /// `records`. Trimming after each record, as [`Self::record_pipeline`] does, would scan
    /// every orphan once per record, and the store may hold many more than the cap between
    /// two evaluations under a stream of pipelines of commits never pushed.
    pub fn replay_pipelines<'a>(&mut self, records: impl IntoIterator<Item = &'a (Sha, Pipeline)>) {
        for (sha, pipeline) in records {
            self.merge_pipeline(sha, pipeline.clone());
        }
        self.trim_orphans();
    }

    /// Merges `update` into its commit's runs; also says whether the commit is new to the
    /// pipelines.
    fn merge_pipeline(&mut self, sha: &Sha, update: Pipeline) -> (Recorded, bool) {
        let new_commit = !self.pipelines.contains_key(sha);
        let runs = self.pipelines.entry(sha.clone()).or_default();
        let outcome = match runs.iter_mut().find(|p| p.id == update.id) {
            Some(recorded) => match Pipeline::merged(Some(recorded), update) {
                Some(merged) => {
                    *recorded = merged;
                    Recorded::Changed
                }
                None => Recorded::Unchanged,
            },
            None => {
                runs.push(update);
                runs.sort_by_key(|p| p.id);
                // Only the newest pipelines can be the verdict; scheduled pipelines on an idle
                // head would otherwise grow the state forever.
                if runs.len() > MAX_PIPELINES_PER_COMMIT {
                    let excess = runs.len() - MAX_PIPELINES_PER_COMMIT;
                    runs.drain(..excess);
                }
                Recorded::Changed
            }
        };
        (outcome, new_commit)
    }

    /// Keeps `rejected` for operators; the oldest are forgotten.
    pub fn reject(&mut self, rejected: Rejected) {
        self.rejected.push(rejected);
        if self.rejected.len() > MAX_REJECTED {
            let excess = self.rejected.len() - MAX_REJECTED;
            self.rejected.drain(..excess);
        }
    }

    /// The pipeline that is the commit's verdict for the branch: the one with the highest id.
    pub fn verdict(&self, sha: &Sha) -> Option<&Pipeline> {
        self.pipelines
            .get(sha)?
            .iter()
            .filter(|p| p.counts_for_branch())
            .max_by_key(|p| p.id)
    }

    /// Heads of the current line, newest first, each commit once.
    pub fn current_heads(&self) -> impl Iterator<Item = &Head> {
        let line = self.line;
        let deleted = self.deleted;
        self.heads
            .iter()
            .rev()
            .filter(move |h| !deleted && h.line == line)
    }

    /// The current line's heads, newest first, as the gate walks them: where `lineage`
    /// knows where two heads stand in the branch's history, that decides, not the order
    /// their pushes were recorded in (a hook lost, or a head read from GitLab's API before
    /// its late hook came, leaves push order wrong). Heads it cannot place (not fetched yet,
    /// off the branch) keep their place in push order.
    pub fn newest_first(&self, lineage: &dyn Lineage) -> Vec<&Head> {
        let mut heads: Vec<&Head> = self.current_heads().collect();
        let placed =
            |head: &&Head| lineage.on_branch(&head.sha) && lineage.generation(&head.sha).is_some();
        let slots: Vec<usize> = (0..heads.len()).filter(|&i| placed(&heads[i])).collect();
        let mut in_history: Vec<&Head> = slots.iter().map(|&i| heads[i]).collect();
        // Stable: heads of one generation keep their push order.
        in_history.sort_by_key(|head| std::cmp::Reverse(lineage.generation(&head.sha)));
        for (slot, head) in slots.into_iter().zip(in_history) {
            heads[slot] = head;
        }
        heads
    }

    /// The newest head of the branch, if it exists.
    pub fn head(&self) -> Option<&Head> {
        self.current_heads().next()
    }

    /// Where `sha` stands in push order on any line, newest announcement first.
    pub fn find_head(&self, sha: &Sha) -> Option<&Head> {
        self.heads.iter().rev().find(|h| &h.sha == sha)
    }

    /// Drops the oldest heads past the cap; whether it dropped any.
    fn trim_heads(&mut self, index: &mut HeadIndex) -> bool {
        let excess = self.heads.len().saturating_sub(MAX_HEADS);
        for head in self.heads.drain(..excess) {
            index.remove(&head, self.line);
        }
        excess > 0
    }

    /// Forgets the pipelines of the oldest commits that are no head, past their cap.
    ///
    /// Runs after every new orphan recorded, so it returns early whenever it cannot drop
    /// anything.
    fn trim_orphans(&mut self) {
        if self.pipelines.len() <= MAX_ORPHAN_PIPELINE_COMMITS {
            return;
        }
        let heads: ShaSet<'_> = self.heads.iter().map(|h| &h.sha).collect();
        // An orphan's age is its newest run's id; the oldest go first.
        let mut orphans: Vec<(u64, &Sha)> = self
            .pipelines
            .iter()
            .filter(|(sha, _)| !heads.contains(sha))
            .map(|(sha, runs)| (runs.iter().map(|p| p.id).max().unwrap_or(0), sha))
            .collect();
        if orphans.len() <= MAX_ORPHAN_PIPELINE_COMMITS {
            return;
        }
        let excess = orphans.len() - MAX_ORPHAN_PIPELINE_COMMITS;
        // Only the oldest `excess` are needed, not all in order: this runs for every new
        // orphan recorded, one over the cap each time.
        orphans.select_nth_unstable(excess - 1);
        let dropped: Vec<Sha> = orphans[..excess]
            .iter()
            .map(|(_, sha)| (*sha).clone())
            .collect();
        for sha in dropped {
            self.pipelines.remove(&sha);
        }
    }
}

/// A multiset of commit ids.
#[derive(Debug, Default, PartialEq)]
struct ShaCounts(std::collections::HashMap<Sha, u32, ShaHasher>);

impl ShaCounts {
    fn add(&mut self, sha: &Sha) {
        *self.0.entry(sha.clone()).or_default() += 1;
    }

    fn remove(&mut self, sha: &Sha) {
        if let Some(count) = self.0.get_mut(sha) {
            *count -= 1;
            if *count == 0 {
                self.0.remove(sha);
            }
        }
    }

    fn contains(&self, sha: &Sha) -> bool {
        self.0.contains_key(sha)
    }
}

/// What [`RefState::record_push`] asks of the heads, by commit: which are on the current
/// line, which an older line holds, and which the current line's heads were pushed on top of.
#[derive(Debug, Default, PartialEq)]
struct HeadIndex {
    current: ShaCounts,
    older: ShaCounts,
    befores: ShaCounts,
}

impl HeadIndex {
    fn of(state: &RefState) -> Self {
        let mut index = Self::default();
        for head in &state.heads {
            if head.line == state.line {
                index.add_current(head);
            } else {
                index.older.add(&head.sha);
            }
        }
        index
    }

    fn add_current(&mut self, head: &Head) {
        self.current.add(&head.sha);
        if let Some(before) = head.before.head() {
            self.befores.add(before);
        }
    }

    /// Forgets `head`, a head of the current line if it is on `line`.
    fn remove(&mut self, head: &Head, line: u64) {
        if head.line == line {
            self.current.remove(&head.sha);
            if let Some(before) = head.before.head() {
                self.befores.remove(before);
            }
        } else {
            self.older.remove(&head.sha);
        }
    }

    /// The branch was deleted: its heads now belong to an older line.
    fn start_line(&mut self) {
        for (sha, count) in std::mem::take(&mut self.current.0) {
            *self.older.0.entry(sha).or_default() += count;
        }
        self.befores = ShaCounts::default();
    }
}

/// Answers ancestry questions about the commits of a ref.
///
/// Push order is the fallback; the git mirror answers from real history.
pub trait Lineage {
    /// Whether `sha` is on the branch's current line of history.
    fn on_branch(&self, sha: &Sha) -> bool;
    /// Whether `descendant` has `ancestor` in its history (true when they are equal).
    fn descends_from(&self, descendant: &Sha, ancestor: &Sha) -> bool;
    /// Whether this lineage knows `sha` at all: a commit a stale mirror has not fetched yet is
    /// unknown, which is not the same as gone from the branch.
    fn knows(&self, _sha: &Sha) -> bool {
        true
    }
    /// Where `sha` stands in the history when this lineage can say: a commit always stands
    /// above every commit in its history. `None` when it cannot (push order is the order
    /// itself; a mirror does not have the commit).
    fn generation(&self, _sha: &Sha) -> Option<u32> {
        None
    }
}

/// Hashes commit ids for the gate's lookups, which run hundreds of times per agent and
/// evaluation: cheaper than SipHash, and randomly seeded all the same.
pub type ShaHasher = foldhash::fast::RandomState;

/// A set of borrowed commit ids.
pub type ShaSet<'a> = std::collections::HashSet<&'a Sha, ShaHasher>;

/// Ancestry as the order in which pushes announced heads: every head of the current line
/// descends from the heads before it.
pub struct PushOrder<'a> {
    /// Where each head of the current line stands in push order (its newest announcement).
    seq: std::collections::HashMap<&'a Sha, u64, ShaHasher>,
}

impl<'a> PushOrder<'a> {
    /// The push order of `refs`' current line.
    pub fn new(refs: &'a RefState) -> Self {
        let mut seq = std::collections::HashMap::with_hasher(ShaHasher::default());
        for head in refs.current_heads() {
            seq.entry(&head.sha).or_insert(head.seq);
        }
        Self { seq }
    }
}

impl Lineage for PushOrder<'_> {
    fn on_branch(&self, sha: &Sha) -> bool {
        self.seq.contains_key(sha)
    }

    fn descends_from(&self, descendant: &Sha, ancestor: &Sha) -> bool {
        if descendant == ancestor {
            return true;
        }
        matches!(
            (self.seq.get(descendant), self.seq.get(ancestor)),
            (Some(d), Some(a)) if d > a
        )
    }
}

/// The order [`RefState::order_line`] gives `line`'s heads, as indexes into it. Late pushes
/// are common enough (GitLab delivers hooks concurrently) that this runs in most replays of
/// a busy ref, so it is O(n log n): each subtree's first appearance is found in one pass from
/// the leaves up, and the next head from a heap of those whose parent is placed.
fn line_order(line: &[Head]) -> Vec<usize> {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};

    let mut at = HashMap::with_capacity_and_hasher(line.len(), ShaHasher::default());
    at.extend(line.iter().enumerate().map(|(i, h)| (&h.sha, i)));
    let parent: Vec<Option<usize>> = line
        .iter()
        .map(|h| h.before.head().and_then(|b| at.get(b).copied()))
        .collect();
    // Each head's children as one run of `children`, from `first_child[head]` on.
    let mut first_child = vec![0; line.len() + 1];
    for up in parent.iter().flatten() {
        first_child[up + 1] += 1;
    }
    for head in 0..line.len() {
        first_child[head + 1] += first_child[head];
    }
    let mut children = vec![0; first_child[line.len()]];
    let mut filled = first_child.clone();
    let mut roots = Vec::new();
    for (head, up) in parent.iter().enumerate() {
        match up {
            Some(up) => {
                children[filled[*up]] = head;
                filled[*up] += 1;
            }
            None => roots.push(head),
        }
    }
    let children_of = |head: usize| &children[first_child[head]..first_child[head + 1]];
    // Parents before their children; heads under a cycle of befores (not a git history)
    // are never reached, and are never placed by the order either.
    let mut downwards = Vec::with_capacity(line.len());
    let mut stack = roots.clone();
    while let Some(head) = stack.pop() {
        downwards.push(head);
        stack.extend(children_of(head));
    }
    // Where each head's subtree first appears in the line as it stands: a late push of an
    // old commit takes the place of the earliest head pushed on top of it.
    let mut first_seen: Vec<usize> = (0..line.len()).collect();
    for &head in downwards.iter().rev() {
        if let Some(up) = parent[head] {
            first_seen[up] = first_seen[up].min(first_seen[head]);
        }
    }
    let key = |i: usize| Reverse((line[i].before != Before::Created, first_seen[i], i));
    let mut ready: BinaryHeap<_> = roots.into_iter().map(key).collect();
    let mut placed = vec![false; line.len()];
    let mut order = Vec::with_capacity(line.len());
    while let Some(Reverse((_, _, next))) = ready.pop() {
        placed[next] = true;
        order.push(next);
        ready.extend(children_of(next).iter().map(|&child| key(child)));
    }
    // A cycle of befores: what is left, as it stands.
    order.extend((0..line.len()).filter(|&i| !placed[i]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, Strategy, TestCaseError, any, prop_assert, prop_assert_eq};
    use proptest::sample::Index;

    fn sha(n: u8) -> Sha {
        Sha::parse(&format!("{:040x}", n)).unwrap()
    }

    /// The push of commit `n` on top of `n - 1`.
    fn chain(n: u8) -> Push {
        Push {
            before: Before::Head(sha(n - 1)),
            after: Some(sha(n)),
            at_ms: 0,
        }
    }

    /// The current line's heads, newest first.
    fn newest_first(state: &RefState) -> Vec<Sha> {
        state.current_heads().map(|h| h.sha.clone()).collect()
    }

    /// The push of `after` that created the branch.
    fn push(after: u8) -> Push {
        Push {
            before: Before::Created,
            after: Some(sha(after)),
            at_ms: 0,
        }
    }

    fn pipeline(id: u64, status: PipelineStatus) -> Pipeline {
        Pipeline {
            id,
            status,
            source: "push".into(),
            as_of_ms: None,
            passed_stages: Vec::new(),
        }
    }

    #[test]
    fn sha_parsing_rejects_garbage_and_lowercases() {
        assert!(Sha::parse("xyz").is_err());
        assert!(Sha::parse("abc").is_err());
        assert_eq!(Sha::parse("ABCDEF12").unwrap().as_str(), "abcdef12");
        assert!(Sha::parse(&"0".repeat(40)).unwrap().is_null());
    }

    #[test]
    fn redelivered_push_is_not_a_new_head() {
        let mut state = RefState::default();
        assert_eq!(state.record_push(&push(1)), Recorded::Changed);
        assert_eq!(state.record_push(&push(2)), Recorded::Changed);
        assert_eq!(state.record_push(&push(1)), Recorded::Unchanged);
        assert_eq!(state.head().unwrap().sha, sha(2));
    }

    #[test]
    fn a_push_delivered_late_takes_its_place_in_history() {
        let mut state = RefState::default();
        state.record_push(&push(1));
        // A→B is delivered after B→C.
        state.record_push(&Push {
            before: Before::Head(sha(2)),
            after: Some(sha(3)),
            at_ms: 0,
        });
        state.record_push(&Push {
            before: Before::Head(sha(1)),
            after: Some(sha(2)),
            at_ms: 0,
        });
        let order = newest_first(&state);
        assert_eq!(order, [sha(3), sha(2), sha(1)], "newest first");
        let lineage = PushOrder::new(&state);
        assert!(lineage.descends_from(&sha(3), &sha(2)));
        assert!(!lineage.descends_from(&sha(2), &sha(3)));
    }

    /// The chaos run that found it: 84 (from 83) arrived before 83 (from 82) and 82 (from
    /// 81), then 85 and 86; the newest head must be 86, not the late 83.
    #[test]
    fn pushes_of_one_line_in_any_order_keep_the_order_of_their_commits() {
        let mut state = RefState::default();
        for n in [81, 84, 83, 82, 85, 86] {
            state.record_push(&chain(n));
        }
        let order = newest_first(&state);
        let expected: Vec<Sha> = (81..=86).rev().map(sha).collect();
        assert_eq!(order, expected, "newest first");
    }

    proptest::proptest! {
        /// However the pushes of one straight line of commits are delivered (reordered,
        /// some twice), and wherever heads read from GitLab's API come between them, the
        /// heads come out in the order of the commits.
        #[test]
        fn any_delivery_order_of_a_straight_line_gives_its_commit_order(
            order in Just((1u8..=12).collect::<Vec<_>>()).prop_shuffle(),
            again in proptest::collection::vec(1u8..=12, 0..4),
            observed in proptest::collection::vec((0u8..=12, any::<Index>()), 0..4),
        ) {
            let mut deliveries: Vec<(u8, Push)> = std::iter::once((0, push(0)))
                .chain(order.iter().chain(again.iter()).map(|n| (*n, chain(*n))))
                .collect();
            for (head, at) in observed {
                // GitLab's head was `head` when it was read, so no later commit was pushed,
                // nor its hook sent, yet.
                let latest = deliveries
                    .iter()
                    .position(|(n, _)| *n > head)
                    .unwrap_or(deliveries.len());
                let read = Push { before: Before::Unknown, after: Some(sha(head)), at_ms: 0 };
                deliveries.insert(at.index(latest + 1), (head, read));
            }
            let mut state = RefState::default();
            for (_, push) in &deliveries {
                state.record_push(push);
                // At every step, not only once the line is complete: the gate decides on
                // what it has, and a head it took for newer than its descendant would be a
                // move backwards.
                let heads: Vec<&Head> = state.current_heads().collect();
                for (newer, head) in heads.iter().enumerate() {
                    if let Some(parent) = heads.iter().position(|h| Some(&h.sha) == head.before.head()) {
                        prop_assert!(
                            parent > newer,
                            "{} is listed newer than {}, which was pushed on top of it",
                            heads[parent].sha, head.sha
                        );
                    }
                }
            }
            let heads = newest_first(&state);
            let expected: Vec<Sha> = (0u8..=12).rev().map(sha).collect();
            prop_assert_eq!(heads, expected);
        }
    }

    /// What the chaos run that found it did: a restarted server read the branch head from
    /// GitLab before that head's hook came, then hooks came out of order. The head read is
    /// not the branch's creation, and is no longer in doubt once its own push arrives.
    #[test]
    fn a_head_read_from_gitlab_is_not_taken_for_the_branchs_creation() {
        let read = |n: u8| Push {
            before: Before::Unknown,
            after: Some(sha(n)),
            at_ms: 0,
        };
        let mut state = RefState::default();
        for delivered in [push(0), chain(1), read(2), chain(4), chain(3)] {
            state.record_push(&delivered);
        }
        let expected: Vec<Sha> = (0..=4).rev().map(sha).collect();
        assert_eq!(newest_first(&state), expected, "newest first");
        assert_eq!(state.record_push(&read(4)), Recorded::Unchanged);
        assert_eq!(
            state.record_push(&chain(2)),
            Recorded::Changed,
            "learns where 2 came from"
        );
        assert_eq!(
            state.find_head(&sha(2)).unwrap().before,
            Before::Head(sha(1))
        );
        assert_eq!(state.record_push(&chain(2)), Recorded::Unchanged);
        assert_eq!(newest_first(&state), expected);
    }

    /// Where pushes are missing in between, what is known still orders the line: the push
    /// that created the branch first, and a late push of an old commit goes below the
    /// heads pushed on top of it instead of after the heads that arrived before it.
    #[test]
    fn a_line_with_gaps_keeps_the_creation_first_and_late_pushes_below_their_descendants() {
        // 2 (from 1), 5 (from 4), then the creation of the branch at 1.
        let mut state = RefState::default();
        state.record_push(&chain(2));
        state.record_push(&chain(5));
        state.record_push(&push(1));
        assert_eq!(
            newest_first(&state),
            [sha(5), sha(2), sha(1)],
            "newest first"
        );
        // 5 (from 4), the creation at 1, 3 (from 2), then 4 (from 3).
        let mut state = RefState::default();
        for delivered in [chain(5), push(1), chain(3), chain(4)] {
            state.record_push(&delivered);
        }
        assert_eq!(
            newest_first(&state),
            [sha(5), sha(4), sha(3), sha(1)],
            "newest first"
        );
    }

    /// The case two racing evaluators found: 5 (from 4) arrived first, then 3 (from an
    /// unknown 2) and 4 (from 3). The push of 4 continues the newest head, 3, but 5 was
    /// pushed on top of it, so 5 stays the newest.
    #[test]
    fn a_late_push_on_top_of_the_newest_head_still_goes_below_its_descendant() {
        let mut state = RefState::default();
        for n in [5, 3, 4] {
            state.record_push(&chain(n));
        }
        let order = newest_first(&state);
        assert_eq!(order, [sha(5), sha(4), sha(3)], "newest first");
    }

    /// A fact as the trimming test records it.
    #[derive(Debug, Clone)]
    enum Recording {
        Push {
            before: Option<u16>,
            after: Option<u16>,
        },
        Pipeline {
            sha: u16,
            id: u64,
            success: bool,
        },
    }

    fn long_sha(n: u16) -> Sha {
        Sha::parse(&format!("{n:040x}")).unwrap()
    }

    fn recording() -> impl Strategy<Value = Recording> {
        proptest::prop_oneof![
            3 => (proptest::option::weighted(0.5, 0u16..600), proptest::option::weighted(0.98, 0u16..600))
                .prop_map(|(before, after)| Recording::Push { before, after }),
            2 => (0u16..700, 1u64..2000, proptest::bool::ANY)
                .prop_map(|(sha, id, success)| Recording::Pipeline { sha, id, success }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Trimming is skipped when a record cannot make anything droppable: after every
        /// record the state is what trimming everything would leave.
        #[test]
        fn a_record_leaves_the_state_fully_trimmed(
            recordings in proptest::collection::vec(recording(), 0..900),
        ) {
            let mut state = RefState::default();
            for recorded in recordings {
                match recorded {
                    Recording::Push { before, after } => {
                        state.record_push(&Push {
                            before: before.map_or(Before::Created, |b| Before::Head(long_sha(b))),
                            after: after.map(long_sha),
                            at_ms: 0,
                        });
                    }
                    Recording::Pipeline { sha, id, success } => {
                        let status = if success { PipelineStatus::Success } else { PipelineStatus::Failed };
                        state.record_pipeline(&long_sha(sha), pipeline(id, status));
                    }
                }
                let mut trimmed = state.clone();
                trimmed.trim_heads(&mut HeadIndex::of(&state));
                trimmed.trim_orphans();
                prop_assert_eq!(&trimmed, &state);
            }
        }
    }

    /// A push of commit `after` (a deletion without one) from `before` (created without
    /// one), or a head read from GitLab's API, which has no `before`.
    fn any_push() -> impl Strategy<Value = Push> {
        let before = proptest::prop_oneof![
            1 => Just(Before::Created),
            1 => Just(Before::Unknown),
            6 => (0u16..400).prop_map(|n| Before::Head(long_sha(n))),
        ];
        (before, proptest::option::weighted(0.97, 0u16..400)).prop_map(|(before, after)| Push {
            before,
            after: after.map(long_sha),
            at_ms: 0,
        })
    }

    /// [`RefState::record_push`] as it was first written: every question answered by
    /// scanning the heads.
    fn record_push_by_scanning(state: &mut RefState, push: &Push) -> Recorded {
        let Some(after) = &push.after else {
            if state.deleted {
                return Recorded::Unchanged;
            }
            state.deleted = true;
            state.line += 1;
            return Recorded::Changed;
        };
        let line = state.line;
        let on_this_line = if state.deleted {
            None
        } else {
            state
                .heads
                .iter()
                .position(|h| h.line == line && &h.sha == after)
        };
        if let Some(known) = on_this_line {
            let head = &mut state.heads[known];
            if head.before == Before::Unknown && push.before != Before::Unknown {
                head.before = push.before.clone();
                state.order_line();
                return Recorded::Changed;
            }
            return Recorded::Unchanged;
        }
        let seen_on_older_line = push.before.head().is_some()
            && state.heads.iter().any(|h| h.line < line && &h.sha == after);
        if seen_on_older_line {
            return Recorded::Unchanged;
        }
        state.deleted = false;
        let on_line = |h: &&Head| h.line == line;
        let newest = state.heads.iter().rev().find(on_line);
        let fills_a_gap = state
            .heads
            .iter()
            .filter(on_line)
            .any(|h| h.before.head() == Some(after));
        let in_order = !fills_a_gap
            && match push.before.head() {
                Some(before) => {
                    newest.is_some_and(|n| &n.sha == before)
                        || !state.heads.iter().filter(on_line).any(|h| &h.sha == before)
                }
                None => true,
            };
        state.heads.push_back(Head {
            sha: after.clone(),
            seq: state.next_seq,
            pushed_at_ms: push.at_ms,
            line,
            before: push.before.clone(),
        });
        state.next_seq += 1;
        if !in_order {
            state.order_line();
        }
        let excess = state.heads.len().saturating_sub(MAX_HEADS);
        state.heads.drain(..excess);
        if excess > 0 {
            state.trim_orphans();
        }
        Recorded::Changed
    }

    /// One line of history past the heads kept, as a long-lived branch has: commit `n`
    /// pushed on top of `n - 1`, some pushes swapped with the next (hooks out of order),
    /// some heads read from GitLab before their push, some pushes delivered twice.
    fn long_line() -> impl Strategy<Value = Vec<Push>> {
        proptest::collection::vec(0u8..16, 300..450).prop_map(|noise| {
            let chained = |n: usize| {
                let n = u16::try_from(n).expect("a short line");
                Push {
                    before: if n == 0 {
                        Before::Created
                    } else {
                        Before::Head(long_sha(n - 1))
                    },
                    after: Some(long_sha(n)),
                    at_ms: 0,
                }
            };
            let mut line: Vec<Push> = (0..noise.len()).map(chained).collect();
            for (n, kind) in noise.iter().enumerate() {
                if *kind == 0 && n + 1 < line.len() {
                    line.swap(n, n + 1);
                }
            }
            let mut delivered = Vec::new();
            for (push, kind) in line.into_iter().zip(noise) {
                if kind == 1 {
                    delivered.push(Push {
                        before: Before::Unknown,
                        ..push.clone()
                    });
                }
                if kind == 2 {
                    delivered.push(push.clone());
                }
                delivered.push(push);
            }
            delivered
        })
    }

    /// Records `pushes` by index and by scanning side by side: the same outcome and state
    /// after each, the kept index what indexing the heads afresh gives, and a replay of them
    /// all the same state.
    fn index_answers_as_scanning(pushes: &[Push]) -> Result<(), TestCaseError> {
        let mut indexed = RefState::default();
        let mut index = HeadIndex::of(&indexed);
        let mut scanned = RefState::default();
        for push in pushes {
            let by_index = indexed.record_indexed(push, &mut index);
            let by_scanning = record_push_by_scanning(&mut scanned, push);
            prop_assert_eq!(by_index, by_scanning, "{:?}", push);
            prop_assert_eq!(&indexed, &scanned);
            prop_assert_eq!(&index, &HeadIndex::of(&indexed));
        }
        let mut replayed = RefState::default();
        replayed.record_pushes(pushes);
        prop_assert_eq!(&replayed, &scanned);
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// The index answers what scanning the heads answered through redeliveries,
        /// deletions, heads read from GitLab and the trimming of older lines' heads.
        #[test]
        fn recording_by_index_is_recording_by_scanning(
            pushes in proptest::collection::vec(any_push(), 0..700),
        ) {
            index_answers_as_scanning(&pushes)?;
        }

        /// And on one line longer than the heads kept, whose oldest heads are trimmed at
        /// every push, as on a long-lived branch.
        #[test]
        fn a_long_line_by_index_is_a_long_line_by_scanning(pushes in long_line()) {
            let mut state = RefState::default();
            state.record_pushes(&pushes);
            prop_assert!(state.heads.iter().all(|head| head.line == 0), "one line");
            prop_assert_eq!(state.heads.len(), MAX_HEADS, "trimmed");
            index_answers_as_scanning(&pushes)?;
        }
    }

    /// [`line_order`] as it was first written: each head's ancestors walked for every head,
    /// and each next head found by scanning all of them.
    fn line_order_by_scanning(line: &[Head]) -> Vec<usize> {
        let at: std::collections::HashMap<&Sha, usize> =
            line.iter().enumerate().map(|(i, h)| (&h.sha, i)).collect();
        let parent: Vec<Option<usize>> = line
            .iter()
            .map(|h| h.before.head().and_then(|b| at.get(b).copied()))
            .collect();
        let mut first_seen: Vec<usize> = (0..line.len()).collect();
        for head in 0..line.len() {
            let mut ancestor = parent[head];
            for _ in 0..line.len() {
                let Some(up) = ancestor else { break };
                first_seen[up] = first_seen[up].min(head);
                ancestor = parent[up];
            }
        }
        let mut placed = vec![false; line.len()];
        let mut order: Vec<usize> = Vec::with_capacity(line.len());
        while let Some(next) = (0..line.len())
            .filter(|&i| !placed[i] && parent[i].is_none_or(|p| placed[p]))
            .min_by_key(|&i| (line[i].before != Before::Created, first_seen[i], i))
        {
            placed[next] = true;
            order.push(next);
        }
        order.extend((0..line.len()).filter(|&i| !placed[i]));
        order
    }

    /// A line of distinct commits whose befores are anything: the created branch, unknown,
    /// a head of the line (before or after it, itself, so cycles too) or a commit not on it.
    fn any_line() -> impl Strategy<Value = Vec<Head>> {
        (1usize..300).prop_flat_map(|len| {
            let before = proptest::prop_oneof![
                1 => Just(Before::Created),
                1 => Just(Before::Unknown),
                8 => (0..len as u16 + 8).prop_map(|n| Before::Head(long_sha(n))),
            ];
            proptest::collection::vec(before, len).prop_map(|befores| {
                befores
                    .into_iter()
                    .enumerate()
                    .map(|(n, before)| Head {
                        sha: long_sha(u16::try_from(n).expect("a short line")),
                        seq: n as u64,
                        pushed_at_ms: 0,
                        line: 0,
                        before,
                    })
                    .collect()
            })
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Ordering a line from a heap gives the order scanning gave, whatever its befores.
        #[test]
        fn a_line_ordered_from_a_heap_is_a_line_ordered_by_scanning(line in any_line()) {
            prop_assert_eq!(line_order(&line), line_order_by_scanning(&line));
        }
    }

    /// Trimming as it was first written: sort every orphan by its newest run, drop the
    /// oldest beyond the cap.
    fn trim_orphans_by_sorting(state: &mut RefState) {
        let heads: Vec<Sha> = state.heads.iter().map(|h| h.sha.clone()).collect();
        let mut orphans: Vec<(u64, Sha)> = state
            .pipelines
            .iter()
            .filter(|(sha, _)| !heads.contains(sha))
            .map(|(sha, runs)| (runs.iter().map(|p| p.id).max().unwrap_or(0), sha.clone()))
            .collect();
        orphans.sort();
        let excess = orphans.len().saturating_sub(MAX_ORPHAN_PIPELINE_COMMITS);
        for (_, sha) in orphans.into_iter().take(excess) {
            state.pipelines.remove(&sha);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// One orphan over the cap or many, with runs sharing ids, the oldest are dropped as
        /// sorting them all would drop them.
        #[test]
        fn trimming_orphans_drops_what_sorting_them_would(
            heads in proptest::collection::vec(0u16..40, 0..30),
            runs in proptest::collection::vec((0u16..200, 1u64..100), 0..200),
            late_id in 1u64..100,
        ) {
            let mut state = RefState::default();
            let mut before = Before::Created;
            for head in heads {
                state.record_push(&Push { before, after: Some(long_sha(head)), at_ms: 0 });
                before = Before::Head(long_sha(head));
            }
            // Straight into the map: the records themselves would trim on the way.
            for (sha, id) in runs {
                state
                    .pipelines
                    .entry(long_sha(sha))
                    .or_default()
                    .push(pipeline(id, PipelineStatus::Success));
            }
            // As the records leave it (at most one over), and as the facts may hold it.
            let mut one_over = state.clone();
            trim_orphans_by_sorting(&mut one_over);
            one_over
                .pipelines
                .insert(long_sha(999), vec![pipeline(late_id, PipelineStatus::Success)]);
            for untrimmed in [one_over, state] {
                let mut fast = untrimmed.clone();
                fast.trim_orphans();
                let mut slow = untrimmed;
                trim_orphans_by_sorting(&mut slow);
                prop_assert_eq!(&fast, &slow);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A ref's stored pipelines replayed in any order leave the orphans with the newest
        /// runs, as merging them all and then trimming by sorting would.
        #[test]
        fn replayed_pipelines_keep_the_newest_orphans_in_any_order(
            heads in proptest::collection::vec(0u16..40, 0..30),
            runs in proptest::collection::vec((0u16..200, 1u64..100, proptest::bool::ANY), 0..300),
        ) {
            let mut pushed = RefState::default();
            let mut before = Before::Created;
            for head in heads {
                pushed.record_push(&Push { before, after: Some(long_sha(head)), at_ms: 0 });
                before = Before::Head(long_sha(head));
            }
            let records: Vec<(Sha, Pipeline)> = runs
                .into_iter()
                .map(|(sha, id, success)| {
                    let status = if success { PipelineStatus::Success } else { PipelineStatus::Running };
                    (long_sha(sha), pipeline(id, status))
                })
                .collect();
            let mut expected = pushed.clone();
            for (sha, run) in &records {
                expected.merge_pipeline(sha, run.clone());
            }
            trim_orphans_by_sorting(&mut expected);
            let mut in_order = pushed.clone();
            in_order.replay_pipelines(&records);
            prop_assert_eq!(&in_order, &expected);
            let mut reversed = pushed;
            reversed.replay_pipelines(records.iter().rev());
            prop_assert_eq!(&reversed, &expected);
        }
    }

    #[test]
    fn late_running_update_never_hides_a_final_result() {
        let mut state = RefState::default();
        state.record_pipeline(&sha(1), pipeline(7, PipelineStatus::Success));
        assert_eq!(
            state.record_pipeline(&sha(1), pipeline(7, PipelineStatus::Running)),
            Recorded::Unchanged
        );
        assert_eq!(
            state.verdict(&sha(1)).unwrap().status,
            PipelineStatus::Success
        );
    }

    #[test]
    fn a_job_retried_in_a_failed_pipeline_makes_it_run_again() {
        let mut state = RefState::default();
        let at = |status, ms| Pipeline {
            as_of_ms: Some(ms),
            ..pipeline(7, status)
        };
        state.record_pipeline(&sha(1), at(PipelineStatus::Failed, 100));
        assert_eq!(
            state.record_pipeline(&sha(1), at(PipelineStatus::Running, 50)),
            Recorded::Unchanged,
            "stale"
        );
        assert_eq!(
            state.record_pipeline(&sha(1), at(PipelineStatus::Running, 200)),
            Recorded::Changed,
            "retried"
        );
        assert_eq!(
            state.verdict(&sha(1)).unwrap().status,
            PipelineStatus::Running
        );
        state.record_pipeline(&sha(1), at(PipelineStatus::Success, 300));
        assert_eq!(
            state.verdict(&sha(1)).unwrap().status,
            PipelineStatus::Success
        );
    }

    #[test]
    fn old_pipelines_of_a_commit_are_dropped() {
        let mut state = RefState::default();
        for id in 0..40 {
            state.record_pipeline(&sha(1), pipeline(id, PipelineStatus::Success));
        }
        let runs = &state.pipelines[&sha(1)];
        assert_eq!(runs.len(), MAX_PIPELINES_PER_COMMIT);
        assert_eq!(state.verdict(&sha(1)).unwrap().id, 39);
    }

    #[test]
    fn highest_pipeline_id_is_the_verdict_and_merge_requests_do_not_count() {
        let mut state = RefState::default();
        state.record_pipeline(&sha(1), pipeline(8, PipelineStatus::Failed));
        state.record_pipeline(&sha(1), pipeline(7, PipelineStatus::Success));
        assert_eq!(state.verdict(&sha(1)).unwrap().id, 8);
        let mut mr = pipeline(9, PipelineStatus::Success);
        mr.source = MERGE_REQUEST_SOURCE.into();
        state.record_pipeline(&sha(1), mr);
        assert_eq!(state.verdict(&sha(1)).unwrap().id, 8);
    }

    #[test]
    fn aggregate_follows_gitlab() {
        use PipelineStatus as S;
        let of = |jobs: &[(S, bool)]| aggregate_jobs(jobs);
        assert_eq!(of(&[]), None);
        assert_eq!(
            of(&[(S::Success, false), (S::Pending, false)]),
            Some(S::Running)
        );
        assert_eq!(
            of(&[(S::Success, false), (S::Manual, true)]),
            Some(S::Success)
        );
        assert_eq!(
            of(&[(S::Success, false), (S::Manual, false)]),
            Some(S::Manual)
        );
        assert_eq!(
            of(&[(S::Failed, true), (S::Success, false)]),
            Some(S::Success)
        );
        assert_eq!(
            of(&[(S::Canceled, false), (S::Success, false)]),
            Some(S::Canceled)
        );
        assert_eq!(of(&[(S::Skipped, false)]), Some(S::Skipped));
        assert_eq!(
            of(&[(S::Skipped, false), (S::Success, false)]),
            Some(S::Success)
        );
    }

    #[test]
    fn external_pipelines_made_by_commit_statuses_are_no_verdict() {
        let mut state = RefState::default();
        let mut external = pipeline(9, PipelineStatus::Success);
        external.source = EXTERNAL_SOURCE.into();
        state.record_pipeline(&sha(1), external);
        assert_eq!(state.verdict(&sha(1)), None);
        state.record_pipeline(&sha(1), pipeline(8, PipelineStatus::Failed));
        assert_eq!(state.verdict(&sha(1)).unwrap().id, 8);
    }

    #[test]
    fn branch_deletion_starts_a_new_line() {
        let mut state = RefState::default();
        state.record_push(&push(1));
        state.record_push(&Push {
            before: Before::Head(sha(1)),
            after: None,
            at_ms: 0,
        });
        assert!(state.head().is_none());
        state.record_push(&push(1));
        state.record_push(&push(2));
        let order = PushOrder::new(&state);
        assert!(order.descends_from(&sha(2), &sha(1)));
        assert!(order.on_branch(&sha(1)));
    }

    #[test]
    fn old_heads_are_trimmed() {
        let mut state = RefState::default();
        for n in 0..=255u8 {
            state.record_push(&push(n));
        }
        state.record_push(&Push {
            before: Before::Created,
            after: Some(Sha::parse(&"f".repeat(40)).unwrap()),
            at_ms: 0,
        });
        assert_eq!(state.heads.len(), MAX_HEADS);
    }
}
