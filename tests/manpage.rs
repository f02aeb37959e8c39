// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The man page is generated from the command line's clap definitions
//! (`cargo run --example man`): it renders, and names every option but
//! the hidden, test-only ones (`--test-fault-socket`), which it must not.

use clap::CommandFactory;
use vhost_device_iommu::args::Args;

#[test]
fn man_page_names_every_option() {
    let cmd = Args::command().name("vhost-device-iommu");
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out).unwrap();
    let page = String::from_utf8(out).unwrap().replace("\\-", "-");
    assert!(page.starts_with(".ie") && page.contains(".TH vhost-device-iommu 1"));
    for a in cmd.get_arguments() {
        if let Some(long) = a.get_long() {
            let named = page.contains(&format!("--{long}"));
            if a.is_hide_set() {
                assert!(!named, "hidden --{long} in the man page");
            } else {
                assert!(named, "--{long} missing");
            }
        }
    }
    assert!(page.contains("viot"), "the viot subcommand is listed");
}
