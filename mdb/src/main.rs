//! The `mdb` binary: parses arguments and runs `mdb::cli`; exit 1 on failure, 2 on usage.

use clap::Parser;

fn main() -> std::process::ExitCode {
    disk::report::init_logging("error");
    let cli = mdb::cli::Cli::parse();
    let mut out = std::io::stdout().lock();
    match mdb::cli::run(cli, &mut out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mdb: {}", disk::report::error_line(&e));
            std::process::ExitCode::from(1)
        }
    }
}
