//! Loopback addresses that fail in a known way, for tests of how clients name a failed
//! connection: a port nothing listens on (`ClosedPort`: refused) and one that never
//! answers (`Blackhole`: times out). Each holds its port while it lives, so no other
//! program can take it meanwhile.

use socket2::{Domain, Socket, Type};
use std::net::{SocketAddr, TcpStream};

fn bound_socket() -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&any.into()).expect("bind 127.0.0.1:0");
    s
}

fn local_addr(s: &Socket) -> SocketAddr {
    s.local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an IP address")
}

/// A loopback port bound but never listening: a connection to it is refused.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: Socket,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let s = bound_socket();
        ClosedPort {
            addr: local_addr(&s),
            _socket: s,
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// A loopback address whose accept queue is full and never drained: the kernel drops
/// every new SYN, so a connection attempt hangs until the client gives up, as with a
/// firewalled or vanished host (a routed blackhole such as a TEST-NET address depends on
/// the network the test runs in; this works on any Linux).
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: Socket,
    _queued: TcpStream,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        let l = bound_socket();
        // Backlog 0: one finished handshake fills the queue.
        l.listen(0).expect("listen");
        let addr = local_addr(&l);
        let queued = TcpStream::connect(addr).expect("filling the accept queue");
        Blackhole {
            addr,
            _listener: l,
            _queued: queued,
        }
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Blackhole::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::time::{Duration, Instant};

    #[test]
    fn a_closed_port_refuses_and_a_blackhole_never_answers() {
        let closed = ClosedPort::new();
        let e = TcpStream::connect(closed.addr).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

        let hole = Blackhole::new();
        let t0 = Instant::now();
        let e = TcpStream::connect_timeout(&hole.addr, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(250));
    }
}
