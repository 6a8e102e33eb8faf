//! The deployment: the Helm chart in deploy/helm/greenlight, the manifests rendered from it in
//! deploy/manifests, and its objects rolled out on the real control plane
//! (tests/src/control_plane.rs), once by `kubectl apply` as an operator would and once by a
//! Greenlight agent. Helm is the one scripts/helm-tool builds from tests/k8s-tools/helm, found
//! in `GREENLIGHT_HELM_BIN_DIR` (scripts/test sets it); in CI its absence is a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};
use greenlight::v1::Phase;
use greenlight_agent::manifest::{Manifest, parse};
use greenlight_e2e::control_plane::TestCluster;
use greenlight_e2e::*;
use greenlight_server::config::{Config, Overrides};
use serde_json::Value;

/// The directory holding the `helm` that scripts/helm-tool built.
const HELM_BIN_DIR_ENV: &str = "GREENLIGHT_HELM_BIN_DIR";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("deploy/helm/greenlight")
}

struct Helm {
    bin_dir: PathBuf,
}

impl Helm {
    /// Helm, or `None` (after saying so on stderr) when it is not built and this is not CI,
    /// where its absence is an error.
    fn find() -> anyhow::Result<Option<Self>> {
        let Some(bin_dir) = std::env::var_os(HELM_BIN_DIR_ENV).map(PathBuf::from) else {
            if std::env::var_os("CI").is_some() {
                bail!("{HELM_BIN_DIR_ENV} is not set: scripts/test builds Helm and sets it");
            }
            let _ = writeln!(
                std::io::stderr(),
                "helm: skipped: set {HELM_BIN_DIR_ENV} to the directory scripts/helm-tool prints (scripts/test does)"
            );
            return Ok(None);
        };
        Ok(Some(Self { bin_dir }))
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(self.bin_dir.join("helm"))
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.bin_dir.join("helm").display()))
    }

    /// Runs helm, failing with its stderr unless it succeeded; returns its stdout.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.run(args)?;
        if !output.status.success() {
            bail!(
                "helm {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `helm template` of release `greenlight` in `namespace` with `values` (YAML) over the
    /// chart's defaults: the rendered YAML, or helm's error.
    fn template(&self, namespace: &str, values: &str) -> anyhow::Result<String> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), values)?;
        let chart = chart();
        self.ok(&[
            "template",
            "greenlight",
            &chart.to_string_lossy(),
            "--namespace",
            namespace,
            "--values",
            &file.path().to_string_lossy(),
        ])
    }

    /// What `helm template` says when it refuses `values`.
    fn refusal(&self, values: &str) -> anyhow::Result<String> {
        match self.template("greenlight", values) {
            Ok(_) => bail!("the chart rendered values it should refuse:\n{values}"),
            Err(e) => Ok(e.to_string()),
        }
    }
}

/// The test's body runs only where Helm is built (always in CI).
macro_rules! helm {
    () => {
        match Helm::find()? {
            Some(helm) => helm,
            None => return Ok(()),
        }
    };
}

/// The objects of rendered YAML, parsed as the agent parses a revision.
fn objects(yaml: &str) -> anyhow::Result<Vec<Manifest>> {
    Ok(parse(&[(
        "rendered.yaml".to_owned(),
        yaml.as_bytes().to_vec(),
    )])?)
}

fn find<'a>(objects: &'a [Manifest], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .map(|o| &o.body)
        .with_context(|| format!("no {kind} {name} rendered"))
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// The volume of `deployment` mounted at `path`.
fn mounted_at<'a>(deployment: &'a Value, path: &str) -> anyhow::Result<&'a Value> {
    let mount = container(deployment)["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == path)
        .with_context(|| format!("nothing mounted at {path}"))?;
    deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .with_context(|| format!("no volume {} for {path}", mount["name"]))
}

#[test]
fn the_chart_lints_and_deploy_manifests_are_its_rendering() -> anyhow::Result<()> {
    let helm = helm!();
    helm.ok(&["lint", "--strict", &chart().to_string_lossy()])?;

    let fresh = tempfile::tempdir()?;
    let output = Command::new(root().join("scripts/render-manifests"))
        .arg(fresh.path())
        .env(HELM_BIN_DIR_ENV, &helm.bin_dir)
        .output()
        .context("cannot run scripts/render-manifests")?;
    if !output.status.success() {
        bail!(
            "scripts/render-manifests: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let committed_dir = root().join("deploy/manifests");
    let names = |dir: &Path| -> anyhow::Result<Vec<String>> {
        let mut names = std::fs::read_dir(dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    };
    assert_eq!(
        names(&committed_dir)?,
        names(fresh.path())?,
        "deploy/manifests holds other files than scripts/render-manifests writes: run it"
    );
    for name in names(fresh.path())? {
        let rendered = std::fs::read_to_string(fresh.path().join(&name))?;
        let committed = std::fs::read_to_string(committed_dir.join(&name))?;
        if rendered != committed {
            let line = rendered
                .lines()
                .zip(committed.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(rendered.lines().count().min(committed.lines().count()));
            bail!(
                "deploy/manifests/{name} is not the chart's rendering (first difference at line {}): run scripts/render-manifests",
                line + 1
            );
        }
    }
    // What kubectl applies first: the namespaces the objects live in.
    let manifests = objects(&std::fs::read_to_string(
        committed_dir.join("greenlight.yaml"),
    )?)?;
    let namespaces: Vec<&str> = manifests
        .iter()
        .take_while(|o| o.kind == "Namespace")
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(namespaces, ["apps", "greenlight"]);
    Ok(())
}

#[test]
fn the_rendered_server_config_and_its_secrets_are_what_the_server_loads() -> anyhow::Result<()> {
    let helm = helm!();
    let rendered = objects(&helm.template("greenlight", "")?)?;
    let server = find(&rendered, "Deployment", "greenlight-server")?;
    let args = strings(&container(server)["args"]);
    assert!(
        args.contains(&"--config=/etc/greenlight/config/greenlight.yaml"),
        "{args:?}"
    );
    assert_eq!(
        mounted_at(server, "/etc/greenlight/config")?["configMap"]["name"],
        "greenlight-server"
    );
    assert_eq!(
        mounted_at(server, "/etc/greenlight/secrets")?["secret"]["secretName"],
        "greenlight-server"
    );

    // The config as the pod sees it: the Secret's files where the config names them.
    let config_map = find(&rendered, "ConfigMap", "greenlight-server")?;
    let text = config_map["data"]["greenlight.yaml"]
        .as_str()
        .context("no greenlight.yaml in the ConfigMap")?;
    let secrets = tempfile::tempdir()?;
    let secret = find(&rendered, "Secret", "greenlight-server")?;
    for (key, value) in secret["stringData"].as_object().into_iter().flatten() {
        std::fs::write(secrets.path().join(key), value.as_str().unwrap_or_default())?;
    }
    let text = text.replace(
        "/etc/greenlight/secrets/",
        &format!("{}/", secrets.path().display()),
    );
    let redis_url = env(container(server), "GREENLIGHT_REDIS_URL")
        .and_then(|e| e["value"].as_str())
        .context("the server is given no Redis")?;
    assert_eq!(redis_url, "redis://greenlight-redis.greenlight.svc:6379");
    let overrides = Overrides {
        redis_url: Some(redis_url.to_owned()),
        ..Overrides::default()
    };
    let config = Config::from_yaml(&text, &overrides)?;
    assert_eq!(config.grpc_addr.port(), 8150);
    assert_eq!(config.http_addr.port(), 8080);
    assert_eq!(
        config.redis.as_ref().map(|r| r.key_prefix.as_str()),
        Some("greenlight")
    );
    let agents: Vec<&str> = config.agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(agents, ["prod-eu"]);
    assert!(config.admin_token.is_some());

    // The Service and the container agree on the ports, and the probes use them.
    let service = find(&rendered, "Service", "greenlight-server")?;
    let ports: Vec<(u64, &str)> = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["port"].as_u64()?, p["targetPort"].as_str()?)))
        .collect();
    assert_eq!(ports, [(8150, "grpc"), (8080, "http")]);
    let server = container(server);
    assert_eq!(server["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(server["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(server["readinessProbe"]["httpGet"]["port"], "http");

    // The agent's flags are ones it has, and its probes are on its --metrics-listen port.
    let agent = container(find(&rendered, "Deployment", "greenlight-agent")?);
    let args = strings(&agent["args"]);
    assert_eq!(
        args,
        [
            "--server=http://greenlight-server.greenlight.svc:8150",
            "--token-file=/var/run/greenlight/token/token",
            "--metrics-listen=0.0.0.0:8080",
            "--insecure",
        ]
    );
    assert_eq!(agent["ports"][0]["containerPort"], 8080);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    let token = find(&rendered, "Secret", "greenlight-agent-token")?;
    assert_eq!(token["stringData"]["token"], "example-agent-token");
    assert!(
        config.agents[0].token.matches("example-agent-token"),
        "the example agent's token is the one the example config hashes"
    );

    // Every pod runs as a non-root user with the runtime's seccomp profile; every container
    // drops every capability, cannot escalate, has a read-only root, resources and probes.
    for deployment in rendered.iter().filter(|o| o.kind == "Deployment") {
        let pod = &deployment.body["spec"]["template"]["spec"];
        let name = &deployment.name;
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for container in pod["containers"].as_array().into_iter().flatten() {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(
                strings(&security["capabilities"]["drop"]),
                ["ALL"],
                "{name}"
            );
            assert!(container["resources"]["requests"].is_object(), "{name}");
            assert!(
                container["resources"]["limits"]["memory"].is_string(),
                "{name}"
            );
            assert!(container["livenessProbe"].is_object(), "{name}");
            assert!(container["readinessProbe"].is_object(), "{name}");
        }
    }
    Ok(())
}

#[test]
fn the_agents_rbac_is_the_one_of_deploy_agent_yaml() -> anyhow::Result<()> {
    let helm = helm!();
    // The chart's defaults name what deploy/agent.yaml names: agent `prod-eu` in `greenlight`,
    // deploying to `apps`.
    let rendered = objects(&helm.template("greenlight", "")?)?;
    let example = objects(&std::fs::read_to_string(root().join("deploy/agent.yaml"))?)?;
    for name in ["greenlight-agent-state", "greenlight-agent-deployer"] {
        for kind in ["Role", "RoleBinding"] {
            let ours = find(&rendered, kind, name)?;
            let theirs = find(&example, kind, name)?;
            assert_eq!(
                ours["metadata"]["namespace"], theirs["metadata"]["namespace"],
                "{kind} {name}"
            );
            for field in ["rules", "roleRef", "subjects"] {
                assert_eq!(ours[field], theirs[field], "{kind} {name}: {field}");
            }
        }
    }
    Ok(())
}

#[test]
fn tls_from_a_secret_reaches_the_config_the_probes_and_the_agent() -> anyhow::Result<()> {
    let helm = helm!();
    let rendered = objects(&helm.template(
        "greenlight",
        "tls: { secretName: greenlight-tls }\nagent: { insecure: false, caSecret: greenlight-ca }\n",
    )?)?;
    let config_map = find(&rendered, "ConfigMap", "greenlight-server")?;
    let text = config_map["data"]["greenlight.yaml"]
        .as_str()
        .unwrap_or_default();
    assert!(
        text.contains("tls:\n  cert_file: /etc/greenlight/tls/tls.crt\n  key_file: /etc/greenlight/tls/tls.key\n"),
        "{text}"
    );
    let server = find(&rendered, "Deployment", "greenlight-server")?;
    assert_eq!(
        mounted_at(server, "/etc/greenlight/tls")?["secret"]["secretName"],
        "greenlight-tls"
    );
    // Both listeners serve only TLS then.
    assert_eq!(
        container(server)["readinessProbe"]["httpGet"]["scheme"],
        "HTTPS"
    );
    assert_eq!(
        container(server)["livenessProbe"]["httpGet"]["scheme"],
        "HTTPS"
    );
    let agent = find(&rendered, "Deployment", "greenlight-agent")?;
    let args = strings(&container(agent)["args"]);
    assert!(
        args.contains(&"--server=https://greenlight-server.greenlight.svc:8150")
            && args.contains(&"--ca-file=/var/run/greenlight/ca/ca.crt")
            && !args.contains(&"--insecure"),
        "{args:?}"
    );
    assert_eq!(
        mounted_at(agent, "/var/run/greenlight/ca")?["secret"]["secretName"],
        "greenlight-ca"
    );
    Ok(())
}

#[test]
fn redis_is_external_bundled_or_embedded_and_the_chart_refuses_what_cannot_work()
-> anyhow::Result<()> {
    let helm = helm!();
    // An external Redis: its URL reaches the server from a Secret, and no trial Redis runs.
    let rendered = objects(&helm.template(
        "greenlight",
        "redis: { url: 'redis://:hunter2@redis.example:6379', bundled: { enabled: false } }\n",
    )?)?;
    let server = container(find(&rendered, "Deployment", "greenlight-server")?);
    let from = &env(server, "GREENLIGHT_REDIS_URL").context("no GREENLIGHT_REDIS_URL")?["valueFrom"]
        ["secretKeyRef"];
    assert_eq!(from["name"], "greenlight-redis-url");
    let secret = find(&rendered, "Secret", "greenlight-redis-url")?;
    assert_eq!(
        secret["stringData"][from["key"].as_str().unwrap_or_default()],
        "redis://:hunter2@redis.example:6379"
    );
    assert!(
        !rendered.iter().any(|o| o.name == "greenlight-redis"),
        "no trial Redis beside an external one"
    );
    // Or a Secret of one's own.
    let rendered = objects(&helm.template(
        "greenlight",
        "redis: { existingSecret: mine, existingSecretKey: url, bundled: { enabled: false } }\n",
    )?)?;
    let server = container(find(&rendered, "Deployment", "greenlight-server")?);
    let from = &env(server, "GREENLIGHT_REDIS_URL").context("no GREENLIGHT_REDIS_URL")?["valueFrom"]
        ["secretKeyRef"];
    assert_eq!(from["name"], "mine");
    assert_eq!(from["key"], "url");
    // The trial Redis says what it is.
    let rendered = objects(&helm.template("greenlight", "")?)?;
    let trial = find(&rendered, "Deployment", "greenlight-redis")?;
    assert!(
        trial["metadata"]["annotations"]["greenlight.dev/not-for-production"].is_string(),
        "{trial}"
    );
    // One replica may run on the embedded store: no Redis at all.
    let rendered = objects(&helm.template(
        "greenlight",
        "server: { replicas: 1 }\nredis: { bundled: { enabled: false } }\n",
    )?)?;
    let deployment = find(&rendered, "Deployment", "greenlight-server")?;
    let server = container(deployment);
    assert!(env(server, "GREENLIGHT_REDIS_URL").is_none());
    assert!(
        !rendered
            .iter()
            .any(|o| o.name.starts_with("greenlight-redis"))
    );
    // Its file lives on a claim that outlives the pod, held by one pod at a time.
    assert_eq!(
        env(server, "GREENLIGHT_DATA_DIR").and_then(|e| e["value"].as_str()),
        Some("/var/lib/greenlight")
    );
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let claim = find(&rendered, "PersistentVolumeClaim", "greenlight-server-data")?;
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?;
    assert!(
        volumes.iter().any(|v| v["name"] == "data"
            && v["persistentVolumeClaim"]["claimName"] == "greenlight-server-data"),
        "{volumes:?}"
    );
    assert!(
        server["volumeMounts"]
            .as_array()
            .context("mounts")?
            .iter()
            .any(|m| m["name"] == "data" && m["mountPath"] == "/var/lib/greenlight")
    );
    // Without persistence, an emptyDir: no claim.
    let rendered = objects(&helm.template(
        "greenlight",
        "server: { replicas: 1, persistence: { enabled: false } }\nredis: { bundled: { enabled: false } }\n",
    )?)?;
    assert!(!rendered.iter().any(|o| o.kind == "PersistentVolumeClaim"));

    // What cannot work is refused, saying what to do.
    for (values, says) in [
        ("redis: { bundled: { enabled: false } }\n", "embedded store"),
        (
            "redis: { url: 'redis://redis:6379' }\n",
            "redis.bundled.enabled=false",
        ),
        ("agent: { insecure: false }\n", "is plaintext"),
        ("agent: { name: Prod_EU }\n", "agent.name"),
        (
            "server: { config: { listen: { grpc: ':1' } } }\n",
            "server.grpcPort",
        ),
        (
            "server: { config: { redis: { url: 'redis://x' } } }\n",
            "redis.*",
        ),
    ] {
        let refusal = helm.refusal(values)?;
        assert!(refusal.contains(says), "{values}: {refusal}");
    }
    Ok(())
}

/// A kubectl `auth can-i` question asked as `user`: whether it may.
fn can(
    cluster: &TestCluster,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
) -> anyhow::Result<bool> {
    let output = cluster.plane.kubectl(&[
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        namespace,
        &format!("--as={user}"),
    ])?;
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {verb} {resource}: {other} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_objects_roll_out_with_kubectl_and_the_agent_gets_what_it_needs_and_no_more()
-> anyhow::Result<()> {
    let helm = helm!();
    let Some(cluster) = TestCluster::new().await? else {
        return Ok(());
    };
    // The release in `home`, its agent deploying to `apps`.
    let (home, apps) = (cluster.home.clone(), cluster.apps.clone());
    let rendered = helm.template(&home, &format!("agent: {{ namespaces: [{apps}] }}\n"))?;
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &rendered)?;
    cluster.plane.kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=greenlight-e2e",
        "-f",
        &file.path().to_string_lossy(),
    ])?;
    // kwok plays the kubelet: the pods are scheduled onto its node and become Ready there.
    cluster.plane.kubectl_ok(&[
        "wait",
        "--for=condition=Available",
        "deployment/greenlight-server",
        "deployment/greenlight-agent",
        "deployment/greenlight-redis",
        "-n",
        &home,
        "--timeout=120s",
    ])?;
    let kube = &cluster.kube;
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(kube.clone(), &home);
    for (name, replicas) in [
        ("greenlight-server", 2),
        ("greenlight-agent", 2),
        ("greenlight-redis", 1),
    ] {
        let status = deployments.get(name).await?.status.unwrap_or_default();
        assert_eq!(status.available_replicas, Some(replicas), "{name}");
    }
    // The disruption controller counts the server's replicas under its budget.
    let budgets: kube::Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        kube::Api::namespaced(kube.clone(), &home);
    eventually("the server's budget allows one disruption", || async {
        let status = budgets
            .get("greenlight-server")
            .await?
            .status
            .unwrap_or_default();
        Ok((status.current_healthy == 2 && status.disruptions_allowed == 1).then_some(()))
    })
    .await?;

    // The agent's account: its inventory and Lease by name, the deployer's kinds where it
    // deploys, nothing else.
    let agent = format!("system:serviceaccount:{home}:greenlight-agent");
    for (verb, resource, namespace, allowed) in [
        (
            "patch",
            "configmaps/greenlight-inventory-prod-eu",
            &home,
            true,
        ),
        (
            "get",
            "configmaps/greenlight-inventory-prod-eu",
            &home,
            true,
        ),
        ("update", "leases/greenlight-agent-prod-eu", &home, true),
        ("create", "leases", &home, true),
        ("get", "configmaps/greenlight-server", &home, false),
        ("update", "leases/someone-elses", &home, false),
        ("list", "configmaps", &home, false),
        ("get", "secrets/greenlight-agent-token", &home, false),
        ("patch", "deployments", &apps, true),
        ("delete", "configmaps", &apps, true),
        ("watch", "secrets", &apps, true),
        ("create", "roles", &apps, false),
        ("create", "configmaps", &"default".to_owned(), false),
    ] {
        assert_eq!(
            can(&cluster, &agent, verb, resource, namespace)?,
            allowed,
            "{verb} {resource} in {namespace}"
        );
    }
    // The server's account may do nothing at all.
    let server = format!("system:serviceaccount:{home}:greenlight-server");
    assert!(!can(&cluster, &server, "get", "configmaps", &home)?);

    // And those rights are enough: an agent named as the chart's, acting as its account,
    // takes its Lease, keeps its inventory and deploys to `apps`.
    install_crypto();
    let token = cluster
        .plane
        .kubectl_ok(&["create", "token", "greenlight-agent", "-n", &home])?;
    let as_agent = cluster.plane.client_with_token(token.trim()).await?;
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let entry = cluster.agent_entry(&git_agent_yaml("prod-eu", &repo.url(), &[]));
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &[entry])).await?;
    let _agent = AgentProcess::start_in(&server, "prod-eu", as_agent, "replica-a", &home);
    let manifests = format!("{}---\n{DEPLOYMENT}", configmap("settings", "one"));
    let x = repo.commit(&[("app.yaml", manifests.as_bytes())], &[])?;
    server.release(ZERO, &x, 1).await?;
    server.reported("prod-eu", &x, Phase::Healthy).await?;
    let configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(kube.clone(), &home);
    assert!(
        configmaps
            .get_opt("greenlight-inventory-prod-eu")
            .await?
            .is_some()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greenlight_agent_deploys_greenlight() -> anyhow::Result<()> {
    let helm = helm!();
    install_crypto();
    let Some(cluster) = TestCluster::new().await? else {
        return Ok(());
    };
    // The agent keeps its records in `home` and deploys the release into `apps`, whose own
    // agent would deploy to `target`.
    let target = cluster.plane.namespace(&cluster.kube, "target").await?;
    let apps = cluster.apps.clone();
    let rendered = helm.template(&apps, &format!("agent: {{ namespaces: [{target}] }}\n"))?;

    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let agent = format!(
        "{}    scope: {{ namespaces: [{apps}, {target}] }}\n",
        cluster.agent_entry(&git_agent_yaml("prod", &repo.url(), &[]))
    );
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &[agent])).await?;
    let _agent = AgentProcess::start_in(
        &server,
        "prod",
        cluster.agent_kube.clone(),
        "replica-a",
        &cluster.home,
    );
    let x = repo.commit(&[("greenlight.yaml", rendered.as_bytes())], &[])?;
    server.release(ZERO, &x, 1).await?;
    // Healthy once every Deployment of the release rolled out.
    server.reported("prod", &x, Phase::Healthy).await?;

    let expected = objects(&rendered)?;
    let applied = server
        .history("prod")
        .await?
        .reports
        .into_iter()
        .find(|r| r.revision == x && r.phase() == Phase::Applied)
        .context("no Applied report")?;
    assert_eq!(
        applied.objects.len(),
        expected.len(),
        "one result per object"
    );
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(cluster.kube.clone(), &apps);
    for (name, replicas) in [
        ("greenlight-server", 2),
        ("greenlight-agent", 2),
        ("greenlight-redis", 1),
    ] {
        let status = deployments.get(name).await?.status.unwrap_or_default();
        assert_eq!(status.available_replicas, Some(replicas), "{name}");
    }
    let roles: kube::Api<k8s_openapi::api::rbac::v1::Role> =
        kube::Api::namespaced(cluster.kube.clone(), &target);
    assert!(roles.get_opt("greenlight-agent-deployer").await?.is_some());
    Ok(())
}
