//! `dnsproxy._native`: the UDP cache-hit path in compiled code (issue #22).
//!
//! `FastPath` reads each client-facing UDP socket on a thread of its own (reader.rs), in
//! batches (`recvmmsg`), answers cache hits from a mirror of the Python cache's entries
//! (`sendmmsg`; an entry near or past its expiry too, asking Python's cache stage to refresh
//! it), applies the access list and the per-client rate limit (hits.rs), and hands every other
//! datagram to the Python pipeline with the client's address, waking the event loop through a
//! socket Python reads. Python stays the owner of the cache: it puts an entry here
//! when it stores one (`offer`: a bounded number wait for their first hit), answers a hit
//! from one, or refreshes one (only replies the defences verified ever reach its cache), and
//! removes, clears or purges here whatever it drops there. What happened to the hits (their keys, for
//! the LRU order; records for the query log; counts) is taken by Python in batches.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyKeyError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

mod hits;
mod net;
mod reader;
mod sockaddr;
mod wire;

use hits::{Hits, Network, Outcome, Verdict, RCODE_REFUSED};
use reader::{lock, Gate, Io, Reader};

/// Keys for Python: a list of bytes.
fn key_list(py: Python<'_>, keys: Vec<Vec<u8>>) -> PyResult<&PyList> {
    let list = PyList::empty(py);
    for key in keys {
        list.append(PyBytes::new(py, &key))?;
    }
    Ok(list)
}

fn parse_networks(networks: Vec<(Vec<u8>, u8)>) -> PyResult<Vec<Network>> {
    networks
        .iter()
        .map(|(packed, prefix)| {
            Network::new(packed, *prefix).ok_or_else(|| PyValueError::new_err("not a network"))
        })
        .collect()
}

fn os_error(err: io::Error) -> PyErr {
    PyOSError::new_err(err.to_string())
}

/// Copies of new entries that wait for their first hit, at most: a household's new names of
/// a few hours. Each costs about 450 bytes; with 100k names cached the forwarder measured
/// 61.9 MB at 1024, 62.4 MB at 2048 and 63.1 MB at 4096 (the benchmark's target: 64 MB).
const EAGER_COPIES: usize = 2048;

#[pyclass(module = "dnsproxy._native")]
pub struct FastPath {
    hits: Arc<Mutex<Hits>>,
    /// Readable when datagrams wait for Python (`wakeup_fd`, `pending`).
    woken: UnixStream,
    wake: UnixStream,
    readers: Vec<(usize, Reader)>,
    next_listener: usize,
    gate: Arc<Gate>,
    io: Mutex<Io>,
    /// How many of `offer`'s copies wait for their first hit (EAGER_COPIES unless set).
    #[pyo3(get, set)]
    eager: usize,
}

#[pymethods]
impl FastPath {
    /// `networks`: the access list as (packed address, prefix length); `rate`, `burst`: the
    /// per-client limit (rate 0: none); `prefetch_at`: the share of a TTL after which a hit
    /// asks Python for a prefetch; `record`: keep a record per hit for the query log.
    #[new]
    fn new(networks: Vec<(Vec<u8>, u8)>, rate: f64, burst: f64, prefetch_at: f64,
           record: bool) -> PyResult<Self> {
        let hits = Hits::new(parse_networks(networks)?, rate, burst, prefetch_at, record);
        let (woken, wake) = UnixStream::pair().map_err(os_error)?;
        woken.set_nonblocking(true).map_err(os_error)?;
        wake.set_nonblocking(true).map_err(os_error)?;
        Ok(FastPath {
            hits: Arc::new(Mutex::new(hits)),
            woken,
            wake,
            readers: Vec::new(),
            next_listener: 0,
            gate: Arc::new(Gate::new()),
            io: Mutex::new(Io::new()),
            eager: EAGER_COPIES,
        })
    }

    /// Answer `key` from this entry (`wire.CachedReply`'s stamped bytes, copied); False if its
    /// layout is unreadable.
    fn put(&self, key: &[u8], entry: &[u8]) -> bool {
        lock(&self.hits).put(key.to_vec(), entry)
    }

    /// A newly stored entry (`put`'s terms), its first hit to be answered here: at most
    /// `eager` such copies wait for it, the oldest making way (False: `eager` is 0).
    fn offer(&self, key: &[u8], entry: &[u8]) -> bool {
        lock(&self.hits).offer(key.to_vec(), entry, self.eager)
    }

    fn remove(&self, key: &[u8]) {
        lock(&self.hits).remove(key);
    }

    fn clear(&self) {
        lock(&self.hits).clear();
    }

    fn __len__(&self) -> usize {
        lock(&self.hits).len()
    }

    #[getter]
    fn get_record(&self) -> bool {
        lock(&self.hits).record
    }

    #[setter]
    fn set_record(&self, record: bool) {
        lock(&self.hits).record = record;
    }

    /// The access list anew (a reload).
    fn set_networks(&self, networks: Vec<(Vec<u8>, u8)>) -> PyResult<()> {
        let networks = parse_networks(networks)?;
        lock(&self.hits).set_networks(networks);
        Ok(())
    }

    /// The rate limit's verdict for a query that reached Python another way (TCP): the same
    /// bucket as the client's UDP queries, as with the Python path's one bucket per client.
    fn allow(&self, host: &str, now: f64) -> bool {
        let mut hits = lock(&self.hits);
        match host.parse::<IpAddr>() {
            Ok(ip) if hits.limits() => hits.take_token(ip, now),
            _ => true,
        }
    }

    /// The rate limit anew (a reload); 0: none.
    fn set_rate(&self, rate: f64, burst: f64) {
        lock(&self.hits).set_rate(rate, burst);
    }

    /// The share of a TTL after which a hit asks Python for a prefetch (1: never).
    fn set_prefetch_at(&self, share: f64) {
        lock(&self.hits).prefetch_at = share;
    }

    /// Serve-stale as the cache stage has it: whether expired entries are answered, for how
    /// long past expiry, with what TTL (and a refresh asked of Python, once per entry until it
    /// is done, as for a hit in the prefetch window).
    fn set_stale(&self, enabled: bool, stale_ttl: u32, max_stale: f64) {
        let mut hits = lock(&self.hits);
        hits.serve_stale = enabled;
        hits.stale_ttl = stale_ttl;
        hits.max_stale = max_stale;
    }

    /// Python is done refreshing `key` without storing a new entry: ask again when due.
    fn refreshed(&self, key: &[u8]) {
        lock(&self.hits).refreshed(key);
    }

    /// One datagram's fate without a socket (tests): the reply bytes for a hit, "limited" for
    /// one over the rate, else None; with the rate verdict.
    fn answer(&self, py: Python<'_>, data: &[u8], host: &str, port: u16, now: f64)
              -> PyResult<(PyObject, Option<bool>)> {
        let ip: IpAddr = host.parse().map_err(|_| PyValueError::new_err("not an address"))?;
        let source = SocketAddr::new(ip, port);
        let mut out = Vec::new();
        let mut hits = lock(&self.hits);
        Ok(match hits.decide(data, &source, now, &mut out) {
            Verdict::Answered { rcode, outcome, .. } => {
                hits.note(now, source, data, rcode, outcome);
                (PyBytes::new(py, &out).into(), Some(true))
            }
            Verdict::Limited => {
                hits.note(now, source, data, RCODE_REFUSED, Outcome::Limited);
                ("limited".into_py(py), Some(false))
            }
            Verdict::Python(rate) => (py.None(), rate),
        })
    }

    /// Read the UDP socket `fd` on a thread of its own; the number returned names it in
    /// `pending`'s datagrams. The socket must be blocking (the thread waits in its receive);
    /// the caller's own sends on it must pass MSG_DONTWAIT.
    fn listen(&mut self, fd: i32) -> PyResult<usize> {
        let listener = self.next_listener;
        let wake = self.wake.try_clone().map_err(os_error)?;
        let reader = Reader::start(self.hits.clone(), self.gate.clone(), listener, fd, wake)
            .map_err(|err| {
            if err.kind() == io::ErrorKind::InvalidInput {
                PyValueError::new_err(err.to_string())
            } else {
                os_error(err)
            }
        })?;
        self.readers.push((listener, reader));
        self.next_listener += 1;
        Ok(listener)
    }

    /// Stop reading the listener's socket; when this returns, its thread is gone.
    fn unlisten(&mut self, py: Python<'_>, listener: usize) -> PyResult<()> {
        let at = self
            .readers
            .iter()
            .position(|(number, _)| *number == listener)
            .ok_or_else(|| PyKeyError::new_err(listener))?;
        let (_, mut reader) = self.readers.remove(at);
        py.allow_threads(move || reader.stop());
        Ok(())
    }

    /// Whether Python reads the sockets now (`poll`): a thread handed it a datagram, and it
    /// has not given the turn back.
    #[getter]
    fn python_reads(&self) -> bool {
        self.gate.python_reads()
    }

    /// Python's turn: read what waits on the listener's socket, without waiting, as its
    /// thread would (hits answered, the rest for `pending`): (datagrams read, whether
    /// `pending` has something). Call it while the socket is readable; the thread stands
    /// aside meanwhile, and reads again after `give_back`.
    fn poll(&self, listener: usize) -> PyResult<(usize, bool)> {
        let fd = self
            .readers
            .iter()
            .find(|(number, _)| *number == listener)
            .map(|(_, reader)| reader.fd)
            .ok_or_else(|| PyKeyError::new_err(listener))?;
        let mut io = lock(&self.io);
        match io.poll(&self.hits, listener, fd) {
            Ok(read) => Ok(read),
            Err(err) if err.raw_os_error() == Some(libc::EBADF) => Err(os_error(err)),
            Err(_) => Ok((0, false)), // an ICMP error queued on the socket: nothing read
        }
    }

    /// The sockets were quiet: the threads read them again.
    fn give_back(&self) {
        self.gate.give_back();
    }

    /// The descriptor to watch: readable when datagrams wait for `pending`.
    fn wakeup_fd(&self) -> i32 {
        self.woken.as_raw_fd()
    }

    /// At most `budget` datagrams for the pipeline, [(listener, data, (host, port), rate
    /// verdict)], whether more wait (then call again: no new wake-up comes for them), and the
    /// refreshes the hits asked for since the last call, [(key, the query, "prefetch" or
    /// "stale")], each entry's once until `put` replaces it or `refreshed` is called.
    /// `drain`: empty the wake-up descriptor first (called because it was readable); a
    /// caller that was not woken through it saves the system call.
    #[allow(clippy::type_complexity)]
    #[args(budget, drain = "true")]
    fn pending<'py>(&self, py: Python<'py>, budget: usize, drain: bool)
                    -> PyResult<(&'py PyList, bool, &'py PyList)> {
        if drain {
            reader::drain_wakeups(&self.woken);
        }
        let (batch, more, refreshes) = {
            let mut hits = lock(&self.hits);
            let count = budget.min(hits.pending.len());
            let batch: Vec<hits::Miss> = hits.pending.drain(..count).collect();
            let refreshes = std::mem::take(&mut hits.refreshes);
            hits.woken = !hits.pending.is_empty(); // still woken: the caller comes back
            (batch, hits.woken, refreshes)
        };
        let out = PyList::empty(py);
        for miss in batch {
            let address = (miss.source.ip().to_string(), miss.source.port());
            let item = (miss.listener, PyBytes::new(py, &miss.data), address, miss.rate);
            out.append(item.to_object(py))?;
        }
        let asked = PyList::empty(py);
        for (key, data, kind) in refreshes {
            let item = (PyBytes::new(py, &key), PyBytes::new(py, &data), kind.name());
            asked.append(item.to_object(py))?;
        }
        Ok((out, more, asked))
    }

    /// Only the keys hit since the last `take` or `take_touched`, each once: what the cache
    /// needs before it evicts (the LRU order), without building the rest of `take`'s batch
    /// for every store.
    fn take_touched<'py>(&self, py: Python<'py>) -> PyResult<&'py PyList> {
        let touched = lock(&self.hits).take_touched();
        key_list(py, touched)
    }

    /// What the hits since the last call leave for Python: the keys hit (each once, and none
    /// `take_touched` took already: the LRU order), the records (when `record`), the counts
    /// of answers and of drops, of datagrams shed because Python fell behind, of batches lost
    /// to a fault in this module, and of the answers that were stale.
    #[allow(clippy::type_complexity)]
    fn take<'py>(&self, py: Python<'py>)
                 -> PyResult<(&'py PyList, &'py PyList, u64, u64, u64, u64, u64)> {
        let (touched, records, counts) = {
            let mut hits = lock(&self.hits);
            let touched = hits.take_touched();
            let records = std::mem::take(&mut hits.records);
            let counts = (hits.answered, hits.limited, hits.shed, hits.faults, hits.stale);
            hits.answered = 0;
            hits.stale = 0;
            hits.limited = 0;
            hits.shed = 0;
            hits.faults = 0;
            (touched, records, counts)
        };
        let keys = key_list(py, touched)?;
        let out = PyList::empty(py);
        for record in records {
            let item = (record.at, record.source.ip().to_string(), record.source.port(),
                        PyBytes::new(py, &record.query), record.rcode, record.reason);
            out.append(item.to_object(py))?;
        }
        Ok((keys, out, counts.0, counts.1, counts.2, counts.3, counts.4))
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        for (_, reader) in self.readers.iter_mut() {
            reader.stop();
        }
    }
}

/// What the compiled path reads of a query (tests compare it with `wire.parse_query`):
/// (id, flags, end of the question, edns, do, udp size, edns version), or None.
#[pyfunction]
fn parse_query(data: &[u8]) -> Option<(u16, u16, usize, bool, bool, usize, u8)> {
    wire::parse_query(data).map(|q| {
        (q.id, q.flags, q.question_end, q.edns, q.do_bit, q.udp_size, q.edns_version)
    })
}

#[pymodule]
fn _native(_py: Python, module: &PyModule) -> PyResult<()> {
    module.add_class::<FastPath>()?;
    module.add_function(wrap_pyfunction!(parse_query, module)?)?;
    module.add("BATCH", net::BATCH)?;
    module.add("MAX_PENDING", hits::MAX_PENDING)?;
    module.add("EAGER_COPIES", EAGER_COPIES)?;
    Ok(())
}
