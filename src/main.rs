// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use std::io::{self, IsTerminal};
use std::process::ExitCode;

use clap::Parser;

use vhost_device_iommu::args::{capabilities, Args, Command};
use vhost_device_iommu::server;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if let Some(Command::Viot(viot)) = &args.command {
        let stdout = io::stdout();
        let is_terminal = stdout.is_terminal();
        return report(
            viot.run(&mut stdout.lock(), is_terminal)
                .map_err(|e| e.to_string()),
        );
    }
    if args.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    let result = args
        .options()
        .map_err(|e| e.to_string())
        .and_then(|o| server::run(o).map_err(|e| e.to_string()));
    report(result)
}

/// One line naming the cause on stderr, exit status 1.
fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-device-iommu: {e}");
            ExitCode::FAILURE
        }
    }
}
