//! `metav1.Condition` helpers shared by the controllers.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Condition type that is true when the resource has reached its goal.
pub const READY: &str = "Ready";

/// Sets `new` in `conditions`, replacing one of the same type. The transition time is kept when
/// the status did not change, as the Kubernetes API conventions ask.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
        }
        None => conditions.push(new),
    }
}

/// Builds a condition with the given fields, stamped now.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut conds = vec![condition(READY, false, "Pending", "", Some(1), at(10))];
        set_condition(
            &mut conds,
            condition(READY, false, "StillPending", "x", Some(2), at(20)),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "StillPending");
        set_condition(&mut conds, condition(READY, true, "Done", "", Some(2), at(30)));
        assert_eq!(conds[0].last_transition_time, at(30));
    }
}
