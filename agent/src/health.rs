//! Whether an applied object is healthy, judged from its status as the API server reports it.

use serde_json::Value;

/// The health of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Still converging; the reason says what is missing.
    Progressing(String),
    /// Will not converge without a change (a failed Job).
    Failed(String),
}

fn int(value: &Value, pointer: &str) -> Option<i64> {
    value.pointer(pointer).and_then(Value::as_i64)
}

fn condition<'a>(value: &'a Value, kind: &str) -> Option<&'a Value> {
    value
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn condition_true(value: &Value, kind: &str) -> bool {
    condition(value, kind)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

/// Whether objects of `kind` in `group` have a status worth waiting for: the built-in
/// workloads, and custom resources, which by convention report `observedGeneration` and
/// conditions. Other built-in kinds (ConfigMaps, Services, RBAC) are done once they exist, and
/// reading each back would cost a request per object.
pub fn has_status(group: &str, kind: &str) -> bool {
    match (group, kind) {
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") | ("batch", "Job") => true,
        _ => !crate::plan::is_kubernetes_group(group),
    }
}

/// Judges `object` of `kind` in `group`: workloads must have rolled out as `kubectl rollout
/// status` judges them, Jobs completed, everything else by the conventions kstatus reads
/// (observed generation, then the `Stalled`, `Ready`, `Available` and `Reconciling`
/// conditions), or merely exist when it reports none.
pub fn assess(group: &str, kind: &str, object: &Value) -> Health {
    match (group, kind) {
        ("apps", "Deployment") => deployment(object),
        ("apps", "StatefulSet") => stateful_set(object),
        ("apps", "DaemonSet") => daemon_set(object),
        ("batch", "Job") => {
            if condition_true(object, "Complete") {
                Health::Healthy
            } else if condition_true(object, "Failed") {
                let reason = condition(object, "Failed")
                    .and_then(|c| c.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("job failed");
                Health::Failed(reason.to_owned())
            } else {
                Health::Progressing("job has not completed".into())
            }
        }
        _ => {
            let generation = int(object, "/metadata/generation").unwrap_or(0);
            let observed = int(object, "/status/observedGeneration").unwrap_or(0);
            by_convention(object, observed, generation)
        }
    }
}

/// `Some(Progressing)` while the workload's controller has not yet seen its latest spec: until
/// then its status describes the previous one.
fn unobserved(object: &Value) -> Option<Health> {
    let generation = int(object, "/metadata/generation").unwrap_or(0);
    let observed = int(object, "/status/observedGeneration").unwrap_or(0);
    (observed < generation).then(|| {
        Health::Progressing(format!(
            "controller has observed generation {observed} of {generation}"
        ))
    })
}

/// `spec.replicas`, which the API server defaults to 1.
fn desired_replicas(object: &Value) -> i64 {
    int(object, "/spec/replicas").unwrap_or(1)
}

/// Whether the workload's update strategy is `OnDelete`: its controller replaces a pod only
/// once someone deletes it, so waiting for every pod to be updated could never end.
fn updates_on_delete(object: &Value) -> bool {
    object
        .pointer("/spec/updateStrategy/type")
        .and_then(Value::as_str)
        == Some("OnDelete")
}

/// A Deployment as `kubectl rollout status` judges it. `availableReplicas` counts the old
/// ReplicaSets' pods too, so it proves nothing until no old pod is left (`status.replicas`
/// equals `updatedReplicas`) and is compared with the updated count.
fn deployment(object: &Value) -> Health {
    if let Some(stale) = unobserved(object) {
        return stale;
    }
    if condition(object, "Progressing")
        .and_then(|c| c.get("reason"))
        .and_then(Value::as_str)
        == Some("ProgressDeadlineExceeded")
    {
        return Health::Failed("progress deadline exceeded".into());
    }
    let desired = desired_replicas(object);
    let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
    let total = int(object, "/status/replicas").unwrap_or(0);
    let available = int(object, "/status/availableReplicas").unwrap_or(0);
    if updated < desired {
        Health::Progressing(format!("{updated} of {desired} replicas updated"))
    } else if total > updated {
        Health::Progressing(format!(
            "{} old replicas pending termination",
            total - updated
        ))
    } else if available < updated {
        Health::Progressing(format!(
            "{available} of {updated} updated replicas available"
        ))
    } else {
        Health::Healthy
    }
}

/// A StatefulSet as `kubectl rollout status` judges it, except that an `OnDelete` one (which
/// kubectl refuses to wait for) is done once its pods are ready: only a person deleting pods
/// would update them. A partitioned rollout is done once the pods at or above the partition
/// ordinal are updated; the ones below stay at the old revision on purpose.
fn stateful_set(object: &Value) -> Health {
    if let Some(stale) = unobserved(object) {
        return stale;
    }
    let desired = desired_replicas(object);
    let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
    let total = int(object, "/status/replicas").unwrap_or(0);
    let ready = int(object, "/status/readyReplicas").unwrap_or(0);
    let partition = int(object, "/spec/updateStrategy/rollingUpdate/partition")
        .unwrap_or(0)
        .clamp(0, desired.max(0));
    let to_update = desired - partition;
    if !updates_on_delete(object) && updated < to_update {
        return Health::Progressing(if partition > 0 {
            format!("{updated} of {to_update} replicas at or above partition {partition} updated")
        } else {
            format!("{updated} of {desired} replicas updated")
        });
    }
    // `readyReplicas` counts pods being scaled away too: a ready condemned pod must not stand
    // in for an updated one that is not ready.
    if total > desired {
        Health::Progressing(format!(
            "{} replicas above {desired} pending termination",
            total - desired
        ))
    } else if ready < desired {
        Health::Progressing(format!("{ready} of {desired} replicas ready"))
    } else {
        Health::Healthy
    }
}

/// A DaemonSet as `kubectl rollout status` judges it, except that an `OnDelete` one is done
/// once its pods are available. The controller counts only the oldest pod on each node, for
/// availability as for being updated, so a surging new pod cannot hide behind an old one.
fn daemon_set(object: &Value) -> Health {
    if let Some(stale) = unobserved(object) {
        return stale;
    }
    let desired = int(object, "/status/desiredNumberScheduled").unwrap_or(0);
    let updated = int(object, "/status/updatedNumberScheduled").unwrap_or(0);
    let available = int(object, "/status/numberAvailable").unwrap_or(0);
    if !updates_on_delete(object) && updated < desired {
        Health::Progressing(format!("{updated} of {desired} pods updated"))
    } else if available < desired {
        Health::Progressing(format!("{available} of {desired} pods available"))
    } else {
        Health::Healthy
    }
}

fn by_convention(object: &Value, observed: i64, generation: i64) -> Health {
    let reported_generation = object.pointer("/status/observedGeneration").is_some();
    if reported_generation && observed < generation {
        return Health::Progressing(format!(
            "controller has observed generation {observed} of {generation}"
        ));
    }
    let message = |kind: &str| {
        condition(object, kind)
            .and_then(|c| c.get("message").or_else(|| c.get("reason")))
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map(|m| format!("{kind}: {m}"))
            .unwrap_or_else(|| format!("{kind} is not True"))
    };
    // A condition carries its own observedGeneration (metav1.Condition): the one that
    // decides, set for an earlier spec, says nothing of this one whatever the status-wide
    // field says, so a Ready left over from the previous revision does not pass the new one.
    let set_before = |kind: &str| {
        condition(object, kind)
            .and_then(|c| int(c, "/observedGeneration"))
            .filter(|seen| *seen < generation)
            .map(|seen| {
                Health::Progressing(format!(
                    "{kind} was set for generation {seen} of {generation}"
                ))
            })
    };
    // A Stalled left from an earlier spec gives way to a condition set for this one: a
    // controller that forgot to clear it would otherwise hold the rollout until it timed out.
    let stalled_before = if condition_true(object, "Stalled") {
        match set_before("Stalled") {
            Some(earlier) => Some(earlier),
            None => return Health::Failed(message("Stalled")),
        }
    } else {
        None
    };
    for kind in ["Ready", "Available"] {
        if condition(object, kind).is_some() {
            if let Some(earlier) = set_before(kind) {
                return earlier;
            }
            return if condition_true(object, kind) {
                Health::Healthy
            } else {
                Health::Progressing(message(kind))
            };
        }
    }
    if condition_true(object, "Reconciling") {
        return Health::Progressing(message("Reconciling"));
    }
    stalled_before.unwrap_or(Health::Healthy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployment_is_healthy_only_when_rolled_out() {
        let mut d = json!({"metadata": {"generation": 2}, "spec": {"replicas": 3},
            "status": {"observedGeneration": 1, "updatedReplicas": 3, "availableReplicas": 3}});
        assert!(
            matches!(assess("apps", "Deployment", &d), Health::Progressing(r) if r.contains("generation 1 of 2"))
        );
        d["status"]["observedGeneration"] = json!(2);
        d["status"]["availableReplicas"] = json!(2);
        assert!(
            matches!(assess("apps", "Deployment", &d), Health::Progressing(r) if r.contains("2 of 3"))
        );
        d["status"]["availableReplicas"] = json!(3);
        assert_eq!(assess("apps", "Deployment", &d), Health::Healthy);
        d["status"]["conditions"] = json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]);
        assert!(matches!(
            assess("apps", "Deployment", &d),
            Health::Failed(_)
        ));
    }

    /// A Deployment of 3 replicas mid-rollout with maxSurge 1 and maxUnavailable 0: all 3 new
    /// pods exist, one of them crash-looping, and one old pod still serves.
    fn surging_deployment() -> Value {
        json!({"metadata": {"generation": 2}, "spec": {"replicas": 3},
            "status": {"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3,
                "availableReplicas": 3}})
    }

    #[test]
    fn a_deployment_with_old_pods_left_is_still_rolling_out() {
        let mut d = surging_deployment();
        assert_eq!(
            assess("apps", "Deployment", &d),
            Health::Progressing("1 old replicas pending termination".into())
        );
        // The old pod is gone; the crash-looping new one is not available.
        d["status"]["replicas"] = json!(3);
        d["status"]["availableReplicas"] = json!(2);
        assert_eq!(
            assess("apps", "Deployment", &d),
            Health::Progressing("2 of 3 updated replicas available".into())
        );
        d["status"]["availableReplicas"] = json!(3);
        assert_eq!(assess("apps", "Deployment", &d), Health::Healthy);
    }

    fn stateful_set(strategy: Value, updated: i64, ready: i64) -> Value {
        json!({"metadata": {"generation": 2}, "spec": {"replicas": 3, "updateStrategy": strategy},
            "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": updated,
                "readyReplicas": ready}})
    }

    #[test]
    fn an_on_delete_statefulset_is_done_once_its_pods_are_ready() {
        let on_delete = json!({"type": "OnDelete"});
        assert_eq!(
            assess(
                "apps",
                "StatefulSet",
                &stateful_set(on_delete.clone(), 0, 3)
            ),
            Health::Healthy
        );
        assert_eq!(
            assess("apps", "StatefulSet", &stateful_set(on_delete, 0, 2)),
            Health::Progressing("2 of 3 replicas ready".into())
        );
    }

    #[test]
    fn a_partitioned_statefulset_is_done_once_the_pods_above_the_partition_are_updated() {
        let partitioned = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
        assert_eq!(
            assess(
                "apps",
                "StatefulSet",
                &stateful_set(partitioned.clone(), 1, 3)
            ),
            Health::Healthy
        );
        assert_eq!(
            assess("apps", "StatefulSet", &stateful_set(partitioned, 0, 3)),
            Health::Progressing("0 of 1 replicas at or above partition 2 updated".into())
        );
        // A partition beyond the replicas holds every pod back: nothing to wait for.
        let beyond = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 5}});
        assert_eq!(
            assess("apps", "StatefulSet", &stateful_set(beyond, 0, 3)),
            Health::Healthy
        );
        let whole = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
        assert_eq!(
            assess("apps", "StatefulSet", &stateful_set(whole, 2, 3)),
            Health::Progressing("2 of 3 replicas updated".into())
        );
    }

    #[test]
    fn a_statefulset_scaling_down_is_not_healthy_on_the_strength_of_a_condemned_pod() {
        // Scaled 4 -> 3 in the same revision as a new image: the ready count includes pod 3,
        // about to be deleted, while one updated pod is not ready.
        let mut sts = stateful_set(json!({"type": "RollingUpdate"}), 3, 3);
        sts["status"]["replicas"] = json!(4);
        assert_eq!(
            assess("apps", "StatefulSet", &sts),
            Health::Progressing("1 replicas above 3 pending termination".into())
        );
    }

    #[test]
    fn an_on_delete_daemonset_is_done_once_its_pods_are_available() {
        let ds = |available: i64| {
            json!({"metadata": {"generation": 2}, "spec": {"updateStrategy": {"type": "OnDelete"}},
                "status": {"observedGeneration": 2, "desiredNumberScheduled": 2,
                    "updatedNumberScheduled": 0, "numberAvailable": available}})
        };
        assert_eq!(assess("apps", "DaemonSet", &ds(2)), Health::Healthy);
        assert_eq!(
            assess("apps", "DaemonSet", &ds(1)),
            Health::Progressing("1 of 2 pods available".into())
        );
        let mut rolling = ds(2);
        rolling["spec"]["updateStrategy"] = json!({"type": "RollingUpdate"});
        assert_eq!(
            assess("apps", "DaemonSet", &rolling),
            Health::Progressing("0 of 2 pods updated".into())
        );
    }

    #[test]
    fn jobs_must_complete() {
        let job = json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}});
        assert_eq!(assess("batch", "Job", &job), Health::Healthy);
        let job = json!({"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}});
        assert_eq!(
            assess("batch", "Job", &job),
            Health::Failed("BackoffLimitExceeded".into())
        );
        assert!(matches!(
            assess("batch", "Job", &json!({})),
            Health::Progressing(_)
        ));
    }

    #[test]
    fn custom_resources_follow_the_kstatus_conventions() {
        let ready = |status: &str| {
            json!({"metadata": {"generation": 2}, "status": {"observedGeneration": 2,
                "conditions": [{"type": "Ready", "status": status, "message": "backend down"}]}})
        };
        assert_eq!(
            assess("example.com", "Widget", &ready("True")),
            Health::Healthy
        );
        assert_eq!(
            assess("example.com", "Widget", &ready("False")),
            Health::Progressing("Ready: backend down".into())
        );
        let stale = json!({"metadata": {"generation": 3}, "status": {"observedGeneration": 2}});
        assert!(matches!(
            assess("example.com", "Widget", &stale),
            Health::Progressing(_)
        ));
        // Each condition for the generation it was set for.
        let condition_of = |seen: i64| {
            json!({"metadata": {"generation": 3}, "status": {"observedGeneration": 3,
                "conditions": [{"type": "Ready", "status": "True", "observedGeneration": seen}]}})
        };
        assert_eq!(
            assess("example.com", "Widget", &condition_of(2)),
            Health::Progressing("Ready was set for generation 2 of 3".into())
        );
        assert_eq!(
            assess("example.com", "Widget", &condition_of(3)),
            Health::Healthy
        );
        let stalled_before = json!({"metadata": {"generation": 3}, "status": {"conditions": [
            {"type": "Stalled", "status": "True", "reason": "BadSpec", "observedGeneration": 2}]}});
        assert!(matches!(
            assess("example.com", "Widget", &stalled_before),
            Health::Progressing(_)
        ));
        let stalled_before_ready_now = json!({"metadata": {"generation": 3}, "status": {
            "conditions": [
                {"type": "Stalled", "status": "True", "reason": "BadSpec", "observedGeneration": 2},
                {"type": "Ready", "status": "True", "observedGeneration": 3}]}});
        assert_eq!(
            assess("example.com", "Widget", &stalled_before_ready_now),
            Health::Healthy
        );
        let stalled_before_not_ready_now = json!({"metadata": {"generation": 3}, "status": {
            "conditions": [
                {"type": "Stalled", "status": "True", "reason": "BadSpec", "observedGeneration": 2},
                {"type": "Ready", "status": "False", "reason": "Pulling", "observedGeneration": 3}]}});
        assert_eq!(
            assess("example.com", "Widget", &stalled_before_not_ready_now),
            Health::Progressing("Ready: Pulling".into())
        );
        // Only the condition that decides is held to its generation.
        let ready_now_available_before = json!({"metadata": {"generation": 3}, "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "observedGeneration": 3},
                {"type": "Available", "status": "False", "observedGeneration": 1}]}});
        assert_eq!(
            assess("example.com", "Widget", &ready_now_available_before),
            Health::Healthy
        );
        let stalled_now_ready_before = json!({"metadata": {"generation": 3}, "status": {
            "conditions": [
                {"type": "Stalled", "status": "True", "reason": "BadSpec", "observedGeneration": 3},
                {"type": "Ready", "status": "True", "observedGeneration": 2}]}});
        assert_eq!(
            assess("example.com", "Widget", &stalled_now_ready_before),
            Health::Failed("Stalled: BadSpec".into())
        );
        let stalled = json!({"status": {"conditions": [{"type": "Stalled", "status": "True", "reason": "BadSpec"}]}});
        assert_eq!(
            assess("example.com", "Widget", &stalled),
            Health::Failed("Stalled: BadSpec".into())
        );
        // No status at all: a resource without a controller is done once it exists.
        assert_eq!(
            assess(
                "example.com",
                "Widget",
                &json!({"metadata": {"generation": 1}})
            ),
            Health::Healthy
        );
        assert!(has_status("example.com", "Widget"));
        assert!(!has_status("", "ConfigMap"));
        assert!(!has_status("rbac.authorization.k8s.io", "Role"));
        assert!(has_status("apps", "Deployment"));
    }

    #[test]
    fn other_objects_are_healthy_when_they_exist() {
        assert_eq!(assess("", "ConfigMap", &json!({})), Health::Healthy);
    }

    #[test]
    fn statefulsets_and_daemonsets_roll_out() {
        let sts = json!({"metadata": {"generation": 1}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "updatedReplicas": 2, "readyReplicas": 1}});
        assert!(matches!(
            assess("apps", "StatefulSet", &sts),
            Health::Progressing(_)
        ));
        let ds = json!({"metadata": {"generation": 1},
            "status": {"observedGeneration": 1, "desiredNumberScheduled": 2, "updatedNumberScheduled": 2, "numberAvailable": 2}});
        assert_eq!(assess("apps", "DaemonSet", &ds), Health::Healthy);
    }
}
