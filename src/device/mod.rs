// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-iommu semantics and the vhost-user glue.

pub mod backend;
pub(crate) mod chain;
pub mod config;
pub mod dispatch;
pub(crate) mod error;
pub(crate) mod host_port;
pub(crate) mod mem_view;
pub(crate) mod poll;
pub mod request;
pub mod state;
pub mod stats;
pub(crate) mod translate;

pub(crate) use config::features;
