//! Ancestry from real history, answered up front so that the gate stays pure and synchronous.
//!
//! Asking merge-base for every (candidate, anchor) pair walks the same history once per
//! pair, which grows with candidates × distance. Instead every commit gets its generation
//! (1 + the highest generation of its parents), which orders children before parents; one
//! walk in that order carries, for each commit, the set of asked-about commits it is an
//! ancestor of, and stops below the oldest asked-about generation. Generations never change,
//! so they are kept per mirror and computed only for new commits.

use std::collections::{BinaryHeap, HashMap, HashSet};

use gix::ObjectId;

use super::GitError;
use super::mirror::{describe, resolve_commit};
use crate::gate::{Lineage, Sha};

/// Generations of the mirror's commits, kept between calls.
pub(super) type Generations = gix::hashtable::HashMap<ObjectId, u32>;

/// Beyond this many cached generations (about 40 MB) the cache starts over, bounding memory
/// for huge histories at the price of recomputing them.
const MAX_GENERATIONS: usize = 1_000_000;

/// Which of the asked-about commits are on the branch and which descend from which.
#[derive(Debug, Clone, Default)]
pub struct GitLineage {
    /// Asked-about commits that the mirror has, by the name they were asked with.
    present: HashSet<Sha>,
    /// Asked-about commits that the branch tip has in its history.
    on_branch: HashSet<Sha>,
    /// The bit standing for each asked-about commit in `descendants`.
    bit: HashMap<Sha, usize>,
    /// For each asked-about commit, the asked-about commits that have it in their history.
    descendants: HashMap<Sha, Vec<u64>>,
    /// The generation of each asked-about commit: 1 + the highest of its parents'.
    generations: HashMap<Sha, u32>,
}

impl Lineage for GitLineage {
    fn on_branch(&self, sha: &Sha) -> bool {
        self.on_branch.contains(sha)
    }

    fn descends_from(&self, descendant: &Sha, ancestor: &Sha) -> bool {
        match (self.bit.get(descendant), self.descendants.get(ancestor)) {
            (Some(&bit), Some(set)) => has(set, bit),
            _ => false,
        }
    }

    fn knows(&self, sha: &Sha) -> bool {
        self.present.contains(sha)
    }

    fn generation(&self, sha: &Sha) -> Option<u32> {
        self.generations.get(sha).copied()
    }
}

/// Answers every question the gate may ask about `candidates` and `anchors` on `branch`:
/// on_branch for each, and descends_from for any two of them.
pub(super) fn compute(
    repo: gix::Repository,
    branch: &str,
    candidates: &[Sha],
    anchors: &[Sha],
    generations: &mut Generations,
) -> Result<GitLineage, GitError> {
    let failed = |err: gix::Error| GitError::Repository {
        message: format!("walking history: {}", describe(&err, &[])),
    };
    let mut asked: HashMap<Sha, ObjectId> = HashMap::new();
    for sha in candidates.iter().chain(anchors) {
        if !asked.contains_key(sha)
            && let Some(id) = resolve_commit(&repo, sha)?
        {
            asked.insert(sha.clone(), id);
        }
    }
    let tip = branch_tip(&repo, branch)?;

    // Each distinct commit gets a bit; the tip is one more start of the walk.
    let mut bits: gix::hashtable::HashMap<ObjectId, usize> = Default::default();
    for id in asked.values().copied().chain(tip) {
        let next = bits.len();
        bits.entry(id).or_insert(next);
    }
    let words = bits.len().div_ceil(64);

    let mut graph = repo.revision_graph::<gix::revwalk::graph::Commit<()>>(None);
    for &id in bits.keys() {
        generation(&mut graph, generations, id).map_err(failed)?;
    }
    let floor = asked
        .values()
        .filter_map(|id| generations.get(id).copied())
        .min()
        .unwrap_or(u32::MAX);

    // Children come before parents in generation order, so a commit's set is complete when
    // it is popped; nothing below the oldest asked-about commit can be one of them.
    let mut reached: gix::hashtable::HashMap<ObjectId, Vec<u64>> = Default::default();
    let mut queue = BinaryHeap::new();
    for (&id, &bit) in &bits {
        let set = reached.entry(id).or_insert_with(|| vec![0; words]);
        set[bit / 64] |= 1 << (bit % 64);
        if let Some(&g) = generations.get(&id) {
            queue.push((g, id));
        }
    }
    while let Some((g, id)) = queue.pop() {
        if g < floor {
            break;
        }
        let Some(set) = reached.get(&id).cloned() else {
            continue;
        };
        let parents = match graph.get_or_insert_commit(id, |_| {}).map_err(failed)? {
            Some(commit) => commit.parents.clone(),
            None => continue,
        };
        for parent in parents {
            let Some(&parent_generation) = generations.get(&parent) else {
                continue;
            };
            if parent_generation < floor {
                continue;
            }
            match reached.get_mut(&parent) {
                Some(known) => known.iter_mut().zip(&set).for_each(|(k, s)| *k |= s),
                None => {
                    reached.insert(parent, set.clone());
                    queue.push((parent_generation, parent));
                }
            }
        }
    }
    let mut lineage = GitLineage::default();
    let tip_bit = tip.and_then(|tip| bits.get(&tip).copied());
    for (sha, id) in asked {
        let set = reached.get(&id).cloned().unwrap_or_else(|| vec![0; words]);
        if tip_bit.is_some_and(|bit| has(&set, bit)) {
            lineage.on_branch.insert(sha.clone());
        }
        if let Some(&bit) = bits.get(&id) {
            lineage.bit.insert(sha.clone(), bit);
        }
        if let Some(&g) = generations.get(&id) {
            lineage.generations.insert(sha.clone(), g);
        }
        lineage.descendants.insert(sha.clone(), set);
        lineage.present.insert(sha);
    }
    if generations.len() > MAX_GENERATIONS {
        generations.clear();
    }
    Ok(lineage)
}

fn has(set: &[u64], bit: usize) -> bool {
    set.get(bit / 64)
        .is_some_and(|word| word & (1 << (bit % 64)) != 0)
}

/// Computes the generation of `start` and of every ancestor not known yet, depth first
/// without recursion because histories are deep.
fn generation(
    graph: &mut gix::revwalk::Graph<'_, '_, gix::revwalk::graph::Commit<()>>,
    generations: &mut Generations,
    start: ObjectId,
) -> gix::Result<()> {
    let mut stack = vec![(start, false)];
    while let Some((id, parents_done)) = stack.pop() {
        if generations.contains_key(&id) {
            continue;
        }
        // A commit missing from the mirror (never the case outside corruption) has no
        // generation and does not count for its children.
        let Some(commit) = graph.get_or_insert_commit(id, |_| {})? else {
            continue;
        };
        if parents_done {
            let highest = commit
                .parents
                .iter()
                .filter_map(|parent| generations.get(parent))
                .max()
                .copied()
                .unwrap_or(0);
            generations.insert(id, highest + 1);
        } else {
            stack.push((id, true));
            let unknown = commit
                .parents
                .iter()
                .filter(|p| !generations.contains_key(*p));
            stack.extend(unknown.map(|parent| (*parent, false)));
        }
    }
    Ok(())
}

/// The commit `branch` points to in the mirror; `None` when there is no such branch.
fn branch_tip(repo: &gix::Repository, branch: &str) -> Result<Option<ObjectId>, GitError> {
    let name = if branch.starts_with("refs/") {
        branch.to_owned()
    } else {
        format!("refs/heads/{branch}")
    };
    // A name git would reject cannot be a branch of the mirror.
    let Ok(name) = gix::refs::FullName::try_from(name) else {
        return Ok(None);
    };
    let found = repo
        .try_find_reference(name.as_ref())
        .map_err(|err| GitError::Repository {
            message: format!("reading branch {branch}: {}", describe(&err, &[])),
        })?;
    let Some(mut reference) = found else {
        return Ok(None);
    };
    let id = reference
        .peel_to_id()
        .map_err(|err| GitError::Repository {
            message: format!("branch {branch} is broken: {}", describe(&err, &[])),
        })?
        .detach();
    let header = repo
        .try_find_header(id)
        .map_err(|err| GitError::Repository {
            message: format!("branch {branch} is broken: {}", describe(&err, &[])),
        })?;
    Ok(header
        .is_some_and(|header| header.kind() == gix::objs::Kind::Commit)
        .then_some(id))
}
