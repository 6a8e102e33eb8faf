//! Badges: public ones at `/badges/<agent>.svg`, private ones only at their unguessable
//! `/badges/<agent>/<key>.svg`; never a token in the query string. Coloured by state.

use greenlight::digest::sha256_hex;
use greenlight::v1::{GetAgentRequest, PauseSyncRequest, Phase, ResumeSyncRequest, StatusReport};
use greenlight_e2e::*;

/// The CI token of agent `prod`.
const CI_TOKEN: &str = "ci-token-prod";
/// What every 404 of the badge routes says.
const NOT_FOUND: (u16, &str) = (
    404,
    "no such badge: a private badge is served at the URL `greenlightctl badge-url <agent>` prints",
);

/// Agent `prod` (private badge, with a CI token) and `staging` (public badge), and a badge
/// secret in `secrets`.
async fn server(secrets: &tempfile::TempDir) -> anyhow::Result<TestServer> {
    let secret_file = secrets.path().join("badge-secret");
    std::fs::write(&secret_file, "9c0e5b1f3a7d4e2b8f6a1c0d9e8b7a6f\n")?;
    let mut yaml = config_yaml(None, &[AgentDef::new("prod"), AgentDef::new("staging")]).replace(
        "  - name: staging\n",
        &format!(
            "    ci_token_sha256: \"{}\"\n  - name: staging\n",
            sha256_hex(CI_TOKEN.as_bytes())
        ),
    );
    yaml.push_str("    badge: public\n");
    yaml.push_str(&format!(
        "badges: {{ secret_file: \"{}\" }}\n",
        secret_file.display()
    ));
    TestServer::start(&yaml).await
}

/// GETs `path` on the HTTP listener, with `bearer` as the Authorization header if given;
/// returns status, content type and body.
async fn get(
    server: &TestServer,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    install_crypto();
    let mut request = reqwest::Client::new().get(format!("http://{}{path}", server.http));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((status, content_type, response.text().await?))
}

/// The status and body of `path`, to compare with `NOT_FOUND`.
async fn answer(server: &TestServer, path: &str) -> anyhow::Result<(u16, String)> {
    let (status, _, body) = get(server, path, None).await?;
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_badges_are_served_only_at_their_key_never_for_a_token() -> anyhow::Result<()> {
    let secrets = tempfile::tempdir()?;
    let server = server(&secrets).await?;
    let not_found = (NOT_FOUND.0, NOT_FOUND.1.to_owned());

    // The CI token (and the admin token) learn the badge's path from GetAgent.
    let path = server
        .admin_as(CI_TOKEN)
        .await?
        .get_agent(GetAgentRequest {
            name: "prod".into(),
        })
        .await?
        .into_inner()
        .badge_path;
    assert_eq!(server.agent_status("prod").await?.badge_path, path);
    let key = path
        .strip_prefix("/badges/prod/")
        .and_then(|rest| rest.strip_suffix(".svg"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(key.len(), 32, "{path}");

    let (status, content_type, svg) = get(&server, &path, None).await?;
    assert_eq!((status, content_type.as_str()), (200, "image/svg+xml"));
    assert!(svg.starts_with("<svg"), "{svg}");

    // Without the key, a private badge answers exactly as an agent that does not exist,
    // whatever token comes along, in the query string or a header.
    for probe in [
        "/badges/prod.svg".to_owned(),
        format!("/badges/prod.svg?token={CI_TOKEN}"),
        format!("/badges/prod.svg?token={ADMIN_TOKEN}"),
        "/badges/nobody.svg".to_owned(),
        format!("/badges/nobody/{key}.svg"),
        format!("/badges/staging/{key}.svg"),
        format!("/badges/prod/{}.svg", &key[..31]),
        format!("/badges/prod/{key}.png"),
    ] {
        assert_eq!(answer(&server, &probe).await?, not_found, "{probe}");
    }
    let (status, _, body) = get(&server, "/badges/prod.svg", Some(ADMIN_TOKEN)).await?;
    assert_eq!(
        (status, body),
        not_found,
        "a bearer header opens nothing either"
    );

    // Public badges need nothing.
    let public = server.agent_status("staging").await?.badge_path;
    assert_eq!(public, "/badges/staging.svg");
    let (status, content_type, _) = get(&server, &public, None).await?;
    assert_eq!((status, content_type.as_str()), (200, "image/svg+xml"));

    // greenlightctl prints the URL for an operator.
    let base = format!("http://{}", server.http);
    let code = greenlight::ctl::run([
        "greenlightctl",
        "--server",
        &server.grpc_url(),
        "--token",
        ADMIN_TOKEN,
        "badge-url",
        "prod",
        "--base",
        &base,
    ])
    .await;
    assert_eq!(code, 0);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badges_are_coloured_by_state() -> anyhow::Result<()> {
    let secrets = tempfile::tempdir()?;
    let server = server(&secrets).await?;
    let path = server.agent_status("prod").await?.badge_path;
    let badge = || async { Ok::<_, anyhow::Error>(get(&server, &path, None).await?.2) };
    let agent = server.agent("prod").await?;
    let mut stream = agent.sync(None).await?;
    let report = |revision: &str, phase: Phase| StatusReport {
        revision: revision.to_owned(),
        phase: phase.into(),
        ..Default::default()
    };
    assert!(badge().await?.contains("no deploy yet"));

    // Healthy: green, with the short SHA.
    let x = sha(1);
    server.release(ZERO, &x, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), x);
    agent.report(report(&x, Phase::Healthy)).await?;
    server.reported("prod", &x, Phase::Healthy).await?;
    let svg = badge().await?;
    assert!(svg.contains("#4c1"), "{svg}");
    assert!(svg.contains(&x[..8]), "{svg}");
    assert!(svg.contains("healthy"), "{svg}");

    // Paused: grey.
    let mut admin = server.admin().await?;
    admin
        .pause_sync(PauseSyncRequest {
            name: "prod".into(),
            reason: "freeze".into(),
        })
        .await?;
    let svg = badge().await?;
    assert!(svg.contains("#9f9f9f"), "{svg}");
    assert!(svg.contains("paused"), "{svg}");
    assert!(!svg.contains("#4c1"), "{svg}");
    admin
        .resume_sync(ResumeSyncRequest {
            name: "prod".into(),
        })
        .await?;

    // Degraded: red.
    let y = sha(2);
    server.release(&x, &y, 2).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), y);
    agent.report(report(&y, Phase::Degraded)).await?;
    server.reported("prod", &y, Phase::Degraded).await?;
    let svg = badge().await?;
    assert!(svg.contains("#e05d44"), "{svg}");
    assert!(svg.contains(&y[..8]), "{svg}");
    assert!(svg.contains("degraded"), "{svg}");
    server.stop().await
}
