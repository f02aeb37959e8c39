// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![recursion_limit = "256"]
//! vhost-device-iommu: a virtio-iommu device served over vhost-user.

pub mod args;
pub(crate) mod control;
pub mod device;
pub(crate) mod fast_map;
pub mod fault_queue;
pub mod iommufd_bridge;
pub mod lock_order;
pub(crate) mod log_limit;
pub mod nested;
pub mod sandbox;
pub mod server;
pub(crate) mod viot;
pub mod wire;
