//! The one line a daemon prints on stderr once its listener is bound
//! (`imageserver: listening on 127.0.0.1:6971`), and its reader: how a program that
//! started a daemon on `--listen 127.0.0.1:0` learns the port it got, with no
//! bind-then-release race.

use std::net::SocketAddr;

/// The line `program` prints once it listens on `addr`.
pub fn line(program: &str, addr: SocketAddr) -> String {
    format!("{program}: listening on {addr}")
}

/// The address in `text` if it is `program`'s listening line (`line`).
pub fn parse(program: &str, text: &str) -> Option<SocketAddr> {
    text.trim_end()
        .strip_prefix(program)?
        .strip_prefix(": listening on ")?
        .parse()
        .ok()
}

/// The address in `text` if it is any program's listening line.
pub fn parse_any(text: &str) -> Option<SocketAddr> {
    let (program, _) = text.split_once(": listening on ")?;
    parse(program, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_line_reads_back_as_its_address() {
        let a: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        assert_eq!(line("subd", a), "subd: listening on 127.0.0.1:40123");
        assert_eq!(parse("subd", &format!("{}\n", line("subd", a))), Some(a));
        let v6: SocketAddr = "[::1]:6969".parse().unwrap();
        assert_eq!(parse("subd", &line("subd", v6)), Some(v6));
        assert_eq!(parse("imageserver", &line("subd", a)), None);
        assert_eq!(
            parse("subd", "2026-01-01T00:00:00Z INFO subd listening on 1"),
            None
        );
        assert_eq!(parse("subd", "subd: listening on nowhere"), None);
    }
}
