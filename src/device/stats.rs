//! Request counters, reported by the control socket's `stats` op.

use serde_json::{json, Map, Value};

use crate::device::error::Status;

/// Request types we count by name; anything else is "other".
const TYPES: usize = 9;
const TYPE_NAMES: [&str; TYPES] = [
    "other",
    "attach",
    "detach",
    "map",
    "unmap",
    "probe",
    "attach_table",
    "invalidate",
    "page_resp",
];

#[derive(Debug, Default, Clone)]
pub struct Stats {
    by_status: [[u64; Status::COUNT]; TYPES],
    unanswered: [u64; TYPES],
}

fn slot(ty: u8) -> usize {
    let t = ty as usize;
    if t < TYPES {
        t
    } else {
        0
    }
}

impl Stats {
    pub fn count(&mut self, ty: u8, status: Status) {
        self.by_status[slot(ty)][status as usize] += 1;
    }

    /// A request answered with used length 0 (unknown type, no room).
    pub fn count_unanswered(&mut self, ty: u8) {
        self.unanswered[slot(ty)] += 1;
    }

    pub fn get(&self, ty: u8, status: Status) -> u64 {
        self.by_status[slot(ty)][status as usize]
    }

    pub fn unanswered(&self, ty: u8) -> u64 {
        self.unanswered[slot(ty)]
    }

    /// `{"map": {"ok": 3, "range": 1}, "other": {"unanswered": 2}, ...}`;
    /// zero counters are left out.
    pub fn to_json(&self) -> Value {
        let mut types = Map::new();
        for (t, name) in TYPE_NAMES.iter().enumerate() {
            let mut m = Map::new();
            for (s, &n) in self.by_status[t].iter().enumerate() {
                if n != 0 {
                    m.insert(Status::from_index(s).unwrap().name().into(), json!(n));
                }
            }
            if self.unanswered[t] != 0 {
                m.insert("unanswered".into(), json!(self.unanswered[t]));
            }
            if !m.is_empty() {
                types.insert((*name).into(), Value::Object(m));
            }
        }
        Value::Object(types)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_nonzero_counters_by_name() {
        let mut s = Stats::default();
        s.count(3, Status::Ok);
        s.count(3, Status::Ok);
        s.count(4, Status::Range);
        s.count_unanswered(200);
        assert_eq!(
            s.to_json(),
            json!({"map": {"ok": 2}, "unmap": {"range": 1}, "other": {"unanswered": 1}})
        );
    }
}
