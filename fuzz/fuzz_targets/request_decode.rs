// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Arbitrary bytes into the request decoder and the dispatcher.
//!
//! Input: acked features (u64 LE), a config byte (see `config_from`), then
//! records `[writable_len u16 LE][n u8][n request bytes]` until the input
//! ends. Every record goes through `request::decode` and `dispatch::handle`
//! against one fresh `IommuState` (so ATTACH, MAP, ... sequences build
//! state). The whole tail after the header also goes through `decode`.
//!
//! Checked: no panic; a `Reply::Write` fits the writable part, holds at least
//! the tail, a known status and a zero `tail.reserved`; an unknown type gets
//! `Reply::None`; `IommuState::check_invariants` after every request.
#![no_main]

use iommu_fuzz::{config_from, small_limits, Input, ENDPOINTS};
use libfuzzer_sys::fuzz_target;
use vhost_device_iommu::device::dispatch::{handle, Reply, MAX_REPLY};
use vhost_device_iommu::device::request::{decode, Decoded};
use vhost_device_iommu::wire::{MAX_READABLE, TAIL_LEN};
use vhost_device_iommu::device::state::IommuState;
use vhost_device_iommu::device::stats::Stats;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let acked = input.u64();
    let config = config_from(input.u8());
    let tail = &data[data.len().min(9)..];
    let _ = decode(tail, acked);
    let _ = decode(&tail[..tail.len().min(MAX_READABLE)], acked);

    let mut state = IommuState::new(config, small_limits(16), &ENDPOINTS);
    let mut stats = Stats::default();
    let mut out = [0u8; MAX_REPLY];
    while !input.is_empty() {
        let writable_len = u64::from(input.u16());
        let n = usize::from(input.u8()).min(MAX_READABLE);
        let req = input.bytes(n);
        let unknown = matches!(decode(req, acked), Decoded::Unknown(_));
        out.fill(0xa5);
        let reply = handle(&mut state, &mut stats, acked, req, writable_len, &mut out);
        match reply {
            Reply::None => {}
            Reply::Write { len } => {
                assert!(!unknown, "unknown request type answered: {req:02x?}");
                assert!(
                    len as u64 <= writable_len,
                    "reply of {len} bytes for a writable part of {writable_len}: {req:02x?}"
                );
                assert!((TAIL_LEN..=MAX_REPLY).contains(&len), "reply length {len}");
                let t = &out[len - TAIL_LEN..len];
                assert!(t[0] <= 8, "status {} out of the spec's range", t[0]);
                assert_eq!(&t[1..], &[0, 0, 0], "tail.reserved not zero");
            }
        }
        if unknown {
            assert_eq!(reply, Reply::None, "unknown type must get no reply");
        }
        if let Err(e) = state.check_invariants() {
            panic!("invariant broken after {req:02x?} (writable {writable_len}): {e}");
        }
    }
});
