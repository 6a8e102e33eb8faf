//! How many long-lived streams one caller may hold open: each costs a task, a buffer and a
//! watch on this replica, so a misbehaving or compromised client gets a clear refusal
//! instead of this replica's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// Open streams by caller.
#[derive(Clone, Default)]
pub struct StreamSlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; dropping it frees its slot.
pub struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl StreamSlots {
    /// A slot for `caller`, unless it holds `max` already; `what` names the streams for the
    /// refusal.
    pub fn acquire(&self, caller: &str, max: usize, what: &str) -> Result<Slot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(caller.to_owned()).or_default();
        if *count >= max {
            return Err(Status::resource_exhausted(format!(
                "{caller} already has {max} {what} open on this replica, the most allowed; close one first"
            )));
        }
        *count += 1;
        Ok(Slot {
            open: self.open.clone(),
            caller: caller.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_at_most_max_slots_and_a_closed_one_frees_its_slot() {
        let slots = StreamSlots::default();
        let first = slots.acquire("agent prod", 2, "streams").unwrap();
        let _second = slots.acquire("agent prod", 2, "streams").unwrap();
        let refused = slots.acquire("agent prod", 2, "streams").err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("agent prod already has 2 streams open")
        );
        assert!(
            slots.acquire("agent staging", 2, "streams").is_ok(),
            "per caller"
        );
        drop(first);
        assert!(slots.acquire("agent prod", 2, "streams").is_ok());
    }
}
