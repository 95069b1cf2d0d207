//! The decisions of the hit path, shared by its reader threads and the Python side: the mirror
//! of the cache's entries, the access list, the per-client rate limit, and what the hits leave
//! for Python (LRU touches, query-log records, counts, refreshes to start) and the datagrams it
//! must answer itself.
//! One `Hits` lives behind a mutex; nothing here blocks or calls into Python.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use crate::wire;

pub const RCODE_REFUSED: u8 = 5;
const MAX_CLIENTS: usize = 65536; // verdicts and buckets kept; beyond, they start afresh
/// Datagrams waiting for Python at most; beyond, they are shed as a full socket buffer would
/// (Python's own in-flight limits apply to what it takes).
pub const MAX_PENDING: usize = 8192;

/// A network of the access list.
#[derive(Clone)]
pub struct Network {
    base: u128,
    mask: u128,
    v4: bool,
}

impl Network {
    pub fn new(packed: &[u8], prefix: u8) -> Option<Network> {
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
pub enum Verdict {
    /// A cache hit, answered: its rcode, `Cached` or `Stale`, and whether Python must be woken
    /// for the refresh it asked.
    Answered { rcode: u8, outcome: Outcome, wake: bool },
    Limited,              // over the client's rate: dropped, as Python drops it over UDP
    Python(Option<bool>), // for the pipeline; the rate verdict when one was taken
}

/// What the path did with a datagram it did not hand on, as the query log names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Cached,
    Stale,
    Limited,
}

impl Outcome {
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Stale => "stale",
            Outcome::Limited => "ratelimited",
        }
    }
}

/// Why an answered entry is to be fetched anew, as the cache stage names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    Prefetch, // answered in the last part of its TTL
    Stale,    // answered past its expiry (serve-stale)
}

impl Refresh {
    pub fn name(self) -> &'static str {
        match self {
            Refresh::Prefetch => "prefetch",
            Refresh::Stale => "stale",
        }
    }
}

pub struct Record {
    pub at: f64,
    pub source: SocketAddr,
    pub query: Vec<u8>,
    pub rcode: u8,
    pub reason: &'static str,
}

/// A datagram for the Python pipeline, from the listener numbered `listener`.
pub struct Miss {
    pub listener: usize,
    pub data: Vec<u8>,
    pub source: SocketAddr,
    pub rate: Option<bool>,
}

/// A mirrored entry: a copy of the cache's stamped bytes (the reader threads answer without
/// the GIL, so they cannot read Python's own objects), whether a hit since the last take
/// listed its key already, whether Python was asked to refresh it and is not done, and
/// whether it was copied as stored (`offer`) and not hit since.
struct Entry {
    stamped: Box<[u8]>,
    touched: bool,
    refreshing: bool,
    unhit: bool,
}

pub struct Hits {
    entries: HashMap<Vec<u8>, Entry>,
    networks: Vec<Network>,
    verdicts: HashMap<IpAddr, bool>,
    last_verdict: Option<(IpAddr, bool)>, // most datagrams come from the client before
    buckets: HashMap<IpAddr, (f64, f64)>, // tokens, last refill
    rate: f64,
    burst: f64,
    pub prefetch_at: f64,
    /// Serve-stale: an expired entry is answered for `max_stale` seconds more, its TTLs
    /// `stale_ttl`, and refreshed.
    pub serve_stale: bool,
    pub stale_ttl: u32,
    pub max_stale: f64,
    /// Keep a record per hit for the query log (off when nothing logs queries).
    pub record: bool,
    /// The keys hit since the last take, each once: the cache's LRU order.
    pub touched: Vec<Vec<u8>>,
    pub records: Vec<Record>,
    pub answered: u64,
    pub stale: u64, // of the answered, served stale
    pub limited: u64,
    /// Datagrams for Python, and whether it has been woken for them.
    pub pending: VecDeque<Miss>,
    /// Entries to refresh (the key, the query that found it), for Python's cache stage.
    pub refreshes: Vec<(Vec<u8>, Vec<u8>, Refresh)>,
    pub woken: bool,
    pub shed: u64,
    pub faults: u64,
    /// The keys `offer` copied, oldest first: the first still unhit goes when room is short.
    offered: VecDeque<Vec<u8>>,
    key: Vec<u8>,
}

impl Hits {
    pub fn new(networks: Vec<Network>, rate: f64, burst: f64, prefetch_at: f64,
               record: bool) -> Hits {
        Hits {
            entries: HashMap::new(),
            networks,
            verdicts: HashMap::new(),
            last_verdict: None,
            buckets: HashMap::new(),
            rate,
            burst,
            prefetch_at,
            serve_stale: false,
            stale_ttl: 0,
            max_stale: 0.0,
            record,
            touched: Vec::new(),
            records: Vec::new(),
            answered: 0,
            stale: 0,
            limited: 0,
            pending: VecDeque::new(),
            refreshes: Vec::new(),
            woken: false,
            shed: 0,
            faults: 0,
            offered: VecDeque::new(),
            key: Vec::with_capacity(260),
        }
    }

    /// Answer `key` from this entry; false (and no entry) if its layout is unreadable.
    pub fn put(&mut self, key: Vec<u8>, entry: &[u8]) -> bool {
        if wire::Stamped::read(entry).is_none() {
            self.entries.remove(&key);
            return false;
        }
        let entry = Entry { stamped: entry.into(), touched: false, refreshing: false,
                            unhit: false };
        self.entries.insert(key, entry);
        true
    }

    /// A newly stored entry, copied so that its first hit is answered here too. At most
    /// `room` such copies wait for that hit: the oldest unhit one makes way for the next. A
    /// cache of names asked once (a scan, a big office) thus costs no second copy of each,
    /// and an entry dropped here is still answered by Python, which copies it at that hit.
    pub fn offer(&mut self, key: Vec<u8>, entry: &[u8], room: usize) -> bool {
        if room == 0 {
            return false;
        }
        while self.offered.len() >= room {
            if let Some(old) = self.offered.pop_front() {
                if self.entries.get(&old).map_or(false, |e| e.unhit) {
                    self.entries.remove(&old);
                }
            }
        }
        if !self.put(key.clone(), entry) {
            return false;
        }
        if let Some(held) = self.entries.get_mut(&key) {
            held.unhit = true;
        }
        self.offered.push_back(key);
        true
    }

    /// Python is done refreshing `key` without a new entry (it failed, or was not started):
    /// the next hit near or past expiry asks again.
    pub fn refreshed(&mut self, key: &[u8]) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.refreshing = false;
        }
    }

    pub fn remove(&mut self, key: &[u8]) {
        self.entries.remove(key);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.offered.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn set_networks(&mut self, networks: Vec<Network>) {
        self.networks = networks;
        self.verdicts.clear();
        self.last_verdict = None;
    }

    pub fn set_rate(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
    }

    pub fn limits(&self) -> bool {
        self.rate > 0.0
    }

    fn allowed(&mut self, ip: IpAddr) -> bool {
        if let Some((last, verdict)) = self.last_verdict {
            if last == ip {
                return verdict;
            }
        }
        if let Some(&verdict) = self.verdicts.get(&ip) {
            self.last_verdict = Some((ip, verdict));
            return verdict;
        }
        let plain = unmapped(ip);
        let verdict = self.networks.iter().any(|net| net.contains(&plain));
        if self.verdicts.len() >= MAX_CLIENTS {
            self.verdicts.clear();
        }
        self.verdicts.insert(ip, verdict);
        self.last_verdict = Some((ip, verdict));
        verdict
    }

    /// Python's TokenBuckets.allow, for this client's queries.
    pub fn take_token(&mut self, ip: IpAddr, now: f64) -> bool {
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
    pub fn decide(&mut self, data: &[u8], source: &SocketAddr, now: f64,
                  out: &mut Vec<u8>) -> Verdict {
        let ip = source.ip();
        if !self.allowed(ip) {
            return Verdict::Python(None); // refusals and their own limit are Python's
        }
        let query = match wire::parse_query(data) {
            Some(query) => query,
            None => return Verdict::Python(None), // FORMERR or nothing: Python's, unlimited
        };
        let rate = if self.limits() { Some(self.take_token(ip, now)) } else { None };
        if rate == Some(false) {
            return Verdict::Limited;
        }
        if query.flags & wire::OPCODE_MASK != 0 || query.edns_version != 0 {
            return Verdict::Python(rate); // NOTIMP, BADVERS: written by Python's stages
        }
        let mut key = std::mem::take(&mut self.key);
        wire::cache_key(data, &query, &mut key);
        let mut first_touch = false;
        let verdict = match self.entries.get_mut(&key) {
            Some(entry) => match wire::Stamped::read(&entry.stamped) {
                Some(stamped) => {
                    // As the cache stage's answer: fresh; in the prefetch window (answered,
                    // and refreshed); expired but within max_stale (answered stale, and
                    // refreshed); else Python's, which drops it and forwards the query.
                    let age = now - stamped.stored;
                    let ttl = f64::from(stamped.ttl);
                    let served = if age < 0.0 {
                        None // a stamp from the future (the clock of another boot): Python's
                    } else if age < ttl * self.prefetch_at {
                        Some((Outcome::Cached, None))
                    } else if age < ttl {
                        Some((Outcome::Cached, Some(Refresh::Prefetch)))
                    } else if self.serve_stale && age < ttl + self.max_stale {
                        Some((Outcome::Stale, Some(Refresh::Stale)))
                    } else {
                        None
                    };
                    match served {
                        Some((outcome, refresh)) => {
                            let stale_ttl =
                                if outcome == Outcome::Stale { self.stale_ttl } else { 0 };
                            wire::client_reply(&stamped, data, &query, age as u32, stale_ttl,
                                               out);
                            first_touch = !std::mem::replace(&mut entry.touched, true);
                            entry.unhit = false;
                            let mut wake = false;
                            if let Some(kind) = refresh {
                                if !entry.refreshing && self.refreshes.len() < MAX_PENDING {
                                    entry.refreshing = true;
                                    self.refreshes.push((key.clone(), data.to_vec(), kind));
                                    wake = !std::mem::replace(&mut self.woken, true);
                                }
                            }
                            Verdict::Answered { rcode: stamped.rcode, outcome, wake }
                        }
                        None => Verdict::Python(rate),
                    }
                }
                None => Verdict::Python(rate),
            },
            None => Verdict::Python(rate),
        };
        if first_touch {
            self.touched.push(key.clone());
        }
        self.key = key;
        verdict
    }

    /// The keys hit since the last call, each once; their entries may be listed again.
    pub fn take_touched(&mut self) -> Vec<Vec<u8>> {
        let touched = std::mem::take(&mut self.touched);
        for key in &touched {
            if let Some(entry) = self.entries.get_mut(key) {
                entry.touched = false;
            }
        }
        touched
    }

    /// Count (and, when recording, log) a datagram this path answered or dropped.
    pub fn note(&mut self, now: f64, source: SocketAddr, data: &[u8], rcode: u8,
                outcome: Outcome) {
        match outcome {
            Outcome::Cached => self.answered += 1,
            Outcome::Stale => {
                self.answered += 1;
                self.stale += 1;
            }
            Outcome::Limited => self.limited += 1,
        }
        if self.record {
            let reason = outcome.reason();
            self.records.push(Record { at: now, source, query: data.to_vec(), rcode, reason });
        }
    }

    /// Queue a datagram for Python; true if Python must be woken for it.
    pub fn hand_on(&mut self, miss: Miss) -> bool {
        if self.pending.len() >= MAX_PENDING {
            self.shed += 1;
            return false;
        }
        self.pending.push_back(miss);
        !std::mem::replace(&mut self.woken, true)
    }
}
