//! Merge request previews end to end: the server against the fake GitLab, the agent against
//! the real control plane (tests/src/control_plane.rs). A merge request hook asks agent
//! `prod` for a preview of the head; the agent dry-runs it; the server posts one note and a
//! commit status `greenlight/prod/preview`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use greenlight::v1::preview::Outcome;
use greenlight::v1::{GetPreviewRequest, Phase};
use greenlight_e2e::control_plane::{ControlPlane, TestCluster};
use greenlight_e2e::fake_gitlab::{FakeGitLab, MergeRequestNote};
use greenlight_e2e::*;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const TARGET_BASE: &str = "https://greenlight.example";
/// The merge request every test opens.
const MR: u64 = 7;

struct World {
    _redis: Redis,
    _cache: tempfile::TempDir,
    repo: GitRepo,
    gitlab: FakeGitLab,
    server: TestServer,
    plane: &'static ControlPlane,
    kube: kube::Client,
    _agent: AgentProcess,
    apps: String,
    home: String,
    /// A second namespace in the agent's scope.
    slow: String,
}

/// A server with GitLab and agent `prod` with `preview: true` (its scope: its default
/// namespace and `slow`), and the agent running; `None` without a control plane.
async fn world() -> anyhow::Result<Option<World>> {
    install_crypto();
    let Some(TestCluster {
        plane,
        kube,
        agent_kube,
        apps,
        home,
    }) = TestCluster::new().await?
    else {
        return Ok(None);
    };
    let slow = plane.namespace(&kube, "slow").await?;
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let gitlab = FakeGitLab::start().await?;
    let mut agent = git_agent_yaml("prod", &repo.url(), &[]).replace(
        "default_namespace: apps",
        &format!("default_namespace: {apps}"),
    );
    agent.push_str(&format!(
        "    preview: true\n    scope: {{ namespaces: [{apps}, {slow}] }}\n"
    ));
    let mut yaml = git_config_yaml(&redis.url(), cache.path(), "", &[agent]);
    yaml.push_str(&gitlab.config(&format!(", status_target_url: \"{TARGET_BASE}\"")));
    let server = TestServer::start(&yaml).await?;
    let agent = AgentProcess::start_in(&server, "prod", agent_kube, "replica-a", &home);
    Ok(Some(World {
        _redis: redis,
        _cache: cache,
        repo,
        gitlab,
        server,
        plane,
        kube,
        _agent: agent,
        apps,
        home,
        slow,
    }))
}

macro_rules! world {
    () => {
        match world().await? {
            Some(w) => w,
            None => return Ok(()),
        }
    };
}

fn deployment(image: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n        - {{name: web, image: \"{image}\"}}\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: {app: web}\n  ports:\n    - {port: 80, targetPort: 80}\n";

impl World {
    /// Deploys `files` as the first revision on `main` and waits until it is healthy, so
    /// that the agent leads (it competes for its Lease once it knows its name).
    async fn deploy_base(&self, files: &[(&str, &[u8])]) -> anyhow::Result<String> {
        let base = self.repo.commit(files, &[])?;
        self.release(ZERO, &base, 1).await?;
        if let Err(error) = self.server.reported("prod", &base, Phase::Healthy).await {
            let last = self.server.last_report("prod").await?;
            anyhow::bail!("{error}; last report: {last:?}");
        }
        Ok(base)
    }

    /// Deploys one ConfigMap as the first revision; see [`World::deploy_base`].
    async fn deploy_one_config(&self) -> anyhow::Result<String> {
        let config = configmap("base", "one");
        self.deploy_base(&[("base.yaml", config.as_bytes())]).await
    }

    /// The description of the preview status of `sha`, which must be a failure.
    async fn failed_preview(&self, sha: &str) -> anyhow::Result<String> {
        let (state, description) = self.preview_status(sha).await?;
        anyhow::ensure!(state == "failed", "{state}: {description}");
        Ok(description)
    }

    /// A push and a green pipeline of `sha` on `main`, which GitLab confirms.
    async fn release(&self, before: &str, sha: &str, id: u64) -> anyhow::Result<()> {
        self.gitlab.put_pipeline(
            PROJECT,
            json!({ "id": id, "sha": sha, "ref": "main", "status": "success", "source": "push" }),
        );
        self.server.release(before, sha, id).await
    }

    /// Commits `files` (removing `removed`) on branch `feature`, which starts at `from`;
    /// `main` stays where it is.
    fn commit_on_feature(
        &self,
        from: &str,
        files: &[(&str, &[u8])],
        removed: &[&str],
    ) -> anyhow::Result<String> {
        let main = self.repo.git(&["rev-parse", "main"])?;
        if self.repo.git(&["branch", "--list", "feature"])?.is_empty() {
            self.repo.git(&["branch", "feature", from])?;
        }
        self.repo.git(&["checkout", "-q", "feature"])?;
        let sha = self.repo.commit(files, removed)?;
        self.repo.git(&["checkout", "-q", "main"])?;
        anyhow::ensure!(self.repo.git(&["rev-parse", "main"])? == main);
        Ok(sha)
    }

    /// A `Merge Request Hook` opening (or updating) merge request [`MR`] at `head`.
    async fn merge_request_hook(&self, action: &str, head: &str) -> anyhow::Result<()> {
        let body = json!({
            "object_kind": "merge_request",
            "project": { "id": PROJECT_ID, "path_with_namespace": PROJECT },
            "object_attributes": {
                "iid": MR, "target_branch": "main", "source_branch": "feature",
                "action": action, "state": "opened", "last_commit": { "id": head },
            },
        });
        let (status, answer) = self.server.hook("Merge Request Hook", &body, None).await?;
        anyhow::ensure!(
            status == 200,
            "merge request hook answered {status}: {answer}"
        );
        anyhow::ensure!(answer["outcome"] == "recorded", "{answer}");
        Ok(())
    }

    /// A `Pipeline Hook` of the merge request pipeline of [`MR`] at `head`.
    async fn merge_request_pipeline(&self, head: &str, id: u64) -> anyhow::Result<()> {
        let body = json!({
            "object_kind": "pipeline",
            "object_attributes": {
                "id": id, "ref": format!("refs/merge-requests/{MR}/head"), "tag": false,
                "sha": head, "source": "merge_request_event", "status": "running",
            },
            "merge_request": { "iid": MR, "target_branch": "main", "source_branch": "feature" },
            "project": { "id": PROJECT_ID, "path_with_namespace": PROJECT },
            "builds": [],
        });
        let (status, answer) = self.server.hook("Pipeline Hook", &body, None).await?;
        anyhow::ensure!(status == 200, "pipeline hook answered {status}: {answer}");
        Ok(())
    }

    /// The final preview status of `sha` once posted: (state, description).
    async fn preview_status(&self, sha: &str) -> anyhow::Result<(String, String)> {
        eventually(&format!("a preview status on {sha}"), || async {
            Ok(self
                .gitlab
                .statuses_for(sha)
                .into_iter()
                .filter(|(state, name, _)| name == "greenlight/prod/preview" && state != "pending")
                .map(|(state, _, description)| (state, description))
                .next_back())
        })
        .await
    }

    /// The one note on [`MR`] once it says `needle`.
    async fn note_saying(&self, needle: &str) -> anyhow::Result<MergeRequestNote> {
        eventually(&format!("a note saying {needle:?}"), || async {
            let notes = self.gitlab.notes(PROJECT, MR);
            anyhow::ensure!(notes.len() <= 1, "one note per agent: {notes:#?}");
            Ok(notes.into_iter().find(|n| n.body.contains(needle)))
        })
        .await
    }
}

/// The diff block of a note, line by line.
fn diff_lines(note: &str) -> Vec<String> {
    let start = note.find("```diff\n").map(|i| i + 8).unwrap_or(note.len());
    let rest = &note[start..];
    let end = rest.find("```").unwrap_or(rest.len());
    rest[..end].lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_request_gets_one_note_listing_exactly_its_changes_and_a_green_status()
-> anyhow::Result<()> {
    let w = world!();
    let base_deployment = deployment("nginx:1.25", 1);
    let base = w
        .deploy_base(&[
            ("web.yaml", base_deployment.as_bytes()),
            ("service.yaml", SERVICE.as_bytes()),
        ])
        .await?;

    let head_deployment = deployment("nginx:1.26", 3);
    let settings = configmap("settings", "one");
    let head = w.commit_on_feature(
        &base,
        &[
            ("web.yaml", head_deployment.as_bytes()),
            ("settings.yaml", settings.as_bytes()),
        ],
        &["service.yaml"],
    )?;
    let mark = w.plane.audit_mark();
    w.merge_request_hook("open", &head).await?;

    let (state, description) = w.preview_status(&head).await?;
    assert_eq!(state, "success", "{description}");
    let note = w.note_saying(&head[..8]).await?;
    assert!(
        note.body.starts_with("### greenlight/prod\n"),
        "{}",
        note.body
    );
    assert!(
        note.body
            .contains("1 to create, 1 to change, 1 to prune, 0 refused, 0 unchanged"),
        "{}",
        note.body
    );
    let apps = &w.apps;
    assert_eq!(
        diff_lines(&note.body),
        [
            format!("+ ConfigMap {apps}/settings"),
            format!("~ Deployment {apps}/web"),
            "    spec.replicas: 1 → 3".to_owned(),
            "    spec.template.spec.containers[name=web].image: \"nginx:1.25\" → \"nginx:1.26\""
                .to_owned(),
            format!("- Service {apps}/web"),
        ],
        "{}",
        note.body
    );
    assert!(
        note.body.contains(&format!(
            "Full preview: {TARGET_BASE}/agents/prod/previews/{head}"
        )),
        "{}",
        note.body
    );

    // The preview wrote nothing: by the API server's own audit log, every request of the
    // agent in its namespaces since the hook was a read or a dry run (its Lease aside).
    let requests = w.plane.agent_requests(mark, &[&w.apps, &w.home])?;
    let writes: Vec<String> = requests
        .iter()
        .filter(|r| r.namespace.is_some() && r.is_write() && r.resource != "leases")
        .map(|r| format!("{} {}", r.verb, r.uri))
        .collect();
    assert!(writes.is_empty(), "the preview wrote: {writes:#?}");
    let dry_runs = requests
        .iter()
        .filter(|r| r.uri.contains("dryRun=All"))
        .count();
    assert!(dry_runs >= 2, "both objects were dry-run: {requests:#?}");
    // And so the cluster is as the base left it.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(w.kube.clone(), &w.apps);
    assert!(services.get_opt("web").await?.is_some(), "not pruned");

    // A second push updates the same note in place, through the MR pipeline hook this time.
    let newer_deployment = deployment("nginx:1.26", 4);
    let newer = w.commit_on_feature(&base, &[("web.yaml", newer_deployment.as_bytes())], &[])?;
    w.merge_request_pipeline(&newer, 900).await?;
    let updated = w.note_saying(&newer[..8]).await?;
    assert_eq!(updated.id, note.id, "the same note");
    assert!(updated.edits >= 1);
    assert!(
        updated.body.contains("spec.replicas: 1 → 4"),
        "{}",
        updated.body
    );
    assert_eq!(w.gitlab.notes(PROJECT, MR).len(), 1, "no second note");
    assert_eq!(w.preview_status(&newer).await?.0, "success");

    // The admin API has both; the newest by default.
    let mut admin = w.server.admin().await?;
    let newest = admin
        .get_preview(GetPreviewRequest {
            name: "prod".into(),
            sha: None,
        })
        .await?
        .into_inner();
    assert_eq!(newest.sha, newer);
    assert_eq!(newest.merge_request_iid, MR);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_out_of_scope_doubled_and_foreign_objects_fail_the_preview_with_reasons()
-> anyhow::Result<()> {
    let w = world!();
    let base = w.deploy_one_config().await?;
    let invalid = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  replicaz: 3\n  selector:\n    matchLabels: {app: bad}\n  template:\n    metadata:\n      labels: {app: bad}\n    spec:\n      containers:\n        - {name: bad, image: nginx}\n";
    let outside = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: elsewhere\n  namespace: kube-system\ndata: {v: x}\n";
    // One object twice: once in the default namespace by omission, once by name.
    let twice = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: twice\ndata: {{v: a}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: twice\n  namespace: {}\ndata: {{v: b}}\n",
        w.apps
    );
    // Another agent's object, as agent staging left it in the cluster.
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(w.kube.clone(), &w.apps);
    let theirs = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "theirs", "labels": {"greenlight.dev/inventory": "staging"}},
        "data": {"v": "staging's"}
    });
    configmaps
        .patch(
            "theirs",
            &PatchParams::apply("greenlight-e2e"),
            &Patch::Apply(&theirs),
        )
        .await?;
    let ours = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: theirs\ndata: {v: prod's}\n";
    let head = w.commit_on_feature(
        &base,
        &[
            ("bad.yaml", invalid.as_bytes()),
            ("outside.yaml", outside.as_bytes()),
            ("twice.yaml", twice.as_bytes()),
            ("theirs.yaml", ours.as_bytes()),
        ],
        &[],
    )?;
    w.merge_request_hook("open", &head).await?;

    let description = w.failed_preview(&head).await?;
    assert!(
        description.contains("twice") && description.contains("keep one of them"),
        "the first reason: {description}"
    );
    let note = w.note_saying(&head[..8]).await?;
    let lines = diff_lines(&note.body);
    let bad = lines
        .iter()
        .find(|l| l.starts_with(&format!("! Deployment {}/bad: ", w.apps)))
        .unwrap_or_else(|| panic!("the invalid object is named: {}", note.body));
    // The API server's own words.
    assert!(bad.contains("field not declared in schema"), "{bad}");
    assert!(
        lines.contains(
            &"! ConfigMap kube-system/elsewhere: namespace kube-system is not in the agent's scope"
                .to_owned()
        ),
        "{}",
        note.body
    );
    let twice = lines
        .iter()
        .find(|l| l.starts_with(&format!("! ConfigMap {}/twice: ", w.apps)))
        .unwrap_or_else(|| panic!("the object defined twice is named: {}", note.body));
    assert!(
        twice.contains("defined twice, in twice.yaml document 0 and in twice.yaml document 1"),
        "{twice}"
    );
    let theirs = lines
        .iter()
        .find(|l| l.starts_with(&format!("! ConfigMap {}/theirs: ", w.apps)))
        .unwrap_or_else(|| panic!("another agent's object is named: {}", note.body));
    assert!(theirs.contains("belongs to agent staging"), "{theirs}");
    assert!(note.body.contains("4 refused"), "{}", note.body);
    Ok(())
}

/// What the agent cannot dry-run at all is refused with the reason, and a preview of more
/// objects than a note lists is cut with a mark: the same merge request, one head after
/// another, one note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_manifests_and_an_unknown_kind_are_refused_and_a_large_preview_is_cut()
-> anyhow::Result<()> {
    let w = world!();
    let base = w.deploy_one_config().await?;

    let broken = w.commit_on_feature(&base, &[("broken.yaml", b"kind: [unclosed\n")], &[])?;
    w.merge_request_hook("open", &broken).await?;
    let description = w.failed_preview(&broken).await?;
    assert!(
        description.contains("invalid manifests") && description.contains("broken.yaml"),
        "names the file: {description}"
    );

    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n";
    let unknown = w.commit_on_feature(
        &broken,
        &[("widget.yaml", widget.as_bytes())],
        &["broken.yaml"],
    )?;
    w.merge_request_hook("update", &unknown).await?;
    let description = w.failed_preview(&unknown).await?;
    assert!(description.contains("unknown kind"), "{description}");
    let note = w.note_saying(&unknown[..8]).await?;
    assert!(
        diff_lines(&note.body)
            .iter()
            .any(|l| l.starts_with("! Widget ") && l.contains("unknown kind")),
        "{}",
        note.body
    );

    let many = greenlight::preview::MAX_OBJECTS + 10;
    let configs: Vec<String> = (0..many)
        .map(|n| configmap(&format!("many-{n}"), "x"))
        .collect();
    let configs = configs.join("---\n");
    let large = w.commit_on_feature(
        &unknown,
        &[("many.yaml", configs.as_bytes())],
        &["widget.yaml"],
    )?;
    w.merge_request_hook("update", &large).await?;
    let (state, description) = w.preview_status(&large).await?;
    assert_eq!(state, "success", "{description}");
    let note = w.note_saying(&large[..8]).await?;
    let lines = diff_lines(&note.body);
    let listed = lines
        .iter()
        .filter(|l| l.starts_with("+ ConfigMap "))
        .count();
    assert_eq!(
        listed,
        greenlight::preview::MAX_OBJECTS,
        "as many as a note lists"
    );
    assert!(
        note.body
            .contains("… (the agent left out more objects or fields)"),
        "the cut is marked: {}",
        note.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_change_shows_key_names_only() -> anyhow::Result<()> {
    let w = world!();
    let secret = |data: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ntype: Opaque\nstringData:\n{data}"
        )
    };
    let old = secret("  password: hunter2\n  user: admin\n");
    let base = w.deploy_base(&[("secret.yaml", old.as_bytes())]).await?;
    let new = secret("  password: correct-horse\n  user: admin\n  token: t0ken-value\n");
    let head = w.commit_on_feature(&base, &[("secret.yaml", new.as_bytes())], &[])?;
    w.merge_request_hook("open", &head).await?;

    assert_eq!(w.preview_status(&head).await?.0, "success");
    let note = w.note_saying(&head[..8]).await?;
    assert_eq!(
        diff_lines(&note.body),
        [
            format!("~ Secret {}/db", w.apps),
            "    data.password: changed (value hidden)".to_owned(),
            "    data.token: added (value hidden)".to_owned(),
        ],
        "{}",
        note.body
    );
    let stored = w
        .server
        .admin()
        .await?
        .get_preview(GetPreviewRequest {
            name: "prod".into(),
            sha: Some(head.clone()),
        })
        .await?
        .into_inner();
    let everything = format!("{}\n{stored:?}", note.body);
    for value in ["hunter2", "correct-horse", "t0ken-value", "admin"] {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        assert!(!everything.contains(value), "{value} leaked: {everything}");
        assert!(!everything.contains(&encoded), "{value} leaked encoded");
    }
    Ok(())
}

/// Accepts connections and never answers them: an admission webhook that hangs.
async fn hanging_listener() -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    Ok((port, accepted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_in_flight_does_not_delay_a_deploy() -> anyhow::Result<()> {
    let w = world!();
    let base = w.deploy_one_config().await?;

    // ConfigMaps of the `slow` namespace go through an admission webhook that never answers
    // (ignored after its timeout): a dry run there keeps the preview in flight for a while.
    let (port, accepted) = hanging_listener().await?;
    let name = format!("greenlight-e2e-{}", w.slow);
    let webhook = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [{
            "name": "hang.greenlight.test",
            "clientConfig": { "url": format!("https://127.0.0.1:{port}/") },
            "rules": [{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"] }],
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": w.slow } },
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 20,
        }],
    });
    let gvk = GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
    );
    let webhooks: Api<DynamicObject> = Api::all_with(w.kube.clone(), &ApiResource::from_gvk(&gvk));
    webhooks
        .patch(
            &name,
            &PatchParams::apply("greenlight-e2e"),
            &Patch::Apply(&webhook),
        )
        .await?;

    let slow_config = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  namespace: {}\ndata: {{v: x}}\n",
        w.slow
    );
    let head = w.commit_on_feature(&base, &[("held.yaml", slow_config.as_bytes())], &[])?;
    // The webhook may take a moment to be served by the API server: ask until it is called.
    w.merge_request_hook("open", &head).await?;
    eventually("the preview to reach the hanging webhook", || async {
        Ok((accepted.load(Ordering::SeqCst) > 0).then_some(()))
    })
    .await?;

    // A real deploy arrives meanwhile, and is applied while the preview still waits.
    let changed = configmap("base", "two");
    let next = w.repo.commit(&[("base.yaml", changed.as_bytes())], &[])?;
    w.release(&base, &next, 2).await?;
    eventually("the deploy applied", || async {
        Ok(w.server
            .history("prod")
            .await?
            .reports
            .into_iter()
            .find(|r| r.revision == next && r.phase() == Phase::Applied))
    })
    .await?;
    assert!(
        w.gitlab.notes(PROJECT, MR).is_empty(),
        "the deploy was applied before the preview ended"
    );
    assert!(
        w.gitlab
            .statuses_for(&head)
            .iter()
            .all(|(state, name, _)| name != "greenlight/prod/preview" || state == "pending"),
        "the preview had not ended"
    );

    // The preview then ends all the same.
    let note = w.note_saying(&head[..8]).await?;
    assert!(
        note.body.contains(&format!("+ ConfigMap {}/held", w.slow)),
        "{}",
        note.body
    );
    let _ = webhooks.delete(&name, &Default::default()).await;
    Ok(())
}

/// Two server replicas on one Redis and GitLab, agent `prod` with previews; no cluster: the
/// test plays the agent.
struct Replicas {
    _redis: Redis,
    _cache: tempfile::TempDir,
    repo: GitRepo,
    gitlab: FakeGitLab,
    a: TestServer,
    b: TestServer,
}

async fn replicas() -> anyhow::Result<Replicas> {
    install_crypto();
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let gitlab = FakeGitLab::start().await?;
    let mut agent = git_agent_yaml("prod", &repo.url(), &[]);
    agent.push_str("    preview: true\n");
    let mut yaml = git_config_yaml(&redis.url(), cache.path(), "", &[agent]);
    yaml.push_str(&gitlab.config(""));
    let a = TestServer::start(&yaml).await?;
    let b = TestServer::start(&yaml.replace(
        &cache.path().display().to_string(),
        &cache.path().join("b").display().to_string(),
    ))
    .await?;
    Ok(Replicas {
        _redis: redis,
        _cache: cache,
        repo,
        gitlab,
        a,
        b,
    })
}

/// The next preview request on `stream`, skipping revisions.
async fn next_preview(
    stream: &mut greenlight_agent::client::RevisionStream,
) -> anyhow::Result<greenlight_agent::assemble::ReadyPreview> {
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next_any())
            .await
            .map_err(|_| anyhow::anyhow!("no preview request within 30s"))??;
        match next {
            Some(greenlight_agent::assemble::Ready::Preview(preview)) => return Ok(preview),
            Some(greenlight_agent::assemble::Ready::Revision(_)) => {}
            None => anyhow::bail!("the stream ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reaches_the_replica_holding_the_agent_and_a_newer_head_wins()
-> anyhow::Result<()> {
    let r = replicas().await?;
    let first = r
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let second = r
        .repo
        .commit(&[("a.yaml", configmap("a", "2").as_bytes())], &[])?;
    // The agent holds its stream on replica b; the hooks go to replica a.
    let client = r.b.agent("prod").await?;
    let mut stream = client.sync(None).await?;
    let hook = |head: &str, action: &str| {
        json!({
            "object_kind": "merge_request",
            "project": { "id": PROJECT_ID, "path_with_namespace": PROJECT },
            "object_attributes": {
                "iid": MR, "target_branch": "main", "source_branch": "feature",
                "action": action, "state": "opened", "last_commit": { "id": head },
            },
        })
    };
    let (status, answer) =
        r.a.hook("Merge Request Hook", &hook(&first, "open"), None)
            .await?;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("recorded")),
        "{answer}"
    );
    let request = next_preview(&mut stream).await?;
    assert_eq!(request.revision.sha(), first);
    assert_eq!(request.merge_request_iid, MR);
    assert_eq!(request.revision.header.agent, "prod");
    assert_eq!(
        request.revision.files.len(),
        1,
        "the head's manifests come along"
    );
    // Asked again for the same head (a title edit, another pipeline event): nothing new.
    let (_, again) =
        r.a.hook("Merge Request Hook", &hook(&first, "update"), None)
            .await?;
    assert_eq!(
        again["message"], "no agent previews this head anew",
        "{again}"
    );

    // A newer head arrives before the first answer: the late answer is kept, not posted.
    r.a.hook("Merge Request Hook", &hook(&second, "update"), None)
        .await?;
    let newer = next_preview(&mut stream).await?;
    assert_eq!(newer.revision.sha(), second);
    let answer = |request: &greenlight_agent::assemble::ReadyPreview| greenlight::v1::Preview {
        id: request.id.clone(),
        sha: request.revision.sha().to_owned(),
        merge_request_iid: request.merge_request_iid,
        outcome: Outcome::Clean.into(),
        ..Default::default()
    };
    client.report_preview(answer(&request)).await?;
    client.report_preview(answer(&newer)).await?;
    let note = eventually("the note of the newer head", || async {
        Ok(r.gitlab
            .notes(PROJECT, MR)
            .into_iter()
            .find(|n| n.body.contains(&second[..8])))
    })
    .await?;
    assert!(
        note.body.contains("greenlightctl preview prod --sha"),
        "{}",
        note.body
    );
    assert_eq!(r.gitlab.notes(PROJECT, MR).len(), 1);
    assert!(
        !r.gitlab
            .statuses_for(&first)
            .iter()
            .any(|(state, _, _)| state == "success"),
        "the superseded head got no verdict"
    );
    // Both replicas serve it.
    for server in [&r.a, &r.b] {
        let stored = server
            .admin()
            .await?
            .get_preview(GetPreviewRequest {
                name: "prod".into(),
                sha: None,
            })
            .await?
            .into_inner();
        assert_eq!(stored.sha, second);
    }
    Ok(())
}

/// What an agent's answer cannot do: carry a bad commit id, speak for another agent or
/// project, or be lost quietly when the store is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_answer_is_checked_kept_as_its_senders_and_refused_while_the_store_is_down()
-> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let server = TestServer::start(&config_yaml(
        Some(&redis.url()),
        &[AgentDef::new("prod"), AgentDef::new("staging")],
    ))
    .await?;
    let prod = server.agent("prod").await?;
    let head = sha(0x7e);
    let answer = |sha: &str| greenlight::v1::Preview {
        id: format!("prod-{MR}-{sha}"),
        agent: "staging".into(),
        project: "other/project".into(),
        sha: sha.to_owned(),
        merge_request_iid: MR,
        outcome: Outcome::Clean.into(),
        ..Default::default()
    };

    let refused = prod.report_preview(answer("not-a-sha")).await;
    let Err(greenlight_agent::client::ClientError::Status(status)) = refused else {
        anyhow::bail!("a bad sha is refused, got {refused:?}");
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("preview.sha"), "{status:?}");

    prod.report_preview(answer(&head)).await?;
    let mut admin = server.admin().await?;
    let get = |name: &str| GetPreviewRequest {
        name: name.into(),
        sha: Some(head.clone()),
    };
    let kept = admin.get_preview(get("prod")).await?.into_inner();
    assert_eq!(
        (kept.agent.as_str(), kept.project.as_str()),
        ("prod", PROJECT)
    );
    let other = admin.get_preview(get("staging")).await;
    assert_eq!(
        other.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::NotFound),
        "nothing is kept under the agent it claimed to be"
    );

    redis.kill();
    let refused = prod.report_preview(answer(&sha(0x7f))).await;
    let Err(greenlight_agent::client::ClientError::Status(status)) = refused else {
        anyhow::bail!("an answer the store cannot keep is refused, got {refused:?}");
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("cannot record the preview"),
        "{status:?}"
    );
    Ok(())
}

/// A merge request hook whose preview request the store cannot keep is answered 503, so that
/// GitLab shows the hook failed and it can be resent: the request is never lost quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_request_the_store_cannot_keep_is_answered_503() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let mut yaml = config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]);
    yaml.push_str("    preview: true\n");
    let server = TestServer::start(&yaml).await?;
    redis.kill();
    let body = json!({
        "object_kind": "merge_request",
        "project": { "id": PROJECT_ID, "path_with_namespace": PROJECT },
        "object_attributes": {
            "iid": MR, "target_branch": "main", "source_branch": "feature",
            "action": "open", "state": "opened", "last_commit": { "id": sha(0x7a) },
        },
    });
    let (status, answer) = server.hook("Merge Request Hook", &body, None).await?;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["outcome"], "failed", "{answer}");
    assert_eq!(
        answer["message"], "cannot record the preview request; retry later",
        "{answer}"
    );
    Ok(())
}
