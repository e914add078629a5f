//! Hand-built DNS messages, including hostile ones.

/// Encodes a presentation name ("a.b.") as wire labels; `\.` keeps a literal dot in a label.
pub fn name(n: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut label = Vec::new();
    let mut chars = n.trim_end_matches('.').bytes().peekable();
    while let Some(b) = chars.next() {
        match b {
            b'\\' => label.extend(chars.next()),
            b'.' => {
                out.push(label.len() as u8);
                out.append(&mut label);
            }
            _ => label.push(b),
        }
    }
    if !label.is_empty() {
        out.push(label.len() as u8);
        out.append(&mut label);
    }
    out.push(0);
    out
}

pub const A: u16 = 1;
pub const CNAME: u16 = 5;
pub const AAAA: u16 = 28;

pub fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    [id, flags, qd, an, ns, ar]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
    let mut m = header(id, 0x0100, 1, 0, 0, 0);
    m.extend(name(qname));
    m.extend(qtype.to_be_bytes());
    m.extend(1u16.to_be_bytes());
    m
}

pub struct Rr<'a> {
    pub owner: &'a str,
    pub rtype: u16,
    pub ttl: u32,
    pub data: Vec<u8>,
}

pub fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Rr<'_> {
    Rr {
        owner,
        rtype: A,
        ttl,
        data: ip.to_vec(),
    }
}

pub fn aaaa(owner: &str, ttl: u32, ip: std::net::Ipv6Addr) -> Rr<'_> {
    Rr {
        owner,
        rtype: AAAA,
        ttl,
        data: ip.octets().to_vec(),
    }
}

pub fn cname<'a>(owner: &'a str, ttl: u32, target: &str) -> Rr<'a> {
    Rr {
        owner,
        rtype: CNAME,
        ttl,
        data: name(target),
    }
}

fn push_rr(m: &mut Vec<u8>, rr: &Rr<'_>) {
    m.extend(name(rr.owner));
    m.extend(rr.rtype.to_be_bytes());
    m.extend(1u16.to_be_bytes());
    m.extend(rr.ttl.to_be_bytes());
    m.extend((rr.data.len() as u16).to_be_bytes());
    m.extend(&rr.data);
}

/// A response to `query` (same ID and question) with answer and additional records.
pub fn response(query: &[u8], rcode: u8, answers: &[Rr<'_>], additional: &[Rr<'_>]) -> Vec<u8> {
    let id = u16::from_be_bytes([query[0], query[1]]);
    let mut m = header(
        id,
        0x8180 | u16::from(rcode),
        1,
        answers.len() as u16,
        0,
        additional.len() as u16,
    );
    m.extend(&query[12..]);
    for rr in answers {
        push_rr(&mut m, rr);
    }
    for rr in additional {
        push_rr(&mut m, rr);
    }
    m
}
