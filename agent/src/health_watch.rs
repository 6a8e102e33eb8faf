//! The health watcher: after a revision's writes, polls the objects whose status means
//! something (workloads, custom resources, kinds with an operator's check) until all are
//! healthy, one has failed, or the health timeout passed.

use std::collections::HashMap;
use std::time::Duration;

use greenlight::health_check::{HealthQuery, Verdict};
use greenlight::v1::object_result::Action;
use greenlight::v1::{ApplySettings, ObjectResult};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::health::{Health, assess, has_status};
use crate::plan::{InventoryEntry, ObjectKey};
use greenlight::backoff::jittered;

/// How often health is polled while waiting.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// How long after the health timeout the reads of the last pass may still take.
const LAST_PASS_GRACE: Duration = Duration::from_secs(5);
/// Health timeouts beyond a week are taken as a week: far enough, and no overflow.
const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// How waiting ended.
#[derive(Debug)]
pub enum Waited {
    Healthy,
    /// One failed, or the timeout passed first: why, and the objects that were not healthy.
    Unhealthy {
        message: String,
        objects: Vec<ObjectResult>,
    },
    /// A newer revision arrived (or leadership was lost).
    Stopped,
}

/// Operators' checks by (group, kind); a check whose query does not parse judges every
/// object of its kind failed, saying why.
type Checks = HashMap<(String, String), Result<HealthQuery, String>>;

/// Waits for the health of one revision's objects.
pub struct HealthWatch<'a> {
    cluster: &'a Cluster,
    checks: Checks,
    watched: Vec<&'a InventoryEntry>,
    timeout: Duration,
}

impl<'a> HealthWatch<'a> {
    /// Watches those of `desired` that have a status worth waiting for.
    pub fn new(
        cluster: &'a Cluster,
        desired: &'a [InventoryEntry],
        settings: &ApplySettings,
    ) -> Self {
        let checks: Checks = settings
            .health_checks
            .iter()
            .map(|c| {
                let query = HealthQuery::parse(&c.jsonpath, &c.healthy_values, &c.failed_values)
                    .map_err(|e| e.to_string());
                ((c.group.clone(), c.kind.clone()), query)
            })
            .collect();
        let watched = desired
            .iter()
            .filter(|e| {
                has_status(&e.key.group, &e.key.kind) || check_of(&checks, &e.key).is_some()
            })
            .collect();
        Self {
            cluster,
            checks,
            watched,
            timeout: health_timeout(settings.health_timeout_seconds),
        }
    }

    /// Polls until every watched object is healthy, one failed, the timeout passed or `stop`.
    pub async fn wait(&self, stop: &(dyn Fn() -> bool + Sync)) -> Waited {
        let deadline = tokio::time::Instant::now().checked_add(self.timeout);
        let reads_end = deadline.and_then(|deadline| deadline.checked_add(LAST_PASS_GRACE));
        loop {
            let mut unhealthy: Vec<(String, String)> = Vec::new();
            let mut failed: Vec<(String, String)> = Vec::new();
            for entry in &self.watched {
                if stop() {
                    return Waited::Stopped;
                }
                // Applied a moment ago, so served then: a kind gone since (its CRD deleted)
                // says nothing of the object's health, which is not healthy for it.
                let Some(resolved) = self.cluster.resolve(&entry.api_version, &entry.key.kind)
                else {
                    unhealthy.push((
                        entry.key.to_string(),
                        format!(
                            "{} {} is no longer served by the API server",
                            entry.api_version, entry.key.kind
                        ),
                    ));
                    continue;
                };
                let read =
                    self.cluster
                        .get(&resolved, entry.key.namespace.as_deref(), &entry.key.name);
                // Reads end a little after the deadline, so that the last pass can still say
                // why each object is not healthy, but an API server that hangs cannot make a
                // pass over many objects outlast the health timeout by a read's time each.
                let read = match reads_end {
                    Some(end) => tokio::time::timeout_at(end, read).await.ok(),
                    None => Some(read.await),
                };
                let state = match read {
                    Some(Ok(Some(object))) => match serde_json::to_value(&object) {
                        Ok(value) => judge(&self.checks, &entry.key, &value),
                        Err(error) => Health::Progressing(error.to_string()),
                    },
                    Some(Ok(None)) => Health::Progressing("does not exist".into()),
                    Some(Err(error)) => Health::Progressing(error.message()),
                    None => Health::Progressing(
                        "the API server did not answer within the health timeout".into(),
                    ),
                };
                match state {
                    Health::Healthy => {}
                    Health::Progressing(why) => unhealthy.push((entry.key.to_string(), why)),
                    Health::Failed(why) => failed.push((entry.key.to_string(), why)),
                }
            }
            if unhealthy.is_empty() && failed.is_empty() {
                return Waited::Healthy;
            }
            let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if !failed.is_empty() || timed_out {
                failed.extend(unhealthy);
                return unhealthy_report(&self.watched, &failed, self.timeout);
            }
            if stop() {
                return Waited::Stopped;
            }
            tokio::time::sleep(jittered(HEALTH_POLL)).await;
        }
    }
}

fn check_of<'c>(checks: &'c Checks, key: &ObjectKey) -> Option<&'c Result<HealthQuery, String>> {
    checks.get(&(key.group.clone(), key.kind.clone()))
}

/// The health of one object: the operator's check for its kind if there is one (they are
/// for kinds whose status the conventions cannot read), else the conventions.
fn judge(checks: &Checks, key: &ObjectKey, object: &Value) -> Health {
    match check_of(checks, key) {
        Some(Ok(check)) => judged(check, object),
        Some(Err(invalid)) => Health::Failed(invalid.clone()),
        None => assess(&key.group, &key.kind, object),
    }
}

/// What an operator's check says, as health with the values it saw.
fn judged(check: &HealthQuery, object: &Value) -> Health {
    let (verdict, selected) = check.judge(object);
    let seen = if selected.is_empty() {
        "its health check selects nothing yet".to_owned()
    } else {
        format!("its health check selects {}", selected.join(", "))
    };
    match verdict {
        Verdict::Healthy => Health::Healthy,
        Verdict::Failed => Health::Failed(seen),
        Verdict::Progressing => Health::Progressing(seen),
    }
}

/// The report of objects not healthy in time: `reasons` by object, failed ones first.
fn unhealthy_report(
    watched: &[&InventoryEntry],
    reasons: &[(String, String)],
    timeout: Duration,
) -> Waited {
    let objects: Vec<ObjectResult> = watched
        .iter()
        .filter_map(|entry| {
            let name = entry.key.to_string();
            let (_, why) = reasons.iter().find(|(n, _)| *n == name)?;
            Some(ObjectResult {
                api_version: entry.api_version.clone(),
                kind: entry.key.kind.clone(),
                namespace: entry.key.namespace.clone().unwrap_or_default(),
                name: entry.key.name.clone(),
                action: Action::NotHealthy.into(),
                message: why.clone(),
            })
        })
        .collect();
    let list: Vec<String> = reasons
        .iter()
        .map(|(name, why)| format!("{name}: {why}"))
        .collect();
    Waited::Unhealthy {
        message: format!(
            "not healthy after {}s: {}",
            timeout.as_secs(),
            list.join("; ")
        ),
        objects,
    }
}

/// The configured health timeout, at least a second and at most [`MAX_HEALTH_TIMEOUT`].
fn health_timeout(seconds: u64) -> Duration {
    Duration::from_secs(seconds.clamp(1, MAX_HEALTH_TIMEOUT.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{resources, serve};
    use serde_json::json;

    /// What a wait for `desired` with a health timeout of one second names unhealthy; it
    /// must end near that timeout, and not healthy.
    async fn unhealthy_within_a_second(
        cluster: &Cluster,
        desired: &[InventoryEntry],
    ) -> Vec<ObjectResult> {
        let settings = ApplySettings {
            health_timeout_seconds: 1,
            ..ApplySettings::default()
        };
        let watch = HealthWatch::new(cluster, desired, &settings);
        let waited = tokio::time::timeout(Duration::from_secs(30), watch.wait(&|| false))
            .await
            .expect("the wait ends near its health timeout");
        let Waited::Unhealthy { objects, .. } = waited else {
            panic!("not healthy: {waited:?}");
        };
        objects
    }

    /// An API server that hangs on every read of a Deployment makes the wait end shortly
    /// after its health timeout, not a read's timeout (a minute) later for each object.
    #[tokio::test]
    async fn reads_an_api_server_never_answers_end_at_the_health_timeout() {
        let (client, _) = serve(|method, path| match (method, path) {
            ("GET", "/apis/apps/v1") => Some((
                200,
                resources("apps/v1", &[("deployments", "Deployment", true)]),
            )),
            _ => None,
        })
        .await;
        let cluster = Cluster::new(client, "test");
        cluster.discover([("apps/v1", "Deployment")]).await;
        let desired: Vec<InventoryEntry> = (0..3)
            .map(|n| crate::testing::deployment_entry(&format!("web-{n}")))
            .collect();
        // The timeout and the last pass's grace, well under the three minutes three
        // unanswered reads would take.
        let objects = unhealthy_within_a_second(&cluster, &desired).await;
        assert_eq!(objects.len(), 3, "each object named: {objects:?}");
        assert!(
            objects.iter().any(|o| o
                .message
                .contains("did not answer within the health timeout")),
            "{objects:?}"
        );
    }

    /// A kind the API server no longer serves is not taken for healthy.
    #[tokio::test]
    async fn an_object_of_a_kind_no_longer_served_is_not_healthy() {
        let (client, _) = serve(|_, _| Some((404, crate::testing::status(404, "not found")))).await;
        let cluster = Cluster::new(client, "test");
        let desired = [crate::testing::namespaced_entry(
            "example.com/v1",
            "Widget",
            "gizmo",
        )];
        let objects = unhealthy_within_a_second(&cluster, &desired).await;
        assert!(
            objects[0].message.contains("no longer served"),
            "{objects:?}"
        );
    }

    #[test]
    fn any_configured_health_timeout_makes_a_deadline() {
        for seconds in [0, 1, 600, u64::MAX] {
            let timeout = health_timeout(seconds);
            assert!(timeout >= Duration::from_secs(1) && timeout <= MAX_HEALTH_TIMEOUT);
            assert!(tokio::time::Instant::now().checked_add(timeout).is_some());
        }
    }

    #[test]
    fn an_operators_check_decides_before_the_conventions_and_a_broken_one_fails() {
        let bucket = ObjectKey {
            group: "example.com".into(),
            kind: "Bucket".into(),
            namespace: Some("apps".into()),
            name: "logs".into(),
        };
        let mut checks = Checks::new();
        let ready = |v: &str| vec![v.to_owned()];
        checks.insert(
            ("example.com".into(), "Bucket".into()),
            HealthQuery::parse("$.status.phase", &ready("Ready"), &ready("Lost"))
                .map_err(|e| e.to_string()),
        );
        // The conventions would call it healthy: it has no conditions.
        let provisioning = json!({"status": {"phase": "Provisioning"}});
        assert_eq!(
            judge(&checks, &bucket, &provisioning),
            Health::Progressing("its health check selects Provisioning".into())
        );
        assert_eq!(
            judge(&checks, &bucket, &json!({"status": {"phase": "Ready"}})),
            Health::Healthy
        );
        checks.insert(
            ("example.com".into(), "Bucket".into()),
            Err("invalid JSONPath".into()),
        );
        assert_eq!(
            judge(&checks, &bucket, &provisioning),
            Health::Failed("invalid JSONPath".into())
        );
    }

    #[test]
    fn the_report_names_each_unhealthy_object_failed_first() {
        let entry = crate::testing::deployment_entry;
        let (web, db) = (entry("web"), entry("db"));
        let reasons = vec![
            (
                "Deployment apps/db".to_owned(),
                "progress deadline exceeded".to_owned(),
            ),
            (
                "Deployment apps/web".to_owned(),
                "1 of 2 replicas available".to_owned(),
            ),
        ];
        let Waited::Unhealthy { message, objects } =
            unhealthy_report(&[&web, &db], &reasons, Duration::from_secs(60))
        else {
            panic!("unhealthy");
        };
        assert_eq!(
            message,
            "not healthy after 60s: Deployment apps/db: progress deadline exceeded; Deployment apps/web: 1 of 2 replicas available"
        );
        assert_eq!(objects.len(), 2);
        assert!(objects.iter().all(|o| o.action() == Action::NotHealthy));
    }
}
