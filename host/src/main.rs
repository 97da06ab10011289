use clap::Parser;
use std::process::ExitCode;
use trellis::cli::{Cli, init_tracing, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    run(cli)
}
