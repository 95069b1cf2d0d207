//! Batched datagram I/O on a UDP socket the Python side owns: `recvmmsg` (where the reader
//! thread waits), `sendmmsg`, the descriptor calls around them, and the monotonic clock. The `unsafe` of
//! the crate is here, in the system calls, and in sockaddr.rs; what the datagrams hold is read
//! in safe code (wire.rs).

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::unix::io::RawFd;

use crate::sockaddr::{from_storage, to_storage};

pub const BATCH: usize = 64;
pub const MAX_DATAGRAM: usize = 4096; // a client's query is far smaller; longer ones truncate

/// Receive buffers, address storage and the system call's tables for one batch, set up once
/// and reused for every call. The tables point into the other buffers' heap storage, which
/// never moves (none of the vectors grows), so a `Batch` stays valid wherever it is moved;
/// it holds raw pointers and so stays on the thread that made it.
pub struct Batch {
    data: Vec<[u8; MAX_DATAGRAM]>,
    pub lengths: [usize; BATCH],
    pub truncated: [bool; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    pub fn new() -> Batch {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let (zero_addr, zero_iovec, zero_header) = unsafe {
            (mem::zeroed::<libc::sockaddr_storage>(), mem::zeroed::<libc::iovec>(),
             mem::zeroed::<libc::mmsghdr>())
        };
        let mut batch = Batch {
            data: vec![[0u8; MAX_DATAGRAM]; BATCH],
            lengths: [0; BATCH],
            truncated: [false; BATCH],
            addrs: vec![zero_addr; BATCH],
            iovecs: vec![zero_iovec; BATCH],
            headers: vec![zero_header; BATCH],
        };
        for i in 0..BATCH {
            batch.iovecs[i].iov_base = batch.data[i].as_mut_ptr() as *mut libc::c_void;
            batch.iovecs[i].iov_len = MAX_DATAGRAM;
            let header = &mut batch.headers[i].msg_hdr;
            header.msg_name = &mut batch.addrs[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
            header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_iov = &mut batch.iovecs[i] as *mut libc::iovec;
            header.msg_iovlen = 1;
        }
        batch
    }

    /// Up to BATCH datagrams; with `wait`, waiting for the first (`fd` is a blocking
    /// socket): one system call per batch, where poll and a non-blocking receive would take
    /// two. 0 when interrupted or (without `wait`) none is there; after `wake_reader`, it
    /// returns at once (with empty datagrams).
    pub fn receive(&mut self, fd: RawFd, wait: bool) -> io::Result<usize> {
        let flags = if wait { libc::MSG_WAITFORONE } else { libc::MSG_DONTWAIT };
        // SAFETY: every header points into self's buffers, alive and unmoved for the call; the
        // kernel writes at most the lengths given.
        let got = unsafe {
            libc::recvmmsg(fd, self.headers.as_mut_ptr(), BATCH as libc::c_uint, flags,
                           std::ptr::null_mut())
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let got = got as usize;
        for i in 0..got {
            let header = &mut self.headers[i];
            self.lengths[i] = (header.msg_len as usize).min(MAX_DATAGRAM);
            self.truncated[i] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // The kernel shortened it to the source's size; the next call needs it whole.
            header.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        Ok(got)
    }

    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        from_storage(&self.addrs[i])
    }

    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.data[i][..self.lengths[i]]
    }
}

/// A descriptor of our own for the socket `fd`, blocking, so that the reader thread's wait
/// never depends on the caller's descriptor (closed or reused later).
pub fn own_blocking(fd: RawFd) -> io::Result<RawFd> {
    // SAFETY: plain descriptor calls; a bad fd is an error, not undefined behaviour.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput,
                                      "the socket must be blocking (its sends pass MSG_DONTWAIT)"));
        }
        let own = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if own < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(own)
    }
}

/// Wait until `fd` is readable (or shut down), at most `ms` milliseconds: for a socket that
/// someone made non-blocking, where `receive` would not wait.
pub fn wait_readable(fd: RawFd, ms: i32) {
    let mut entry = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd for the call.
    unsafe { libc::poll(&mut entry, 1, ms) };
}

/// Wake a thread blocked in `receive` on `fd`: shutting the socket's reading side down makes
/// the receive return (a UDP socket still takes datagrams; it is about to close anyway).
pub fn wake_reader(fd: RawFd) {
    // SAFETY: plain descriptor call; errors (ENOTCONN for UDP, which still wakes) ignored.
    unsafe { libc::shutdown(fd, libc::SHUT_RD) };
}

pub fn close(fd: RawFd) {
    // SAFETY: `fd` is ours (own_blocking) and closed once, after its thread ended.
    unsafe { libc::close(fd) };
}

/// Python's `time.monotonic()`: the clock the cache stamps its entries with.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a live timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The tables of `sendmmsg`, kept between calls so that a batch allocates nothing.
pub struct Sender {
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Sender {
    pub fn new() -> Sender {
        Sender {
            addrs: Vec::with_capacity(BATCH),
            iovecs: Vec::with_capacity(BATCH),
            headers: Vec::with_capacity(BATCH),
        }
    }

    /// Send every (reply, destination) in as few `sendmmsg` calls as the kernel takes; a reply
    /// the socket cannot take now (a full buffer) is dropped, as a UDP send that would block is.
    pub fn send_all(&mut self, fd: RawFd, replies: &[(Vec<u8>, SocketAddr)]) -> usize {
        let mut sent = 0;
        for chunk in replies.chunks(BATCH) {
            self.addrs.clear();
            self.iovecs.clear();
            self.headers.clear();
            for (data, addr) in chunk {
                self.addrs.push(to_storage(addr));
                self.iovecs.push(libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                });
            }
            for i in 0..chunk.len() {
                // SAFETY: all-zero is a valid mmsghdr.
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                header.msg_hdr.msg_name =
                    &mut self.addrs[i].0 as *mut libc::sockaddr_storage as *mut libc::c_void;
                header.msg_hdr.msg_namelen = self.addrs[i].1;
                header.msg_hdr.msg_iov = &mut self.iovecs[i] as *mut libc::iovec;
                header.msg_hdr.msg_iovlen = 1;
                self.headers.push(header);
            }
            let mut start = 0;
            while start < chunk.len() {
                // SAFETY: the headers point into addrs, iovecs (not resized since) and the
                // replies, all alive for the call.
                let done = unsafe {
                    libc::sendmmsg(fd, self.headers[start..].as_mut_ptr(),
                                   (chunk.len() - start) as libc::c_uint, libc::MSG_DONTWAIT)
                };
                if done <= 0 {
                    let err = io::Error::last_os_error();
                    if done < 0 && err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    start += 1; // this one cannot go (full buffer, unreachable): drop it, go on
                    continue;
                }
                sent += done as usize;
                start += done as usize;
            }
        }
        sent
    }
}
