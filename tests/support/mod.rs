// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-side driver harness for the vhost-user virtio-iommu backend.
//!
//! Layers, bottom up:
//! - [`mem`]: guest RAM in a memfd, GPA read/write, bump allocator.
//! - [`virtq`]: a split-virtqueue driver laid out in that memory.
//! - [`frontend`]: the vhost-user frontend (negotiation, mem table, vrings).
//! - [`wire`]: virtio-iommu request builders and reply/event/config parsers.
//! - [`control`]: JSON-lines client for the backend's control socket.
//! - [`process`]: spawn the backend binary, inspect its RSS and fds.
//! - [`host`]: the backend sharing the test's iommufd, for host endpoints.
//! - [`edu`]: QEMU's edu DMA engine through its VFIO cdev (kernel tiers).
//! - [`fault_socket`]: the kernel's fault FD played by the test (`--test-fault-socket`).
//! - [`cost`]: instructions (callgrind) and system calls (strace) per operation.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
#![allow(dead_code)]
// Each test crate uses a subset of the re-exports below.
#![allow(unused_imports)]

pub mod control;
pub mod cost;
pub mod edu;
pub mod fault_socket;
pub mod fixtures;
pub mod frontend;
pub mod host;
pub mod mem;
pub mod process;
pub mod virtq;
pub mod wire;

use std::fmt;
use std::time::Duration;

pub use control::ControlClient;
pub use frontend::{Frontend, FrontendOptions};
pub use mem::GuestMem;
pub use process::BackendProcess;
pub use virtq::{BatchReplies, QueueOptions, RawDesc, RawNext, SplitQueue, Token};

/// Default time any helper waits for the device before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every harness failure. Tests usually `.expect("...")` these.
#[derive(Debug)]
pub enum Error {
    /// An OS call failed.
    Io(std::io::Error),
    /// The vhost-user frontend reported an error.
    Vhost(vhost::Error),
    /// Nothing happened within the allotted time.
    Timeout(String),
    /// The harness was misused, or the device broke the virtio rules.
    Invalid(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Vhost(e) => write!(f, "vhost-user error: {e}"),
            Error::Timeout(what) => write!(f, "timed out: {what}"),
            Error::Invalid(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<vhost::Error> for Error {
    fn from(e: vhost::Error) -> Self {
        Error::Vhost(e)
    }
}

/// Result type of the harness.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand to build an [`Error::Invalid`].
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}

/// Retry `f` until it succeeds or `timeout` passes; returns the last error.
pub fn retry<T, E: fmt::Display>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> std::result::Result<T, E>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::Timeout(format!("{what}: last error: {e}")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
