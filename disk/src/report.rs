//! What a program prints on stderr: an error and its chain of causes as one line, the exit
//! code for an outcome, and the log lines (`init_logging`).

use std::error::Error;

/// `e` and each cause, joined by `: `, skipping a cause whose text the line already holds
/// (error types that embed their source in their own message), on one line.
pub fn error_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.replace('\n', " ")
}

/// The exit code for a program's outcome, printing a failure as `PROGRAM: one line`.
/// Takes any error that can be seen as `dyn Error` (a library error, or `anyhow::Error` in a
/// `main`), so this library needs no `anyhow`.
pub fn exit_code<E: AsRef<dyn Error>>(
    program: &str,
    outcome: Result<(), E>,
) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", error_line(e.as_ref()));
            std::process::ExitCode::from(1)
        }
    }
}

/// Sends `tracing` events to stderr, filtered by `RUST_LOG`, or at `default_level` (e.g.
/// `"info"`) when `RUST_LOG` is unset or unreadable; ANSI colours only when stderr is a
/// terminal (never in a log file). Call once, first thing in `main`.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = crate::fsutil::LockError::Io {
            path: "/x/lock".into(),
            source: io,
        };
        let wrapped = anyhow::Error::new(e).context("starting subd");
        assert_eq!(
            error_line(wrapped.as_ref()),
            "starting subd: locking /x/lock: No such file"
        );
        let plain = anyhow::anyhow!("a\nb").context("c");
        assert_eq!(error_line(plain.as_ref()), "c: a b");
    }
}
