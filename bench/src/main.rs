//! `creditgate-load`: drives real creditgate processes against the mock
//! upstream, measures them against baselines in the same run, and audits the
//! books (see the library's module map and bench/README.md).

use std::process::ExitCode;

use clap::Parser;
use creditgate_bench::harness;
use creditgate_bench::settings::{Args, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = match Settings::from_args(args) {
        Ok(settings) => harness::run(settings).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("creditgate-load: {error:#}");
            ExitCode::FAILURE
        }
    }
}
