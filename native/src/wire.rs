//! The few pieces of the DNS wire format a cache hit needs, in safe Rust: reading a client's
//! query exactly as `dnsproxy/wire.py` does (`_parse_query`), and writing the cached reply as
//! that client must see it (`client_reply`, `truncate_for`). Every read is bounds-checked; a
//! message that does not fit what is expected is `None`, and Python's path handles it.

pub const QR: u16 = 0x8000;
pub const AA: u16 = 0x0400;
pub const TC: u16 = 0x0200;
pub const RD: u16 = 0x0100;
pub const RA: u16 = 0x0080;
pub const Z: u16 = 0x0040;
pub const AD: u16 = 0x0020;
pub const CD: u16 = 0x0010;
pub const OPCODE_MASK: u16 = 0x7800;
const TYPE_OPT: u16 = 41;
const DO_BIT: u32 = 0x8000;
const MAX_UDP_REPLY: usize = 4096;
const UPSTREAM_UDP_SIZE: u16 = 1232;

/// What a hit needs of a client's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// The question as sent: name, type and class (offset 12 up to `question_end`).
    pub question_end: usize,
    pub edns: bool,
    pub do_bit: bool,
    pub udp_size: usize,
    pub edns_version: u8,
}

fn u16_at(data: &[u8], off: usize) -> Option<u16> {
    let bytes = data.get(off..off + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    let bytes = data.get(off..off + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Offset just past the name at `off`; pointers end a name and are not followed.
fn skip_name(data: &[u8], mut off: usize) -> Option<usize> {
    loop {
        let length = *data.get(off)?;
        if length == 0 {
            return Some(off + 1);
        }
        if length & 0xC0 == 0xC0 {
            return if off + 2 <= data.len() { Some(off + 2) } else { None };
        }
        if length & 0xC0 != 0 {
            return None;
        }
        off += 1 + length as usize;
    }
}

/// End of the one question at offset 12: uncompressed, at most 255 bytes, then type and class.
fn question_end(data: &[u8]) -> Option<usize> {
    let mut off = 12;
    let mut total = 0usize;
    loop {
        let length = *data.get(off)? as usize;
        if length == 0 {
            off += 1;
            break;
        }
        if length & 0xC0 != 0 {
            return None;
        }
        total += length + 1;
        if total > 254 {
            return None;
        }
        off += 1 + length;
    }
    if off + 4 > data.len() {
        return None;
    }
    Some(off + 4)
}

/// The query as `wire._parse_query` reads it; `None` for anything else.
pub fn parse_query(data: &[u8]) -> Option<Query> {
    if data.len() < 12 {
        return None;
    }
    let id = u16_at(data, 0)?;
    let flags = u16_at(data, 2)?;
    if flags & QR != 0 || u16_at(data, 4)? != 1 {
        return None;
    }
    let records = u16_at(data, 6)? as usize + u16_at(data, 8)? as usize;
    let arcount = u16_at(data, 10)? as usize;
    let qend = question_end(data)?;
    let mut query = Query {
        id,
        flags,
        question_end: qend,
        edns: false,
        do_bit: false,
        udp_size: 512,
        edns_version: 0,
    };
    if arcount == 0 {
        return Some(query);
    }
    let mut off = qend;
    for _ in 0..records + arcount {
        let start = off;
        off = skip_name(data, off)?;
        if off + 10 > data.len() {
            return None;
        }
        let rtype = u16_at(data, off)?;
        let rclass = u16_at(data, off + 2)?;
        let ttl = u32_at(data, off + 4)?;
        let rdlen = u16_at(data, off + 8)? as usize;
        off += 10 + rdlen;
        if off > data.len() {
            return None;
        }
        if rtype == TYPE_OPT {
            if data[start] != 0 || query.edns {
                return None;
            }
            query.edns = true;
            query.do_bit = ttl & DO_BIT != 0;
            query.edns_version = ((ttl >> 16) & 0xFF) as u8;
            query.udp_size = (rclass as usize).clamp(512, MAX_UDP_REPLY);
        }
    }
    Some(query)
}

/// The cache key: the question with its name lower-cased (ASCII), then a byte for DO and CD,
/// as `Cache.key` builds it.
pub fn cache_key(data: &[u8], query: &Query, key: &mut Vec<u8>) {
    key.clear();
    let question = &data[12..query.question_end];
    let name_end = question.len() - 4;
    key.extend(question[..name_end].iter().map(u8::to_ascii_lowercase));
    key.extend_from_slice(&question[name_end..]);
    key.push(u8::from(query.do_bit) | (u8::from(query.flags & CD != 0) << 1));
}

/// Our OPT record: root owner, type OPT, our buffer size, the extended rcode, DO, no options.
pub fn opt_record(do_bit: bool, ext_rcode: u8, out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&UPSTREAM_UDP_SIZE.to_be_bytes());
    let ttl: u32 = (u32::from(ext_rcode) << 24) | if do_bit { DO_BIT } else { 0 };
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// A cached reply as Python stored it (`wire.CachedReply`'s stamped bytes: a `>dIBBH` head, the
/// u16 offsets of its TTLs, the message without OPT), read in place from the mirror's copy.
pub struct Stamped<'a> {
    pub stored: f64,
    pub ttl: u32,
    pub ext_rcode: u8,
    pub rcode: u8,
    offsets: &'a [u8],
    pub message: &'a [u8],
}

impl<'a> Stamped<'a> {
    /// The layout, every offset checked to lie inside the message; None if it does not.
    pub fn read(bytes: &'a [u8]) -> Option<Stamped<'a>> {
        let head = bytes.get(..16)?;
        let stored = f64::from_be_bytes(head[..8].try_into().ok()?);
        let ttl = u32::from_be_bytes(head[8..12].try_into().ok()?);
        let count = u16::from_be_bytes([head[14], head[15]]) as usize;
        let offsets = bytes.get(16..16 + 2 * count)?;
        let message = bytes.get(16 + 2 * count..)?;
        let stamped = Stamped { stored, ttl, ext_rcode: head[12], rcode: head[13], offsets,
                                message };
        if message.len() < 12 || stamped.offsets().any(|off| off + 4 > message.len()) {
            return None;
        }
        Some(stamped)
    }

    pub fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        self.offsets.chunks_exact(2).map(|pair| u16::from_be_bytes([pair[0], pair[1]]) as usize)
    }
}

/// `wire.client_reply`: the client's ID and question case, our flags, aged TTLs (a run-out one
/// shows `stale_ttl`), our OPT if the client sent one. Then `truncate_for` its buffer.
pub fn client_reply(entry: &Stamped, data: &[u8], query: &Query, age: u32, stale_ttl: u32,
                    out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(entry.message);
    let question = &data[12..query.question_end];
    let upstream_flags = u16::from_be_bytes([out[2], out[3]]);
    let mut flags = (upstream_flags & !(AA | RD | CD | Z)) | RA | (query.flags & (RD | CD));
    if !(query.do_bit || query.flags & AD != 0) {
        flags &= !AD;
    }
    out[0..2].copy_from_slice(&query.id.to_be_bytes());
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    if out.len() >= 12 + question.len() {
        out[12..12 + question.len()].copy_from_slice(question);
    }
    if age > 0 {
        for off in entry.offsets() {
            let ttl = u32::from_be_bytes([out[off], out[off + 1], out[off + 2], out[off + 3]]);
            let aged = if ttl > age { ttl - age } else { stale_ttl };
            out[off..off + 4].copy_from_slice(&aged.to_be_bytes());
        }
    }
    if query.edns {
        let arcount = u16::from_be_bytes([out[10], out[11]]).wrapping_add(1);
        out[10..12].copy_from_slice(&arcount.to_be_bytes());
        opt_record(query.do_bit, entry.ext_rcode, out);
    }
    if out.len() > query.udp_size {
        truncate(data, query, entry.ext_rcode, out);
    }
}

/// `wire.truncate_for`: header with TC, the question, and our OPT (keeping the extended rcode).
fn truncate(data: &[u8], query: &Query, ext_rcode: u8, out: &mut Vec<u8>) {
    let flags = u16::from_be_bytes([out[2], out[3]]) | TC;
    out.clear();
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::from(query.edns).to_be_bytes());
    out.extend_from_slice(&data[12..query.question_end]);
    if query.edns {
        opt_record(query.do_bit, ext_rcode, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], edns: Option<(u16, u32)>) -> Vec<u8> {
        let mut out = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())];
        out.extend_from_slice(name);
        out.extend_from_slice(&[0, 1, 0, 1]);
        if let Some((size, ttl)) = edns {
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out
    }

    #[test]
    fn reads_a_plain_query_and_one_with_opt() {
        let plain = query(b"\x03www\x07Example\x00", None);
        let q = parse_query(&plain).unwrap();
        assert_eq!((q.id, q.edns, q.udp_size), (0x1234, false, 512));
        let mut key = Vec::new();
        cache_key(&plain, &q, &mut key);
        assert_eq!(&key[..], b"\x03www\x07example\x00\x00\x01\x00\x01\x00");
        let with_opt = query(b"\x03www\x07example\x00", Some((8192, DO_BIT)));
        let q = parse_query(&with_opt).unwrap();
        assert!(q.edns && q.do_bit);
        assert_eq!(q.udp_size, 4096);
    }

    #[test]
    fn refuses_what_python_refuses() {
        let good = query(b"\x03www\x00", None);
        for cut in 0..good.len() {
            assert!(parse_query(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut response = good.clone();
        response[2] |= 0x80;
        assert!(parse_query(&response).is_none());
        let compressed = query(b"\xc0\x0c", None);
        assert!(parse_query(&compressed).is_none());
        let mut two_opts = query(b"\x03www\x00", Some((1232, 0)));
        let opt = two_opts[two_opts.len() - 11..].to_vec();
        two_opts.extend_from_slice(&opt);
        two_opts[11] = 2;
        assert!(parse_query(&two_opts).is_none());
    }
}
