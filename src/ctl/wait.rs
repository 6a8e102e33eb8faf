//! `greenlightctl wait`: follows one commit on one agent until it ends, with the exit code
//! a CI job needs.

use std::io::IsTerminal;
use std::time::Duration;

use crate::v1::revision_state::State;
use crate::v1::{RevisionState, WatchRevisionRequest};

use super::Admin;
use super::output::{Format, short};

/// Exit codes, as documented in `--help`.
pub const HEALTHY: i32 = 0;
pub const FAILED: i32 = 1;
pub const SUPERSEDED_EXACT: i32 = 3;
pub const TIMED_OUT: i32 = 124;

/// Waits for `sha` on `agent`; returns the exit code. A dropped watch (a server restart,
/// the network) is resumed within the same deadline.
pub async fn wait(
    admin: &mut Admin,
    format: Format,
    agent: &str,
    sha: &str,
    timeout: Duration,
    exact: bool,
) -> anyhow::Result<i32> {
    let sha = sha.trim().to_ascii_lowercase();
    let terminal = std::io::stdout().is_terminal() && format == Format::Human;
    let mut last_line = String::new();
    // Why the last watch ended, told with a timeout: a CI log then says what kept failing.
    let mut last_error: Option<tonic::Status> = None;
    let watch = async {
        let mut retry = Duration::from_millis(500);
        loop {
            let request = WatchRevisionRequest {
                name: agent.to_owned(),
                sha: sha.clone(),
            };
            let outcome = async {
                let mut states = admin.watch_revision(request).await?.into_inner();
                while let Some(state) = states.message().await? {
                    // A watch that answers is no longer failing.
                    last_error = None;
                    show(&state, format, terminal, &mut last_line);
                    if let Some(code) = exit_code(&state, &sha, exact) {
                        if terminal {
                            println!();
                        }
                        return Ok(Some(code));
                    }
                }
                Ok::<_, tonic::Status>(None)
            }
            .await;
            match outcome {
                Ok(Some(code)) => return Ok(code),
                // Refusals are final; everything else is worth another try.
                Err(status) if is_final_refusal(&status) => {
                    return Err(anyhow::Error::from(status));
                }
                Ok(None) | Err(_) => {
                    last_error = outcome.err();
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(10));
                }
            }
        }
    };
    match tokio::time::timeout(timeout, watch).await {
        Err(_) => {
            if terminal {
                println!();
            }
            eprintln!("{}", timed_out(timeout, &sha, agent, last_error.as_ref()));
            Ok(TIMED_OUT)
        }
        Ok(result) => result,
    }
}

/// What a wait that timed out tells, with the server's last refusal when a watch kept
/// failing (a CI log then says why, not only that it waited).
fn timed_out(timeout: Duration, sha: &str, agent: &str, last: Option<&tonic::Status>) -> String {
    let waited = format!(
        "timed out after {} waiting for {} on {agent}",
        humantime::format_duration(timeout),
        short(sha)
    );
    match last {
        Some(status) => format!(
            "{waited}; the server last answered {:?}: {}",
            status.code(),
            status.message()
        ),
        None => waited,
    }
}

fn is_final_refusal(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument
    )
}

fn show(state: &RevisionState, format: Format, terminal: bool, last_line: &mut String) {
    let line = describe(state);
    if format == Format::Json {
        println!("{}", super::output::state_json(state));
    } else if line != *last_line {
        if terminal {
            // Progress on one line, rewritten in place.
            print!("\r\x1b[2K{line}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        } else {
            println!("{line}");
        }
        *last_line = line;
    }
}

/// The exit code once `state` settles the wait.
pub fn exit_code(state: &RevisionState, sha: &str, exact: bool) -> Option<i32> {
    let deployed = state.deployed_sha.to_ascii_lowercase();
    let sha = sha.to_ascii_lowercase();
    let superseded =
        !deployed.is_empty() && !deployed.starts_with(&sha) && !sha.starts_with(&deployed);
    match state.state() {
        _ if exact && superseded => Some(SUPERSEDED_EXACT),
        State::Healthy => Some(HEALTHY),
        State::Superseded => Some(HEALTHY),
        State::Failed | State::Degraded => Some(FAILED),
        State::Waiting | State::Applying | State::Unspecified => None,
    }
}

/// One line for people.
pub fn describe(state: &RevisionState) -> String {
    let progress = if state.objects_total > 0 {
        format!(" ({}/{} objects)", state.objects_done, state.objects_total)
    } else {
        String::new()
    };
    let label = match state.state() {
        State::Waiting => "waiting",
        State::Applying => "applying",
        State::Healthy => "healthy",
        State::Failed => "failed",
        State::Degraded => "degraded",
        State::Superseded => "superseded",
        State::Unspecified => "unknown",
    };
    let on = if state.deployed_sha.is_empty() {
        String::new()
    } else {
        format!(" [{}]", short(&state.deployed_sha))
    };
    format!("{label}{on}{progress}: {}", state.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_says_what_the_server_last_answered() {
        let sha = "a".repeat(40);
        let minute = Duration::from_secs(60);
        assert_eq!(
            timed_out(minute, &sha, "prod", None),
            "timed out after 1m waiting for aaaaaaaa on prod"
        );
        let store_down = tonic::Status::unavailable("the store is unavailable: connection refused");
        assert_eq!(
            timed_out(minute, &sha, "prod", Some(&store_down)),
            "timed out after 1m waiting for aaaaaaaa on prod; the server last answered \
             Unavailable: the store is unavailable: connection refused"
        );
    }

    fn state(state: State, deployed: &str) -> RevisionState {
        RevisionState {
            state: state.into(),
            deployed_sha: deployed.into(),
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_follow_the_documented_contract() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        assert_eq!(exit_code(&state(State::Healthy, &a), &a, false), Some(0));
        assert_eq!(exit_code(&state(State::Degraded, &a), &a, false), Some(1));
        assert_eq!(exit_code(&state(State::Failed, &a), &a, true), Some(1));
        assert_eq!(exit_code(&state(State::Superseded, &b), &a, false), Some(0));
        assert_eq!(exit_code(&state(State::Superseded, &b), &a, true), Some(3));
        assert_eq!(
            exit_code(&state(State::Waiting, &b), &a, true),
            Some(3),
            "exact stops as soon as it is superseded"
        );
        assert_eq!(exit_code(&state(State::Waiting, ""), &a, true), None);
        assert_eq!(
            exit_code(&state(State::Applying, &a[..8]), &a, true),
            None,
            "short shas match"
        );
    }
}
