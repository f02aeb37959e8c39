// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Write the man page, generated from the command line's clap definitions:
//!
//!   cargo run --example man > vhost-device-iommu.1 && man ./vhost-device-iommu.1

use clap::CommandFactory;
use vhost_device_iommu::args::Args;

fn main() -> std::io::Result<()> {
    let cmd = Args::command().name("vhost-device-iommu");
    clap_mangen::Man::new(cmd).render(&mut std::io::stdout())
}
