//! `dnsproxy-bind [--listen HOST:PORT]... COMMAND [ARG]...`: bind the forwarder's UDP and TCP
//! sockets, then become COMMAND (exec), handing them over the way systemd's socket activation
//! does (descriptors from 3 on, `LISTEN_FDS`, `LISTEN_PID`).
//!
//! Why: Python takes a tenth of a second or more to start. A restarted forwarder that binds
//! only then refuses every query meanwhile (the port is closed); bound here, within a
//! millisecond of the exec, those queries wait in the kernel's buffers and are answered once
//! Python reads them. The forwarder (dnsproxy/listen.py) adopts the sockets whose addresses it
//! is configured with and binds any others itself, so a launcher that binds too little or too
//! much costs time, never correctness: an address it cannot bind is left to the forwarder
//! (which then reports it), with a warning here, and the command runs all the same.
//!
//! The addresses: each `--listen` given to the launcher, else those of `DNSPROXY_LISTEN` (the
//! forwarder's own variable: commas or spaces between them), an entry it cannot read left to
//! the forwarder. With none, the command runs with the environment untouched. The options
//! match listen.py: IPv6 sockets are IPv6 only, TCP reuses the address and listens with a
//! backlog of 512.

use std::env;
use std::ffi::{CString, OsString};
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::io::RawFd;
use std::process;

#[path = "../sockaddr.rs"]
#[allow(dead_code)] // from_storage: the hit path's
mod sockaddr;

const FIRST_FD: RawFd = 3; // SD_LISTEN_FDS_START
const BACKLOG: libc::c_int = 512;
const EXIT_USAGE: i32 = 2;

fn fail(code: i32, message: &str) -> ! {
    eprintln!("dnsproxy-bind: {message}");
    process::exit(code);
}

/// `HOST:PORT` as the forwarder writes it: IPv6 in brackets.
fn parse_address(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse::<SocketAddr>().map_err(|_| {
        format!("listen address {text:?}: expected IP:PORT, IPv6 as [addr]:port")
    })
}

/// (addresses, the command and its arguments) from our own arguments.
fn parse_args(args: Vec<OsString>) -> Result<(Vec<SocketAddr>, Vec<OsString>), String> {
    let mut addresses = Vec::new();
    let mut rest = args.into_iter();
    let mut command = Vec::new();
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy().into_owned();
        if text == "--" {
            break;
        } else if text == "--listen" {
            let value = rest.next().ok_or("--listen needs HOST:PORT")?;
            addresses.push(parse_address(&value.to_string_lossy())?);
        } else if let Some(value) = text.strip_prefix("--listen=") {
            addresses.push(parse_address(value)?);
        } else if text.starts_with('-') {
            return Err(format!("unknown option {text}"));
        } else {
            command.push(arg);
            break;
        }
    }
    command.extend(rest);
    if command.is_empty() {
        return Err("usage: dnsproxy-bind [--listen HOST:PORT]... COMMAND [ARG]...".into());
    }
    if addresses.is_empty() {
        let listed = env::var("DNSPROXY_LISTEN").unwrap_or_default();
        let items = listed.split(|c: char| c == ',' || c.is_whitespace());
        for item in items.filter(|item| !item.is_empty()) {
            match parse_address(item) {
                Ok(address) => addresses.push(address),
                Err(message) => eprintln!("dnsproxy-bind: warning: DNSPROXY_LISTEN: {message}; \
                                           left to the command"),
            }
        }
    }
    Ok((addresses, command))
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn set_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `on` outlives the call and `size` is its size.
    check(unsafe { libc::setsockopt(fd, level, name, &on as *const _ as *const _, size) })
        .map(drop)
}

/// One bound socket (listening, for TCP), close-on-exec for now.
fn bind(address: &SocketAddr, kind: libc::c_int) -> io::Result<RawFd> {
    let family = if address.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: a plain system call; the descriptor is ours.
    let fd = check(unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) })?;
    let bound = (|| {
        if kind == libc::SOCK_STREAM {
            set_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
        }
        if address.is_ipv6() {
            set_option(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
        }
        let (storage, length) = sockaddr::to_storage(address);
        // SAFETY: storage holds a valid address of `length` bytes.
        check(unsafe { libc::bind(fd, &storage as *const _ as *const libc::sockaddr, length) })?;
        if kind == libc::SOCK_STREAM {
            // SAFETY: a plain system call on our descriptor.
            check(unsafe { libc::listen(fd, BACKLOG) })?;
        }
        Ok(())
    })();
    match bound {
        Ok(()) => Ok(fd),
        Err(err) => {
            // SAFETY: our descriptor, closed once.
            unsafe { libc::close(fd) };
            Err(err)
        }
    }
}

/// Every address's UDP and TCP socket that could be bound (the forwarder matches them by what
/// they are, not by position); the others are the forwarder's to bind, or to report.
fn bind_all(addresses: &[SocketAddr]) -> Vec<RawFd> {
    let mut fds = Vec::new();
    for address in addresses {
        for (kind, name) in [(libc::SOCK_DGRAM, "UDP"), (libc::SOCK_STREAM, "TCP")] {
            match bind(address, kind) {
                Ok(fd) => fds.push(fd),
                Err(err) => eprintln!("dnsproxy-bind: warning: {name} {address} left to the \
                                       command: {err}"),
            }
        }
    }
    fds
}

/// Renumber `fds` to 3, 4, ... without close-on-exec, as the protocol has them (whatever
/// held those numbers before is closed, as systemd does). On an error every socket is left
/// close-on-exec: the command then binds its addresses itself.
fn hand_over(fds: &[RawFd]) -> io::Result<()> {
    // First out of the way (above any target number), then into place: a socket may sit on
    // another's target number.
    let top = FIRST_FD + fds.len() as RawFd;
    let mut moved = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: plain descriptor calls on our own descriptors.
        moved.push(check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, top) })?);
        unsafe { libc::close(fd) };
    }
    for (index, &fd) in moved.iter().enumerate() {
        let target = FIRST_FD + index as RawFd;
        // SAFETY: as above; dup2 leaves the new descriptor without close-on-exec.
        if let Err(err) = check(unsafe { libc::dup2(fd, target) }) {
            for placed in FIRST_FD..target {
                unsafe { libc::fcntl(placed, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            return Err(err);
        }
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn main() {
    let (addresses, command) = match parse_args(env::args_os().skip(1).collect()) {
        Ok(parsed) => parsed,
        Err(message) => fail(EXIT_USAGE, &message),
    };
    let fds = bind_all(&addresses);
    if !addresses.is_empty() {
        pass_on(&fds);
    }
    exec(&command);
}

/// Put the sockets in place and say so in the protocol's variables (or say nothing).
fn pass_on(fds: &[RawFd]) {
    env::remove_var("LISTEN_FDNAMES");
    match hand_over(fds) {
        Ok(()) => {
            env::set_var("LISTEN_FDS", fds.len().to_string());
            env::set_var("LISTEN_PID", process::id().to_string());
        }
        Err(err) => {
            eprintln!("dnsproxy-bind: warning: the sockets are left to the command: {err}");
            env::remove_var("LISTEN_FDS");
            env::remove_var("LISTEN_PID");
        }
    }
}

fn exec(command: &[OsString]) -> ! {
    let argv: Vec<CString> = command
        .iter()
        .map(|arg| CString::new(arg.clone().into_vec()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|_| fail(EXIT_USAGE, "an argument holds a NUL byte"));
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|arg| arg.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a null-terminated array that outlive the call.
    unsafe { libc::execvp(argv[0].as_ptr(), pointers.as_ptr()) };
    let err = io::Error::last_os_error();
    fail(127, &format!("cannot run {}: {err}", command[0].to_string_lossy()));
}
