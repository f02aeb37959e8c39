// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request counters, reported by the control socket's `stats` op.

use serde_json::{json, Map, Value};

use crate::device::error::Status;
use crate::wire::RequestType;

/// Slot 0 counts what is no known type ("other"), slot t type t.
const TYPES: usize = RequestType::ALL.len() + 1;

/// A slot's `stats` key.
fn key(slot: usize) -> &'static str {
    u8::try_from(slot)
        .ok()
        .and_then(|b| RequestType::try_from(b).ok())
        .map_or("other", RequestType::key)
}

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
    /// Frontend connections served, and those whose end the device has
    /// handled (its guest's objects released, its workers joined).
    pub frontend_connections: u64,
    pub frontend_disconnections: u64,
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
    pub(crate) fn count(&mut self, ty: RequestType, status: Status) {
        self.by_status[ty as usize][status as usize] += 1;
    }

    /// A request answered with used length 0 (unknown type, no room).
    pub(crate) fn count_unanswered(&mut self, ty: u8) {
        self.unanswered[slot(ty)] += 1;
    }

    #[cfg(test)]
    pub(crate) fn get(&self, ty: RequestType, status: Status) -> u64 {
        self.by_status[ty as usize][status as usize]
    }

    #[cfg(test)]
    pub(crate) fn unanswered(&self, ty: u8) -> u64 {
        self.unanswered[slot(ty)]
    }

    /// `{"map": {"ok": 3, "range": 1}, "other": {"unanswered": 2}, ...}`;
    /// zero counters are left out.
    pub fn to_json(&self) -> Value {
        let mut types = Map::new();
        for t in 0..TYPES {
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
                types.insert(key(t).into(), Value::Object(m));
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
        s.count(RequestType::Map, Status::Ok);
        s.count(RequestType::Map, Status::Ok);
        s.count(RequestType::Unmap, Status::Range);
        s.count_unanswered(200);
        assert_eq!(
            s.to_json(),
            json!({"map": {"ok": 2}, "unmap": {"range": 1}, "other": {"unanswered": 1}})
        );
    }
}
