//! Health of kinds that follow no status convention, by JSONPath (RFC 9535) queries and the
//! values they should select, written by operators per kind. Parsed by the server when it loads its config, so a typo is a
//! config error, and by the agent when it judges an object.

use serde_json::Value;
use serde_json_path::JsonPath;

/// A query that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid JSONPath {query:?}: {reason}")]
pub struct InvalidQuery {
    pub query: String,
    pub reason: String,
}

/// What a check says of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// A failed value was selected.
    Failed,
    /// Neither matched yet.
    Progressing,
}

/// The parsed query of one kind's check and the values it looks for.
#[derive(Debug, Clone)]
pub struct HealthQuery {
    path: JsonPath,
    healthy: Vec<String>,
    failed: Vec<String>,
}

impl HealthQuery {
    /// Parses `jsonpath`; an object is healthy when it selects one of `healthy`, failed when
    /// one of `failed`.
    pub fn parse(
        jsonpath: &str,
        healthy: &[String],
        failed: &[String],
    ) -> Result<Self, InvalidQuery> {
        let path = JsonPath::parse(jsonpath).map_err(|e| InvalidQuery {
            query: jsonpath.to_owned(),
            reason: e.to_string(),
        })?;
        if healthy.is_empty() {
            return Err(InvalidQuery {
                query: jsonpath.to_owned(),
                reason: "no healthy values: the check could never pass".to_owned(),
            });
        }
        Ok(Self {
            path,
            healthy: healthy.to_vec(),
            failed: failed.to_vec(),
        })
    }

    /// Failed if a selected value is a failed one, healthy if one is a healthy one; the
    /// values selected, for messages.
    pub fn judge(&self, object: &Value) -> (Verdict, Vec<String>) {
        let selected: Vec<String> = self
            .path
            .query(object)
            .all()
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        let verdict = if selected.iter().any(|v| self.failed.contains(v)) {
            Verdict::Failed
        } else if selected.iter().any(|v| self.healthy.contains(v)) {
            Verdict::Healthy
        } else {
            Verdict::Progressing
        };
        (verdict, selected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn values(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_phase_decides() {
        let check = HealthQuery::parse(
            "$.status.phase",
            &values(&["Ready", "Succeeded"]),
            &values(&["Failed"]),
        )
        .unwrap();
        let judge = |object: Value| check.judge(&object).0;
        assert_eq!(
            judge(json!({"status": {"phase": "Ready"}})),
            Verdict::Healthy
        );
        assert_eq!(
            judge(json!({"status": {"phase": "Failed"}})),
            Verdict::Failed
        );
        assert_eq!(
            judge(json!({"status": {"phase": "Pending"}})),
            Verdict::Progressing
        );
        assert_eq!(judge(json!({})), Verdict::Progressing);
    }

    #[test]
    fn a_condition_decides_and_numbers_compare_as_text() {
        let check = HealthQuery::parse(
            "$.status.conditions[?@.type == 'Synced'].status",
            &values(&["True"]),
            &[],
        )
        .unwrap();
        let synced = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Synced", "status": "True"}]}});
        assert_eq!(check.judge(&synced), (Verdict::Healthy, values(&["True"])));
        let replicas = HealthQuery::parse("$.status.ready", &values(&["3"]), &[]).unwrap();
        assert_eq!(
            replicas.judge(&json!({"status": {"ready": 3}})).0,
            Verdict::Healthy
        );
    }

    #[test]
    fn a_typo_or_a_check_that_cannot_pass_is_an_error_naming_the_query() {
        let error =
            HealthQuery::parse("$.status[?@.phase = 'Ready'", &values(&["x"]), &[]).unwrap_err();
        assert!(
            error.to_string().contains("$.status[?@.phase = 'Ready'"),
            "{error}"
        );
        assert!(HealthQuery::parse("$.status.phase", &[], &[]).is_err());
    }

    proptest! {
        #[test]
        fn any_text_parses_or_fails_without_panicking(query in ".{0,64}") {
            if let Ok(check) = HealthQuery::parse(&query, &values(&["x"]), &[]) {
                let _ = check.judge(&json!({"status": {"phase": "x", "list": [1, {"a": null}]}}));
            }
        }
    }
}
