//! `docgen OUT_DIR`: writes the man page of every program and subcommand
//! (`OUT_DIR/man/PROGRAM[-SUB].1`, `clap_mangen`) and bash, zsh and fish completions
//! (`OUT_DIR/completions/{bash/PROGRAM, zsh/_PROGRAM, fish/PROGRAM.fish}`, `clap_complete`),
//! all from the programs' own clap definitions, so they cannot drift from `--help`.
//! Run at package-build time by `scripts/package.sh`; the programs themselves carry no
//! man-page code.

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: docgen OUT_DIR");
        return std::process::ExitCode::from(2);
    };
    match docgen::write_all(&out) {
        Ok(written) => {
            println!(
                "docgen: wrote {} files into {}",
                written.len(),
                out.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("docgen: writing into {}: {e}", out.display());
            std::process::ExitCode::from(1)
        }
    }
}
