//! A thread per client-facing UDP socket: it waits for datagrams in `recvmmsg` without the
//! GIL (the socket is blocking; Python's own sends pass MSG_DONTWAIT), answers the
//! hits in batches, and queues the rest for Python, waking its event loop through a socket pair
//! (once per batch that Python has not yet been woken for). Hits never wait for Python: a
//! busy event loop (a burst of misses, a reload) delays only what it must answer itself.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use crate::hits::{Hits, Miss, Outcome, Verdict, RCODE_REFUSED};
use crate::net;

/// The lock, even after a panic on another thread: `Hits` holds no invariant a half-done batch
/// could break beyond one datagram's fate.
pub fn lock(hits: &Mutex<Hits>) -> MutexGuard<'_, Hits> {
    hits.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct Reader {
    fd: RawFd, // our own descriptor of the socket (net::own_blocking)
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Start reading the blocking UDP socket `fd` (the caller may close its own descriptor
    /// once `stop` returned; the thread reads a duplicate).
    pub fn start(hits: Arc<Mutex<Hits>>, listener: usize, fd: RawFd,
                 wake: UnixStream) -> io::Result<Reader> {
        let own = net::own_blocking(fd)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let spawned = thread::Builder::new()
            .name(format!("dnsproxy-udp{listener}"))
            .spawn(move || serve(&hits, listener, own, &flag, &wake));
        match spawned {
            Ok(thread) => Ok(Reader { fd: own, stopping, thread: Some(thread) }),
            Err(err) => {
                net::close(own);
                Err(err)
            }
        }
    }

    /// Stop the thread and wait for it: after this, it never touches the socket again.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stopping.store(true, Ordering::SeqCst);
            net::wake_reader(self.fd);
            let _ = thread.join();
            net::close(self.fd);
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(hits: &Mutex<Hits>, listener: usize, fd: RawFd, stopping: &AtomicBool,
         wake: &UnixStream) {
    let mut batch = net::Batch::new();
    let mut sender = net::Sender::new();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    while !stopping.load(Ordering::SeqCst) {
        let got = match batch.receive(fd) {
            Ok(got) => got,
            // Our own descriptor stays open until this thread ends; were it ever bad, reading
            // on would spin, so end instead.
            Err(err) if err.raw_os_error() == Some(libc::EBADF) => return,
            Err(_) => continue, // an ICMP error queued on the socket: read on
        };
        if got == 0 || stopping.load(Ordering::SeqCst) {
            continue;
        }
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            handle(hits, listener, &batch, got, &mut replies)
        }));
        match outcome {
            Ok((answers, wake_python)) => {
                // The replies first: a woken event loop may take this core before they are out.
                sender.send_all(fd, &replies[..answers]);
                if wake_python {
                    let _ = (&*wake).write(&[1]); // full: Python is woken already
                }
            }
            Err(_) => lock(hits).faults += 1, // a bug: this batch is lost, not the thread
        }
    }
}

/// Decide a batch under the lock: the hits' replies go to the front of `replies`, (how many,
/// whether Python must be woken) comes back.
fn handle(hits: &Mutex<Hits>, listener: usize, batch: &net::Batch, got: usize,
          replies: &mut Vec<(Vec<u8>, SocketAddr)>) -> (usize, bool) {
    let now = net::monotonic();
    let mut answers = 0;
    let mut wake_python = false;
    let mut hits = lock(hits);
    for i in 0..got {
        let source = match batch.source(i) {
            Some(source) => source,
            None => continue,
        };
        if batch.truncated[i] {
            continue; // longer than any query we take: nothing to answer
        }
        let data = batch.datagram(i);
        if replies.len() == answers {
            replies.push((Vec::with_capacity(512), source));
        }
        let (out, destination) = &mut replies[answers];
        match hits.decide(data, &source, now, out) {
            Verdict::Answered { rcode, outcome, wake } => {
                *destination = source;
                hits.note(now, source, data, rcode, outcome);
                wake_python |= wake;
                answers += 1;
            }
            Verdict::Limited => hits.note(now, source, data, RCODE_REFUSED, Outcome::Limited),
            Verdict::Python(rate) => {
                let miss = Miss { listener, data: data.to_vec(), source, rate };
                wake_python |= hits.hand_on(miss);
            }
        }
    }
    (answers, wake_python)
}

/// Empty the wake-up socket's buffer (non-blocking), before Python takes what is pending.
pub fn drain_wakeups(wake: &UnixStream) {
    let mut buf = [0u8; 256];
    while let Ok(n) = (&*wake).read(&mut buf) {
        if n < buf.len() {
            break;
        }
    }
}
