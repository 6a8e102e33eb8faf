//! A stream that ends before it reads its agent's desired revision hands that revision back
//! to the evaluator, which reads it then: a broken revision shows while the agent is away.

use greenlight_e2e::*;

/// Bytes of manifests in the first revision: far more than what is on its way to an agent
/// that reads nothing (the client's 2 MiB HTTP/2 window, the server's send buffer and the
/// stream's 16 chunks of 128 KiB), so that its send blocks until the stream ends.
const LARGE_FILES: usize = 8;
const LARGE_FILE_BYTES: usize = 2 * 1024 * 1024;

/// One file over the per-file limit configured below: the revision holding it cannot be read.
const TOO_LARGE_BYTES: usize = 5 * 1024 * 1024;
const GIT_LIMITS: &str = ", max_file_bytes: 4MiB, max_total_bytes: 64MiB";

/// `count` files of `bytes` bytes each under `dir`.
fn filler_files(dir: &str, count: usize, bytes: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let line = format!("# filler {i:02}\n");
            let content = line.repeat(bytes / line.len() + 1).into_bytes();
            (format!("{dir}/{i:02}.yaml"), content)
        })
        .collect()
}

/// The short form of `sha`, as the server names a revision in its errors.
fn short(sha: &str) -> &str {
    &sha[..8]
}

/// The revision decided while the stream was stuck sending the one before is never read by
/// that stream; once the stream ends, the evaluator reads it and records why it cannot be
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_the_ended_stream_never_read_is_read_by_the_evaluator() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let large = filler_files("large", LARGE_FILES, LARGE_FILE_BYTES);
    let refs: Vec<(&str, &[u8])> = large
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    let a = repo.commit(&refs, &[])?;
    let too_large = vec![b'#'; TOO_LARGE_BYTES];
    let b = repo.commit(&[("too-large.yaml", &too_large)], &[])?;

    let setup = crate::git::setup(&repo, GIT_LIMITS, &[("prod", &[])]).await?;
    let server = &setup.server;

    // Connected but never read: the server's send of `a` fills the HTTP/2 window and the
    // stream's buffer, then waits.
    let unread = server.stream("prod").await?;
    server.push("main", ZERO, &a).await?;
    server.pipeline("main", &a, 1, "success", "push").await?;
    server.desired_becomes("prod", &a).await?;
    eventually(
        "the stream to hold part of the first revision unsent",
        || async {
            Ok((metric(server, "greenlight_stream_buffered_bytes").await? > 0.0).then_some(()))
        },
    )
    .await?;

    server.push("main", &a, &b).await?;
    server.pipeline("main", &b, 2, "success", "push").await?;
    server.desired_becomes("prod", &b).await?;
    // The agent streams here, so the evaluator left `b` to the stream, which is still stuck
    // on `a`: nothing has read `b` yet.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let status = server.agent_status("prod").await?;
    assert_eq!(status.sync_error, "", "no one read {} yet", short(&b));
    assert!(
        metric(server, "greenlight_stream_buffered_bytes").await? > 0.0,
        "the stream is still sending the first revision"
    );

    // The agent goes away having read nothing: its stream read `a` last, so `b` is read now.
    drop(unread);
    let error = crate::git::wait_for_sync_error(server, "prod", short(&b)).await?;
    assert!(error.contains(short(&b)), "{error}");
    assert!(error.contains("too-large.yaml"), "{error}");
    Ok(())
}
