//! A large manifest set from git, streamed to many agents.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight_e2e::{GitRepo, Redis, TestServer, git_agent_yaml, git_config_yaml};

use crate::common::{SETTLE, Streams, counter, push_and_settle, require_tool, send_green};
use crate::stats::{mib, ms};

/// Options of `manifests`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML files in the commit.
    #[arg(long, default_value_t = 1000)]
    files: usize,
    /// Their total size in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    bytes: u64,
    /// Agents configured with the repository, each streaming.
    #[arg(long, default_value_t = 100)]
    agents: usize,
}

/// File `index` of `count`, so that all of them together have exactly `total` bytes.
fn yaml_file(index: usize, count: usize, total: u64) -> Vec<u8> {
    let count64 = count as u64;
    let size = usize::try_from(total / count64 + u64::from((index as u64) < total % count64))
        .unwrap_or(usize::MAX);
    let mut text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bench-{index:05}\ndata:\n  payload: |\n"
    );
    let mut line = 0u32;
    while text.len() < size {
        text.push_str(&format!(
            "    {index:05}-{line:06} the quick brown fox jumps over the lazy dog\n"
        ));
        line += 1;
    }
    let mut bytes = text.into_bytes();
    bytes.truncate(size);
    if let Some(last) = bytes.last_mut() {
        *last = b'\n';
    }
    bytes
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.files == 0 || args.agents == 0 {
        bail!("--files and --agents must be at least 1");
    }
    let redis_version = require_tool("redis-server", "for the manifests scenario")?;
    let git_version = require_tool("git", "for the manifests scenario")?;
    println!("redis: {redis_version}\ngit: {git_version}");

    let started = Instant::now();
    let repo = GitRepo::new().context("cannot create the git repository")?;
    let files: Vec<(String, Vec<u8>)> = (0..args.files)
        .map(|i| {
            (
                format!("deploy/{:03}/bench-{i:05}.yaml", i / 100),
                yaml_file(i, args.files, args.bytes),
            )
        })
        .collect();
    let total: u64 = files.iter().map(|(_, c)| c.len() as u64).sum();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    let commit = repo.commit(&refs, &[]).context("cannot commit the files")?;
    drop(refs);
    drop(files);
    println!(
        "setup: commit of {} files, {} bytes ({} MiB) in {} ms",
        args.files,
        total,
        mib(total),
        ms(started.elapsed())
    );

    let redis = Redis::start().await.context("cannot start redis-server")?;
    let cache = tempfile::tempdir().context("cannot create the mirror cache directory")?;
    let names: Vec<String> = (0..args.agents).map(|i| format!("agent-{i:04}")).collect();
    let agents: Vec<String> = names
        .iter()
        .map(|name| git_agent_yaml(name, &repo.url(), &[]))
        .collect();
    // Room for the requested set: the defaults allow 1000 files and 20 MiB.
    let limits = format!(
        ", max_files: {}, max_total_bytes: {}",
        args.files.max(1000),
        total.max(20 * 1024 * 1024)
    );
    let server = TestServer::start(&git_config_yaml(
        &redis.url(),
        cache.path(),
        &limits,
        &agents,
    ))
    .await
    .context("cannot start the server")?;
    let mut streams = Streams::open(&server, &names).await?;
    let fetches_before = counter(&server, "greenlight_git_fetches_total").await?;
    let reads_before = counter(&server, "greenlight_manifest_reads_total").await?;

    let waited = push_and_settle(&server, cache.path(), &commit).await?;

    let green = send_green(&server, &commit, 1).await?;
    let (sent, answered) = (green.at, green.answered);
    let receipts = streams
        .all_receive(&commit, Duration::from_secs(90))
        .await?;
    for receipt in &receipts {
        if receipt.files != args.files || receipt.bytes != total {
            bail!(
                "agent {} received {} files, {} bytes; expected {} files, {total} bytes",
                receipt.agent,
                receipt.files,
                receipt.bytes,
                args.files
            );
        }
    }
    let mut times: Vec<Duration> = receipts
        .iter()
        .map(|r| r.at.saturating_duration_since(sent))
        .collect();
    times.sort_unstable();
    streams.close();
    let fetches = counter(&server, "greenlight_git_fetches_total").await?;
    let reads = counter(&server, "greenlight_manifest_reads_total").await?;
    server.stop().await.context("cannot stop the server")?;
    drop(redis);

    let (first, last) = (times[0], times[times.len() - 1]);
    let median = times[(times.len() - 1) / 2];
    println!(
        "scenario: manifests, {} files, {} bytes, {} agents, store redis",
        args.files, total, args.agents
    );
    println!(
        "waited {} ms after the push webhook for its fetch (incl. {} ms settling); not timed",
        ms(waited),
        ms(SETTLE)
    );
    println!("pipeline webhook HTTP response time: {} ms", ms(answered));
    println!("pipeline webhook sent -> agent holds every byte (trailer verified):");
    println!("  first agent  {} ms", ms(first));
    println!("  median agent {} ms", ms(median));
    println!("  last agent   {} ms", ms(last));
    println!(
        "  delivered {} MiB in all, {:.1} MiB/s until the last agent",
        mib(total * args.agents as u64),
        (total * args.agents as u64) as f64 / (1024.0 * 1024.0) / last.as_secs_f64()
    );
    println!(
        "metrics: greenlight_git_fetches_total {fetches} ({} since the push), greenlight_manifest_reads_total {reads} ({} since the push; expected 1)",
        fetches - fetches_before,
        reads - reads_before
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::yaml_file;

    #[test]
    fn files_add_up_to_the_total() {
        let total: usize = (0..7).map(|i| yaml_file(i, 7, 100_003).len()).sum();
        assert_eq!(total, 100_003);
        assert!(yaml_file(0, 7, 100_003).ends_with(b"\n"));
    }
}
