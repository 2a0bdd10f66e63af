//! `creditgate-reports`: reports on a store of 1M ledger entries against
//! proxy p99 (see [`creditgate_bench::reports`] and bench/README.md).

use std::process::ExitCode;

use clap::Parser;
use creditgate_bench::reports::{self, ReportArgs};

#[tokio::main]
async fn main() -> ExitCode {
    match reports::run(ReportArgs::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("creditgate-reports: {error:#}");
            ExitCode::FAILURE
        }
    }
}
