//! A thread per client-facing UDP socket: it waits for datagrams in `recvmmsg` without the
//! GIL (the socket is blocking; Python's own sends pass MSG_DONTWAIT), answers the
//! hits in batches, and queues the rest for Python, waking its event loop through a socket pair
//! (once per batch that Python has not yet been woken for).
//!
//! Taking turns (`Gate`): under load (a thread hands Python a datagram before Python took the
//! ones before), Python reads the sockets itself (`FastPath.poll`, from its event loop) until
//! they have been quiet for a while, and the threads stand aside. The event loop is awake
//! anyway; a thread reading beside it on the same core cost a miss about 1.4 context switches,
//! a sixth of its CPU. At a household's pace the threads read alone. A thread
//! standing aside still reads whatever waits every PARK, so a stuck event loop delays a hit by
//! that much at most.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::hits::{Hits, Miss, Outcome, Verdict, RCODE_REFUSED};
use crate::net;

/// The lock, even after a panic on another thread: what these mutexes hold (`Hits`, the turn,
/// a batch's buffers) has no invariant a half-done batch could break beyond one datagram's fate.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long a thread standing aside waits before it reads what Python left in its socket: the
/// most a stuck event loop delays a hit. Each look preempts the busy event loop on its core:
/// looking every 2 ms instead cost saturated misses about 5 % of their rate.
const PARK: Duration = Duration::from_millis(10);

/// Whose turn it is to read the sockets: the threads', or Python's (`python_reads`).
pub struct Gate {
    python_reads: Mutex<bool>,
    turn: Condvar,
}

impl Gate {
    pub fn new() -> Gate {
        Gate { python_reads: Mutex::new(false), turn: Condvar::new() }
    }

    /// Python reads from now on (a thread handed it a datagram under load); whether that is
    /// new (then Python must be woken to see it, even if woken for the datagrams already).
    pub fn hand_over(&self) -> bool {
        !std::mem::replace(&mut *lock(&self.python_reads), true)
    }

    /// The threads read again (Python found the sockets quiet).
    pub fn give_back(&self) {
        *lock(&self.python_reads) = false;
        self.turn.notify_all();
    }

    pub fn python_reads(&self) -> bool {
        *lock(&self.python_reads)
    }

    /// Wait while Python reads, at most PARK: whether the thread may wait in its receive
    /// (its turn), or should only take what is there (Python's turn, or stopping).
    fn wait_turn(&self, stopping: &AtomicBool) -> bool {
        let reads = lock(&self.python_reads);
        if !*reads {
            return true;
        }
        if stopping.load(Ordering::SeqCst) {
            return false;
        }
        let (reads, _) = self.turn.wait_timeout(reads, PARK)
            .unwrap_or_else(PoisonError::into_inner);
        !*reads
    }

    fn wake_all(&self) {
        let _reads = lock(&self.python_reads);
        self.turn.notify_all();
    }
}

/// A batch's buffers and tables, for Python's own reads (`FastPath.poll`).
pub struct Io {
    batch: net::Batch,
    sender: net::Sender,
    replies: Vec<(Vec<u8>, SocketAddr)>,
}

// SAFETY: the raw pointers in `Batch` and `Sender` point only into their own heap buffers,
// which move with them; nothing else holds them, and the mutex around `Io` lets one thread use
// them at a time.
unsafe impl Send for Io {}

impl Io {
    pub fn new() -> Io {
        Io { batch: net::Batch::new(), sender: net::Sender::new(), replies: Vec::new() }
    }

    /// Read what waits on `fd` now, without waiting: hits answered, the rest queued for
    /// Python. How many datagrams were read, and whether Python has something to take.
    pub fn poll(&mut self, hits: &Mutex<Hits>, listener: usize, fd: RawFd)
                -> io::Result<(usize, bool)> {
        let got = self.batch.receive(fd, false)?;
        if got == 0 {
            return Ok((0, false));
        }
        let handled = handle(hits, listener, &self.batch, got, &mut self.replies);
        self.sender.send_all(fd, &self.replies[..handled.answers]);
        Ok((got, handled.pending))
    }
}

pub struct Reader {
    pub fd: RawFd, // our own descriptor of the socket (net::own_blocking)
    stopping: Arc<AtomicBool>,
    gate: Arc<Gate>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Start reading the blocking UDP socket `fd` (the caller may close its own descriptor
    /// once `stop` returned; the thread reads a duplicate).
    pub fn start(hits: Arc<Mutex<Hits>>, gate: Arc<Gate>, listener: usize, fd: RawFd,
                 wake: UnixStream) -> io::Result<Reader> {
        let own = net::own_blocking(fd)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let turns = gate.clone();
        let spawned = thread::Builder::new()
            .name(format!("dnsproxy-udp{listener}"))
            .spawn(move || serve(&hits, &turns, listener, own, &flag, &wake));
        match spawned {
            Ok(thread) => Ok(Reader { fd: own, stopping, gate, thread: Some(thread) }),
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
            self.gate.wake_all();
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

fn serve(hits: &Mutex<Hits>, gate: &Gate, listener: usize, fd: RawFd, stopping: &AtomicBool,
         wake: &UnixStream) {
    let mut batch = net::Batch::new();
    let mut sender = net::Sender::new();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    let mut park = false; // in Python's turn, the socket was found empty: wait before a look
    while !stopping.load(Ordering::SeqCst) {
        // The threads' turn: wait in the receive. Python's: only take what is there.
        let wait = if park { gate.wait_turn(stopping) } else { !gate.python_reads() };
        let got = match batch.receive(fd, wait) {
            Ok(got) => got,
            // Our own descriptor stays open until this thread ends; were it ever bad, reading
            // on would spin, so end instead.
            Err(err) if err.raw_os_error() == Some(libc::EBADF) => return,
            Err(_) => continue, // an ICMP error queued on the socket: read on
        };
        park = !wait && got < net::BATCH;
        if got == 0 || stopping.load(Ordering::SeqCst) {
            if wait && got == 0 {
                // Nothing, though it was to wait: an interruption, the stop, or a socket made
                // non-blocking (watching it from an event loop does that). Never spin.
                net::wait_readable(fd, 100);
            }
            continue;
        }
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            handle(hits, listener, &batch, got, &mut replies)
        }));
        match outcome {
            Ok(Handled { answers, busy, mut wake_python, .. }) => {
                // The replies first: a woken event loop may take this core before they are out.
                sender.send_all(fd, &replies[..answers]);
                if busy {
                    // Python reads from now on, while it is awake anyway. A loop that took the
                    // batch before this could have missed the turn: wake it to see it.
                    wake_python |= gate.hand_over();
                }
                if wake_python {
                    let _ = (&*wake).write(&[1]); // full: Python is woken already
                }
            }
            Err(_) => lock(hits).faults += 1, // a bug: this batch is lost, not the thread
        }
    }
}

/// What `handle` did with a batch: how many replies it put at the front of `replies`, whether
/// it queued a datagram for Python before Python took the ones queued earlier (Python is busy:
/// load), whether Python must be woken (for those or a refresh), and whether anything waits
/// for it.
struct Handled {
    answers: usize,
    busy: bool,
    wake_python: bool,
    pending: bool, // Python has datagrams or refreshes to take
}

/// Decide a batch under the lock: the hits' replies go to the front of `replies`.
fn handle(hits: &Mutex<Hits>, listener: usize, batch: &net::Batch, got: usize,
          replies: &mut Vec<(Vec<u8>, SocketAddr)>) -> Handled {
    let now = net::monotonic();
    let mut answers = 0;
    let mut wake_python = false;
    let mut busy = false;
    let mut hits = lock(hits);
    // Load: datagrams for Python while it has not taken the ones of an earlier batch (two of
    // one batch, a stub's A and AAAA, are not).
    let behind = hits.woken;
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
                busy |= behind;
                wake_python |= hits.hand_on(miss);
            }
        }
    }
    Handled { answers, busy, wake_python, pending: hits.woken }
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
