//! Free TCP ports on the loopback interface.
//!
//! [`free_port`] is inherently racy (another process may take the port between our drop and the
//! child's bind); fixtures that spawn a server on such a port retry with a new one when the bind fails.

use std::net::{Ipv4Addr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago: bind port 0, read the port, drop the socket.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// The first of `n` consecutive free ports (a launcher numbers its nodes from one base port).
pub fn free_port_run(n: u16) -> u16 {
    loop {
        let p = free_port();
        if p.checked_add(n).is_none() {
            continue;
        }
        let all_free = (p..p + n)
            .all(|q| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, q)).is_ok());
        if all_free {
            return p;
        }
    }
}
