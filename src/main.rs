use std::process::ExitCode;

use clap::Parser;

use vhost_device_iommu::args::{capabilities, Args};
use vhost_device_iommu::server;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if args.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    let result = args
        .options()
        .map_err(|e| e.to_string())
        .and_then(|o| server::run(o).map_err(|e| e.to_string()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-device-iommu: {e}");
            ExitCode::FAILURE
        }
    }
}
