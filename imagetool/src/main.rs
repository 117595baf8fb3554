//! `imagetool`: parses the command line (accepting Dominator's single-dash server flags),
//! sets up logging, runs the command and turns the outcome into an exit code
//! (0 success, 1 failure with one line on stderr, 2 usage).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    disk::report::init_logging("warn");
    let argv = imagetool::args::rewrite_dominator_flags(std::env::args_os().collect());
    let cli = imagetool::args::Cli::parse_from(argv);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imagetool: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(imagetool::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("imagetool: {}", disk::report::error_line(&e));
            ExitCode::from(1)
        }
    }
}
