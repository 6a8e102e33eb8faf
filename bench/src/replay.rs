//! `replay`: what rebuilding a ref's heads from its stored pushes costs the evaluation, for
//! a line delivered in order (the ceiling) and for lines with hooks delivered out of order.

use std::time::{Duration, Instant};

use anyhow::Context;
use greenlight_server::gate::{Before, Push, RefState, Sha};
use greenlight_server::store::PUSHES_KEPT;

use crate::stats::Summary;

/// Options of the `replay` scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pushes replayed (a ref's stored history holds up to this many by default).
    #[arg(long, default_value_t = PUSHES_KEPT)]
    pushes: usize,
    /// Timed replays of each line.
    #[arg(long, default_value_t = 200)]
    replays: usize,
    /// Lines with every Nth pair of pushes swapped, as GitLab's concurrent hooks deliver
    /// them; the line in order is always measured first.
    #[arg(long, value_delimiter = ',', default_value = "64,16,8")]
    swap_every: Vec<usize>,
}

/// Times [`RefState::record_pushes`] over each line.
pub async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "replay: {} pushes of one line, {} replays each (release build: cargo build --release -p greenlight-bench)",
        args.pushes, args.replays
    );
    let in_order = line(args.pushes)?;
    let ceiling = time(&in_order, args.replays).context("no replay was timed")?;
    println!("in order (the ceiling): {}", per_replay(&ceiling));
    for every in args.swap_every {
        anyhow::ensure!(every > 0, "--swap-every takes numbers above 0");
        let mut swapped = in_order.clone();
        for n in (0..swapped.len().saturating_sub(1)).step_by(every) {
            swapped.swap(n, n + 1);
        }
        let timed = time(&swapped, args.replays).context("no replay was timed")?;
        println!(
            "every {every}th pair swapped: {}; {:.2} × the ceiling (p50)",
            per_replay(&timed),
            timed.p50.as_secs_f64() / ceiling.p50.as_secs_f64().max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

/// Commit `n` pushed on top of commit `n - 1`, the first creating the branch.
fn line(pushes: usize) -> anyhow::Result<Vec<Push>> {
    let sha = |n: usize| Sha::parse(&format!("{n:040x}")).context("a commit id");
    (0..pushes)
        .map(|n| {
            Ok(Push {
                before: match n.checked_sub(1) {
                    None => Before::Created,
                    Some(previous) => Before::Head(sha(previous)?),
                },
                after: Some(sha(n)?),
                at_ms: 0,
            })
        })
        .collect()
}

fn time(pushes: &[Push], replays: usize) -> Option<Summary> {
    let mut samples: Vec<Duration> = (0..replays)
        .map(|_| {
            let started = Instant::now();
            let mut state = RefState::default();
            state.record_pushes(pushes);
            std::hint::black_box(&state);
            started.elapsed()
        })
        .collect();
    Summary::of(&mut samples)
}

fn per_replay(summary: &Summary) -> String {
    format!(
        "p50 {} µs, p99 {} µs a replay (min {} µs)",
        summary.p50.as_micros(),
        summary.p99.as_micros(),
        summary.min.as_micros()
    )
}
