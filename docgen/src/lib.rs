//! The command definitions of every fleet program, and writing their man pages and shell
//! completions (see `main.rs`).

use clap::CommandFactory;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Every installed program with its clap command, as its binary builds it.
pub fn programs() -> Vec<clap::Command> {
    vec![
        imageserver::Args::command(),
        imagetool::args::Cli::command(),
        subd::Args::command(),
        dominator::commands::Cli::command(),
        mdb::cli::Cli::command(),
    ]
}

/// Where each shell looks for a program's completions, relative to the completions
/// directory (the Debian layout's last component: `bash/NAME`, `zsh/_NAME`, `fish/NAME.fish`).
pub fn completion_file(shell: Shell, program: &str) -> PathBuf {
    match shell {
        Shell::Zsh => PathBuf::from(format!("zsh/_{program}")),
        Shell::Fish => PathBuf::from(format!("fish/{program}.fish")),
        other => PathBuf::from(format!("{other}/{program}")),
    }
}

/// Writes `out/man/*.1` (one per program and per subcommand, recursively) and
/// `out/completions/…` for bash, zsh and fish; returns the files written.
pub fn write_all(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    for cmd in programs() {
        written.extend(write_man_pages(cmd.clone(), &man)?);
        let name = cmd.get_name().to_string();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let path = out.join("completions").join(completion_file(shell, &name));
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut file = std::fs::File::create(&path)?;
            clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut file);
            written.push(path);
        }
    }
    Ok(written)
}

/// The man page of `cmd` (`NAME.1`) and of each visible subcommand (`NAME-SUB.1`, and so
/// on down), the `help` subcommand clap adds left out.
fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let before: Vec<PathBuf> = list(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    Ok(list(dir)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect())
}

fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_page_per_program_and_subcommand_and_three_completions_each() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(dir.path()).unwrap();
        for page in [
            "imageserver.1",
            "subd.1",
            "dominator.1",
            "dominator-plan.1",
            "dominator-disable-updates.1",
            "dominator-make-certs.1",
            "imagetool.1",
            "imagetool-add.1",
            "imagetool-diff.1",
            "mdb.1",
            "mdb-set.1",
            "mdb-check.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join("man").join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
        assert!(!dir.path().join("man/mdb-help.1").exists());
        for p in ["imagetool", "mdb", "subd", "dominator", "imageserver"] {
            for f in [
                format!("bash/{p}"),
                format!("zsh/_{p}"),
                format!("fish/{p}.fish"),
            ] {
                let text = std::fs::read_to_string(dir.path().join("completions").join(&f))
                    .unwrap_or_else(|e| panic!("{f}: {e}"));
                assert!(text.contains(p), "{f} does not mention {p}");
            }
        }
        assert_eq!(
            written.len(),
            std::fs::read_dir(dir.path().join("man")).unwrap().count() + 15
        );
    }

    #[test]
    fn every_program_has_a_version() {
        for cmd in programs() {
            assert!(
                cmd.get_version().is_some(),
                "{} has no --version",
                cmd.get_name()
            );
        }
    }
}
