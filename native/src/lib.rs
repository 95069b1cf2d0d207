//! `dnsproxy._native`: the UDP cache-hit path in compiled code (issue #22).
//!
//! `FastPath` reads the client-facing UDP socket in batches (`recvmmsg`), answers fresh cache
//! hits from a mirror of the Python cache's entries (`sendmmsg`), applies the access list and
//! the per-client rate limit, and hands every other datagram to the Python pipeline with the
//! client's address. Python stays the owner of the cache: it puts an entry here when it stores
//! or answers one (only replies the defences verified ever reach its cache), and removes,
//! clears or purges here whatever it drops there. What happened to the hits (their keys, for
//! the LRU order; records for the query log; counts) is taken by Python in batches.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

mod net;
mod wire;

const RCODE_REFUSED: u8 = 5;
const MAX_CLIENTS: usize = 65536; // verdicts and buckets kept; beyond, they start afresh

/// A network of the access list.
#[derive(Clone)]
struct Network {
    base: u128,
    mask: u128,
    v4: bool,
}

impl Network {
    fn new(packed: &[u8], prefix: u8) -> Option<Network> {
        let (base, bits, v4) = match packed.len() {
            4 => (u32::from_be_bytes(packed.try_into().ok()?) as u128, 32u32, true),
            16 => (u128::from_be_bytes(packed.try_into().ok()?), 128u32, false),
            _ => return None,
        };
        if prefix as u32 > bits {
            return None;
        }
        let mask = if prefix == 0 { 0 } else { (!0u128 << (bits - prefix as u32)) & width(bits) };
        Some(Network { base: base & mask, mask, v4 })
    }

    fn contains(&self, ip: &IpAddr) -> bool {
        match (ip, self.v4) {
            (IpAddr::V4(v4), true) => u32::from(*v4) as u128 & self.mask == self.base,
            (IpAddr::V6(v6), false) => u128::from(*v6) & self.mask == self.base,
            _ => false,
        }
    }
}

fn width(bits: u32) -> u128 {
    if bits == 128 { !0 } else { (1u128 << bits) - 1 }
}

/// An IPv4-mapped IPv6 source is its IPv4 address, as Python's access stage reads it.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// What became of one datagram.
enum Verdict {
    Answered(u8),     // a cache hit, with its rcode
    Limited,          // over the client's rate: dropped, as Python drops it over UDP
    Python(Option<bool>), // for the pipeline; the rate verdict when one was taken
}

struct Record {
    at: f64,
    source: SocketAddr,
    query: Vec<u8>,
    rcode: u8,
    reason: &'static str,
}

#[pyclass(module = "dnsproxy._native")]
pub struct FastPath {
    /// Python's own stamped bytes for each key (a reference, not a copy: no second cache).
    entries: HashMap<Vec<u8>, Py<PyBytes>>,
    networks: Vec<Network>,
    verdicts: HashMap<IpAddr, bool>,
    buckets: HashMap<IpAddr, (f64, f64)>, // tokens, last refill
    rate: f64,
    burst: f64,
    prefetch_at: f64,
    /// Keep a record per hit for the query log (off when nothing logs queries).
    #[pyo3(get, set)]
    record: bool,
    touched: HashSet<Vec<u8>>,
    records: Vec<Record>,
    answered: u64,
    limited: u64,
    batch: net::Batch,
    key: Vec<u8>,
}

impl FastPath {
    fn allowed(&mut self, ip: IpAddr) -> bool {
        if let Some(&verdict) = self.verdicts.get(&ip) {
            return verdict;
        }
        let plain = unmapped(ip);
        let verdict = self.networks.iter().any(|net| net.contains(&plain));
        if self.verdicts.len() >= MAX_CLIENTS {
            self.verdicts.clear();
        }
        self.verdicts.insert(ip, verdict);
        verdict
    }

    /// Python's TokenBuckets.allow, for this client's UDP queries.
    fn take_token(&mut self, ip: IpAddr, now: f64) -> bool {
        if self.buckets.len() >= MAX_CLIENTS && !self.buckets.contains_key(&ip) {
            self.buckets.clear();
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.entry(ip).or_insert((burst, now));
        bucket.0 = burst.min(bucket.0 + (now - bucket.1) * rate);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// The decision for one datagram from `source`; a hit's reply is left in `out`.
    fn decide(&mut self, py: Python, data: &[u8], source: &SocketAddr, now: f64,
              out: &mut Vec<u8>) -> Verdict {
        let ip = source.ip();
        if !self.allowed(ip) {
            return Verdict::Python(None); // refusals and their own limit are Python's
        }
        let query = match wire::parse_query(data) {
            Some(query) => query,
            None => return Verdict::Python(None), // FORMERR or nothing: Python's, unlimited
        };
        let rate = if self.rate > 0.0 { Some(self.take_token(ip, now)) } else { None };
        if rate == Some(false) {
            return Verdict::Limited;
        }
        if query.flags & wire::OPCODE_MASK != 0 || query.edns_version != 0 {
            return Verdict::Python(rate); // NOTIMP, BADVERS: written by Python's stages
        }
        let mut key = std::mem::take(&mut self.key);
        wire::cache_key(data, &query, &mut key);
        let stamped = self
            .entries
            .get(&key)
            .and_then(|entry| wire::Stamped::read(entry.as_ref(py).as_bytes()));
        let verdict = match stamped {
            Some(entry) => {
                let age = now - entry.stored;
                if age >= 0.0 && age < f64::from(entry.ttl) * self.prefetch_at {
                    wire::client_reply(&entry, data, &query, age as u32, 0, out);
                    let rcode = entry.rcode;
                    if !self.touched.contains(&key) {
                        self.touched.insert(key.clone());
                    }
                    Verdict::Answered(rcode)
                } else {
                    Verdict::Python(rate) // prefetch, stale or expired: the Python cache decides
                }
            }
            None => Verdict::Python(rate),
        };
        self.key = key;
        verdict
    }
}

#[pymethods]
impl FastPath {
    /// `networks`: the access list as (packed address, prefix length); `rate`, `burst`: the
    /// per-client limit (rate 0: none); `prefetch_at`: the share of a TTL after which a hit
    /// goes to Python (which prefetches).
    #[new]
    fn new(networks: Vec<(Vec<u8>, u8)>, rate: f64, burst: f64, prefetch_at: f64,
           record: bool) -> PyResult<Self> {
        let mut parsed = Vec::with_capacity(networks.len());
        for (packed, prefix) in networks {
            parsed.push(Network::new(&packed, prefix).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err("not a network")
            })?);
        }
        Ok(FastPath {
            entries: HashMap::new(),
            networks: parsed,
            verdicts: HashMap::new(),
            buckets: HashMap::new(),
            rate,
            burst,
            prefetch_at,
            record,
            touched: HashSet::new(),
            records: Vec::new(),
            answered: 0,
            limited: 0,
            batch: net::Batch::new(),
            key: Vec::with_capacity(260),
        })
    }

    /// Answer `key` from this entry (`wire.CachedReply`'s stamped bytes, the cache's own
    /// object, kept by reference); False if its layout is unreadable.
    fn put(&mut self, key: Vec<u8>, entry: &PyBytes) -> bool {
        if wire::Stamped::read(entry.as_bytes()).is_none() {
            self.entries.remove(&key);
            return false;
        }
        self.entries.insert(key, entry.into());
        true
    }

    fn remove(&mut self, key: &[u8]) {
        self.entries.remove(key);
    }

    fn clear(&mut self) {
        self.entries.clear();
    }

    fn __len__(&self) -> usize {
        self.entries.len()
    }

    /// The access list anew (a reload).
    fn set_networks(&mut self, networks: Vec<(Vec<u8>, u8)>) -> PyResult<()> {
        let mut parsed = Vec::with_capacity(networks.len());
        for (packed, prefix) in networks {
            parsed.push(Network::new(&packed, prefix).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err("not a network")
            })?);
        }
        self.networks = parsed;
        self.verdicts.clear();
        Ok(())
    }

    /// The rate limit's verdict for a query that reached Python another way (TCP): the same
    /// bucket as the client's UDP queries, as with the Python path's one bucket per client.
    fn allow(&mut self, host: &str, now: f64) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) if self.rate > 0.0 => self.take_token(ip, now),
            _ => true,
        }
    }

    /// The rate limit anew (a reload); 0: none.
    fn set_rate(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
    }

    /// The share of a TTL after which a hit goes to Python, which prefetches (1: never).
    fn set_prefetch_at(&mut self, share: f64) {
        self.prefetch_at = share;
    }

    /// One datagram's fate without a socket (tests, and the Python path's own use): the reply
    /// bytes for a hit, "limited" for one over the rate, else None, with the rate verdict.
    fn answer<'py>(&mut self, py: Python<'py>, data: &[u8], host: &str, port: u16, now: f64)
                   -> PyResult<(PyObject, Option<bool>)> {
        let ip: IpAddr = host.parse().map_err(|_| {
            pyo3::exceptions::PyValueError::new_err("not an address")
        })?;
        let source = SocketAddr::new(ip, port);
        let mut out = Vec::new();
        Ok(match self.decide(py, data, &source, now, &mut out) {
            Verdict::Answered(rcode) => {
                self.note(now, source, data, rcode, "cached");
                (PyBytes::new(py, &out).into(), Some(true))
            }
            Verdict::Limited => {
                self.note(now, source, data, RCODE_REFUSED, "ratelimited");
                ("limited".into_py(py), Some(false))
            }
            Verdict::Python(rate) => (py.None(), rate),
        })
    }

    /// Read what waits on the socket `fd` (at most `budget` datagrams), answer the hits, and
    /// return the rest for the pipeline: [(data, (host, port), rate verdict)].
    fn drain<'py>(&mut self, py: Python<'py>, fd: i32, now: f64, budget: usize)
                  -> PyResult<&'py PyList> {
        let rest = PyList::empty(py);
        let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        let mut seen = 0;
        while seen < budget {
            let got = self.batch.receive(fd).map_err(PyErr::from)?;
            if got == 0 {
                break;
            }
            seen += got;
            for i in 0..got {
                let source = match self.batch.source(i) {
                    Some(source) => source,
                    None => continue,
                };
                let length = self.batch.lengths[i];
                let data = self.batch.data[i][..length].to_vec();
                if self.batch.truncated[i] {
                    continue; // longer than any query we take: nothing to answer
                }
                let mut out = Vec::new();
                match self.decide(py, &data, &source, now, &mut out) {
                    Verdict::Answered(rcode) => {
                        self.note(now, source, &data, rcode, "cached");
                        replies.push((out, source));
                    }
                    Verdict::Limited => self.note(now, source, &data, RCODE_REFUSED, "ratelimited"),
                    Verdict::Python(rate) => {
                        let address = (source.ip().to_string(), source.port());
                        let item = PyTuple::new(py, &[PyBytes::new(py, &data).to_object(py),
                                                      address.to_object(py), rate.to_object(py)]);
                        rest.append(item)?;
                    }
                }
            }
            if got < net::BATCH {
                break;
            }
        }
        if !replies.is_empty() {
            net::send_all(fd, &replies);
        }
        Ok(rest)
    }

    /// What the hits since the last call leave for Python: the keys hit (each once: the LRU
    /// order), the records (when `record`), and the counts of answers and of drops.
    fn take<'py>(&mut self, py: Python<'py>) -> (&'py PyList, &'py PyList, u64, u64) {
        let keys = PyList::empty(py);
        for key in self.touched.drain() {
            let _ = keys.append(PyBytes::new(py, &key));
        }
        let records = PyList::empty(py);
        for record in self.records.drain(..) {
            let item = (record.at, record.source.ip().to_string(), record.source.port(),
                        PyBytes::new(py, &record.query), record.rcode, record.reason);
            let _ = records.append(item.to_object(py));
        }
        let counts = (self.answered, self.limited);
        self.answered = 0;
        self.limited = 0;
        (keys, records, counts.0, counts.1)
    }
}

impl FastPath {
    fn note(&mut self, now: f64, source: SocketAddr, data: &[u8], rcode: u8,
            reason: &'static str) {
        if reason == "cached" {
            self.answered += 1;
        } else {
            self.limited += 1;
        }
        if self.record {
            self.records.push(Record { at: now, source, query: data.to_vec(), rcode, reason });
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
    Ok(())
}
