//! The status page `/agents/<agent>`: the badge's access rules, escaped content, and what a
//! person sees in a browser.

use greenlight::v1::object_result::Action;
use greenlight::v1::{ObjectResult, PauseSyncRequest, Phase, StatusReport};
use greenlight_e2e::*;

/// What every 404 of the page routes says.
const NOT_FOUND: &str = "no such status page: a private agent's page is at /agents/<agent>/<key>, with the key of the URL `greenlightctl badge-url <agent>` prints";

/// Agent `prod` (private) and `staging` (public), and a badge secret in `secrets`.
async fn server(secrets: &tempfile::TempDir) -> anyhow::Result<TestServer> {
    let secret_file = secrets.path().join("badge-secret");
    std::fs::write(&secret_file, "5b1f3a7d4e2b8f6a1c0d9e8b7a6f9c0e\n")?;
    let mut yaml = config_yaml(None, &[AgentDef::new("prod"), AgentDef::new("staging")]);
    yaml.push_str("    badge: public\n");
    yaml.push_str(&format!(
        "badges: {{ secret_file: \"{}\" }}\n",
        secret_file.display()
    ));
    TestServer::start(&yaml).await
}

/// An answer of the HTTP listener.
struct Answer {
    status: u16,
    header: std::collections::HashMap<String, String>,
    body: String,
}

async fn get(server: &TestServer, path: &str, bearer: Option<&str>) -> anyhow::Result<Answer> {
    install_crypto();
    let mut request = reqwest::Client::new().get(format!("http://{}{path}", server.http));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let header = response
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = value.to_str().unwrap_or_default().to_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    Ok(Answer {
        status,
        header,
        body: response.text().await?,
    })
}

/// The key of `agent`'s private URLs, from the badge path `GetAgent` gives the admin.
async fn key_of(server: &TestServer, agent: &str) -> anyhow::Result<String> {
    let path = server.agent_status(agent).await?.badge_path;
    let key = path
        .strip_prefix(&format!("/badges/{agent}/"))
        .and_then(|rest| rest.strip_suffix(".svg"))
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(key.len() == 32, "no private badge key in {path:?}");
    Ok(key)
}

fn object(kind: &str, namespace: &str, name: &str, action: Action, message: &str) -> ObjectResult {
    let api_version = if kind == "Deployment" {
        "apps/v1"
    } else {
        "v1"
    };
    ObjectResult {
        api_version: api_version.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        action: action.into(),
        message: message.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_answers_as_the_badge_does_and_escapes_what_it_shows() -> anyhow::Result<()> {
    let secrets = tempfile::tempdir()?;
    let server = server(&secrets).await?;
    let key = key_of(&server, "prod").await?;

    // A public agent's page needs nothing.
    let page = get(&server, "/agents/staging", None).await?;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.header["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.header["referrer-policy"], "no-referrer");
    assert!(
        page.header["content-security-policy"].starts_with("default-src 'none'"),
        "{:?}",
        page.header
    );
    assert!(page.body.starts_with("<!DOCTYPE html>"), "{}", page.body);
    assert!(page.body.contains("<h1>staging</h1>"), "{}", page.body);
    assert!(!page.body.contains("<script"), "{}", page.body);

    // A private one's only at its key; without it, it answers as an unknown agent does,
    // whatever token comes along.
    let page = get(&server, &format!("/agents/prod/{key}"), None).await?;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<h1>prod</h1>"), "{}", page.body);
    assert!(
        !page.body.contains(&key),
        "the page does not repeat its key"
    );
    for probe in [
        "/agents/prod".to_owned(),
        format!("/agents/prod?token={ADMIN_TOKEN}"),
        "/agents/nobody".to_owned(),
        format!("/agents/nobody/{key}"),
        format!("/agents/staging/{key}"),
        format!("/agents/prod/{}", &key[..31]),
        format!("/agents/prod/{key}x"),
    ] {
        let answer = get(&server, &probe, None).await?;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (404, NOT_FOUND),
            "{probe}"
        );
    }
    let answer = get(&server, "/agents/prod", Some(ADMIN_TOKEN)).await?;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (404, NOT_FOUND),
        "a bearer header opens nothing either"
    );

    // What operators and agents wrote is shown as text, never as markup.
    let hostile = r#"<script>alert("owned")</script><img src=x onerror='alert(1)'> & more"#;
    let x = sha(1);
    let agent = server.agent("prod").await?;
    let mut stream = agent.sync(None).await?;
    server.release(ZERO, &x, 1).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    agent
        .report(StatusReport {
            revision: x.clone(),
            phase: Phase::Failed.into(),
            message: hostile.into(),
            objects: vec![object(
                "ConfigMap",
                "apps",
                hostile,
                Action::Failed,
                hostile,
            )],
            generation: revision.generation(),
            ..Default::default()
        })
        .await?;
    server.reported("prod", &x, Phase::Failed).await?;
    server
        .admin()
        .await?
        .pause_sync(PauseSyncRequest {
            name: "prod".into(),
            reason: hostile.into(),
        })
        .await?;
    let page = get(&server, &format!("/agents/prod/{key}"), None).await?;
    assert_eq!(page.status, 200, "{}", page.body);
    let escaped = "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;&lt;img src=x onerror=&#39;alert(1)&#39;&gt; &amp; more";
    // The pause reason, the report's message, the object's name and its message.
    assert!(
        page.body.matches(escaped).count() >= 4,
        "{} escaped copies in {}",
        page.body.matches(escaped).count(),
        page.body
    );
    for raw in ["<script", "<img", "onerror='"] {
        assert!(!page.body.contains(raw), "{raw} in {}", page.body);
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() -> anyhow::Result<()> {
    let Some(chromium) = Chromium::find("status_page_renders_in_headless_chromium")? else {
        return Ok(());
    };
    let secrets = tempfile::tempdir()?;
    let server = server(&secrets).await?;

    // staging deploys x and reports its objects, one of which does not become healthy; y's
    // pipeline fails.
    let (x, y) = (sha(1), sha(2));
    let agent = server.agent("staging").await?;
    let mut stream = agent.sync(None).await?;
    server.release(ZERO, &x, 1).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    let report = |phase: Phase, message: &str, objects: Vec<ObjectResult>| StatusReport {
        revision: x.clone(),
        phase: phase.into(),
        message: message.into(),
        objects_done: 4,
        objects_total: 4,
        objects,
        generation: revision.generation(),
        ..Default::default()
    };
    agent
        .report(report(
            Phase::Applied,
            "4 objects: 2 applied, 1 unchanged, 1 pruned",
            vec![
                object("Namespace", "", "apps", Action::Unchanged, ""),
                object("ConfigMap", "apps", "settings", Action::Applied, ""),
                object("Deployment", "apps", "web", Action::Applied, ""),
                object("Service", "apps", "legacy", Action::Pruned, ""),
            ],
        ))
        .await?;
    let unavailable = "Available=False: 1 of 2 replicas available";
    agent
        .report(report(
            Phase::Degraded,
            &format!("not healthy after 300s: Deployment apps/web: {unavailable}"),
            vec![object(
                "Deployment",
                "apps",
                "web",
                Action::NotHealthy,
                unavailable,
            )],
        ))
        .await?;
    server.reported("staging", &x, Phase::Degraded).await?;
    assert_eq!(server.push("main", &x, &y).await?, 200);
    assert_eq!(server.pipeline("main", &y, 2, "failed", "push").await?, 200);
    let history = server.history("staging").await?;
    let reason = history
        .decisions
        .iter()
        .find(|d| d.sha == x)
        .map(|d| d.reason.clone())
        .unwrap_or_default();
    assert!(!reason.is_empty(), "{history:?}");

    let url = format!("http://{}/agents/staging", server.http);
    let dom = chromium.dump_dom(&url).await?;
    for expected in [
        "<h1>staging</h1>",
        x.as_str(),
        reason.as_str(),
        "<td>web</td>",
        "not healthy",
        unavailable,
    ] {
        assert!(dom.contains(expected), "{expected:?} not in {dom}");
    }

    let png = target_dir().join("status-page.png");
    chromium.screenshot(&url, &png).await?;
    let size = std::fs::metadata(&png)?.len();
    assert!(size > 10_000, "{} has only {size} bytes", png.display());
    println!("screenshot: {}", png.display());
    server.stop().await
}
