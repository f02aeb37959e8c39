// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The socket tier's usual set-up: the backend with virtual endpoints 8
//! and 0x10, a fully set-up frontend, the control socket, one status.

use std::sync::Arc;

use super::{BackendProcess, ControlClient, Frontend, FrontendOptions, GuestMem};

/// The backend with virtual endpoints 8 and 0x10, then `extra`.
pub fn backend(extra: &[&str]) -> BackendProcess {
    let mut args = vec!["--endpoint", "8", "--endpoint", "0x10"];
    args.extend_from_slice(extra);
    BackendProcess::spawn(&args).expect("backend starts")
}

pub fn connect(b: &BackendProcess) -> Frontend {
    connect_with(b, FrontendOptions::default())
}

pub fn connect_with(b: &BackendProcess, opts: FrontendOptions) -> Frontend {
    let mem = Arc::new(GuestMem::default_size().unwrap());
    Frontend::connect(&b.socket, mem, opts).expect("frontend sets up")
}

pub fn control(b: &BackendProcess) -> ControlClient {
    ControlClient::connect(&b.control).expect("control socket")
}

/// One request's status.
pub fn status<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32)) -> u8 {
    f.request_status(&req).expect("request answered")
}
