// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
    pub device: DeviceCounters,
}

/// What the guest and the frontend did besides requests (each also logged,
/// rate-limited: these are the totals).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Writes of the bypass byte that took effect (0 or 1, BYPASS_CONFIG
    /// negotiated), whether they changed it or not.
    pub bypass_writes: u64,
    /// Of those, the ones the host refused (the byte kept its value).
    pub bypass_refused: u64,
    /// Other SET_CONFIG writes inside the config: ignored.
    pub config_writes_ignored: u64,
    /// GET_CONFIG windows outside the config: failed.
    pub config_reads_refused: u64,
    /// Passes over the requestq that found its avail index more than a
    /// queue size ahead (or the ring unreadable): stopped until the next kick.
    pub requestq_bad_avail: u64,
    /// The same for the eventq.
    pub eventq_bad_avail: u64,
    /// RESET_DEVICE messages.
    pub device_resets: u64,
    /// Frontend connections served.
    pub frontend_connections: u64,
    /// Endpoints hot-plugged over the control socket, removed, and adds
    /// refused (exists, bound, host refusal).
    pub endpoints_added: u64,
    pub endpoints_removed: u64,
    pub endpoint_adds_refused: u64,
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
    pub(crate) fn count(&mut self, ty: u8, status: Status) {
        self.by_status[slot(ty)][status as usize] += 1;
    }

    /// A request answered with used length 0 (unknown type, no room).
    pub(crate) fn count_unanswered(&mut self, ty: u8) {
        self.unanswered[slot(ty)] += 1;
    }

    #[cfg(test)]
    pub(crate) fn get(&self, ty: u8, status: Status) -> u64 {
        self.by_status[slot(ty)][status as usize]
    }

    #[cfg(test)]
    pub(crate) fn unanswered(&self, ty: u8) -> u64 {
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
