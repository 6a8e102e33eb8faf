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
        ("" | "apps" | "batch" | "policy" | "autoscaling", _) => false,
        _ => !group.ends_with(".k8s.io"),
    }
}

/// Judges `object` of `kind` in `group`: workloads must have rolled out, Jobs completed,
/// everything else by the conventions kstatus reads (observed generation, then the `Stalled`,
/// `Ready`, `Available` and `Reconciling` conditions), or merely exist when it reports none.
pub fn assess(group: &str, kind: &str, object: &Value) -> Health {
    let generation = int(object, "/metadata/generation").unwrap_or(0);
    let observed = int(object, "/status/observedGeneration").unwrap_or(0);
    let replicas = int(object, "/spec/replicas").unwrap_or(1);
    let stale = || {
        Health::Progressing(format!(
            "controller has observed generation {observed} of {generation}"
        ))
    };
    match (group, kind) {
        ("apps", "Deployment") => {
            if observed < generation {
                return stale();
            }
            if condition(object, "Progressing")
                .and_then(|c| c.get("reason"))
                .and_then(Value::as_str)
                == Some("ProgressDeadlineExceeded")
            {
                return Health::Failed("progress deadline exceeded".into());
            }
            let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
            let available = int(object, "/status/availableReplicas").unwrap_or(0);
            if updated < replicas {
                Health::Progressing(format!("{updated} of {replicas} replicas updated"))
            } else if available < replicas {
                Health::Progressing(format!("{available} of {replicas} replicas available"))
            } else {
                Health::Healthy
            }
        }
        ("apps", "StatefulSet") => {
            if observed < generation {
                return stale();
            }
            let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
            let ready = int(object, "/status/readyReplicas").unwrap_or(0);
            if updated < replicas {
                Health::Progressing(format!("{updated} of {replicas} replicas updated"))
            } else if ready < replicas {
                Health::Progressing(format!("{ready} of {replicas} replicas ready"))
            } else {
                Health::Healthy
            }
        }
        ("apps", "DaemonSet") => {
            if observed < generation {
                return stale();
            }
            let desired = int(object, "/status/desiredNumberScheduled").unwrap_or(0);
            let updated = int(object, "/status/updatedNumberScheduled").unwrap_or(0);
            let available = int(object, "/status/numberAvailable").unwrap_or(0);
            if updated < desired {
                Health::Progressing(format!("{updated} of {desired} pods updated"))
            } else if available < desired {
                Health::Progressing(format!("{available} of {desired} pods available"))
            } else {
                Health::Healthy
            }
        }
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
        _ => by_convention(object, observed, generation),
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
    if condition_true(object, "Stalled") {
        return Health::Failed(message("Stalled"));
    }
    for kind in ["Ready", "Available"] {
        if condition(object, kind).is_some() {
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
    Health::Healthy
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
