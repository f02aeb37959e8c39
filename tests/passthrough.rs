// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The passthrough deployment (spec-notes/passthrough.md): QEMU binds a
//! VFIO cdev to an iommufd a launcher opened and passes to both processes;
//! the backend takes the same open cdev as `--endpoint ID,vfio-bound-fd=N`
//! with `--iommufd-fd`, never binds it, and attaches last.
//!
//! What runs here needs no VFIO device: the options. The kernel tier runs
//! the rest inside its guest (`qemu_standin_*`, ignored here), with a
//! stand-in that issues QEMU 11's iommufd calls on the shared fds.

mod support;

use std::time::Duration;

use support::process::run_to_exit;

/// A bound cdev lives in the VMM's iommufd: without `--iommufd-fd` the
/// backend would open its own /dev/iommu, where the device does not exist.
#[test]
fn a_vmm_bound_cdev_needs_the_vmms_iommufd() {
    let (st, _out, err) = run_to_exit(
        &[
            "--socket-path",
            "{dir}/v.sock",
            "--endpoint",
            "1,vfio-bound-fd=900",
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    let want = "endpoint 0x1: vfio-bound-fd needs --iommufd-fd (the iommufd the VMM binds it to)";
    assert!(err.contains(want), "stderr {err:?} lacks {want:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
}

/// A bound cdev is an inherited fd like the others: checked open and named
/// once before the daemon owns it.
#[test]
fn a_vmm_bound_cdev_fd_is_checked_like_every_inherited_fd() {
    let t = Duration::from_secs(10);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--endpoint", "1,vfio-bound-fd=7", "--iommufd-fd", "7"],
            "fd 7 is named twice: --iommufd-fd 7 and endpoint 0x1: vfio-bound-fd=7",
        ),
        (
            &["--endpoint", "2,vfio-bound-fd=900", "--iommufd-fd", "901"],
            "is not an open file descriptor",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--socket-path", "{dir}/v.sock"];
        args.extend_from_slice(extra);
        let (st, _out, err) = run_to_exit(&args, t).unwrap();
        assert_eq!(st.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(want),
            "{args:?}: stderr {err:?} lacks {want:?}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err:?}");
    }
}
