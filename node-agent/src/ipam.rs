//! Pod IP allocation from a loopback range.
//!
//! Linux routes all of 127.0.0.0/8 to `lo`, so every pod can bind its own 127.x.y.z address
//! without any network setup; that lets two pods both listen on port 8080 as they would in a
//! real cluster.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IpamError {
    #[error("pod IP range {0:?} is not of the form 127.a.b.c/prefix with prefix 8..=30")]
    BadRange(String),
    #[error("pod IP range {0} is exhausted")]
    Exhausted(String),
}

/// Hands out addresses of a loopback CIDR, never 127.0.0.1 (the host IP) nor the range's
/// first/last address. Allocation walks round-robin so a just-freed IP is not handed straight
/// to the next pod, where stale clients of the old pod could still be connecting.
#[derive(Debug)]
pub struct Ipam {
    range: String,
    first: u32,
    last: u32,
    next: u32,
    used: HashSet<u32>,
    /// Held for pods seen before their worker started (after an agent restart).
    held: HashSet<u32>,
}

impl Ipam {
    pub fn new(range: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadRange(range.to_owned());
        let (addr, prefix) = range.split_once('/').ok_or_else(bad)?;
        let addr = Ipv4Addr::from_str(addr).map_err(|_| bad())?;
        let prefix: u32 = prefix.parse().map_err(|_| bad())?;
        if addr.octets()[0] != 127 || !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        let network = u32::from(addr) & mask;
        let first = network + 1;
        let last = (network | !mask) - 1;
        Ok(Self {
            range: range.to_owned(),
            first,
            last,
            next: first,
            used: HashSet::new(),
            held: HashSet::new(),
        })
    }

    fn usable(&self, ip: u32) -> bool {
        (self.first..=self.last).contains(&ip) && ip != u32::from(Ipv4Addr::LOCALHOST)
    }

    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        let size = self.last - self.first + 1;
        for _ in 0..size {
            let candidate = self.next;
            self.next = if self.next >= self.last {
                self.first
            } else {
                self.next + 1
            };
            if self.usable(candidate) && self.used.insert(candidate) {
                return Ok(Ipv4Addr::from(candidate));
            }
        }
        Err(IpamError::Exhausted(self.range.clone()))
    }

    /// Claims a specific IP (a pod that already had one before an agent restart).
    /// Returns false if it is outside the range or already taken (unless merely held).
    pub fn reserve(&mut self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        self.held.remove(&ip) || (self.usable(ip) && self.used.insert(ip))
    }

    /// Keeps an existing pod's IP from being handed to a new pod until that pod's worker
    /// claims it with [`Ipam::reserve`].
    pub fn hold(&mut self, ip: Ipv4Addr) {
        let ip = u32::from(ip);
        if self.usable(ip) && self.used.insert(ip) {
            self.held.insert(ip);
        }
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
        self.held.remove(&u32::from(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_unique_ips_skipping_localhost() {
        let mut ipam = Ipam::new("127.0.0.0/29").expect("valid range");
        let ips: Vec<_> = std::iter::from_fn(|| ipam.allocate().ok()).collect();
        // .0 is the network, .1 the host, .7 the broadcast: 2..=6 remain.
        let expected: Vec<Ipv4Addr> = (2..=6).map(|d| Ipv4Addr::new(127, 0, 0, d)).collect();
        assert_eq!(ips, expected);
        assert_eq!(ipam.allocate(), Err(IpamError::Exhausted("127.0.0.0/29".into())));
    }

    #[test]
    fn released_ips_are_reused_only_after_the_others() {
        let mut ipam = Ipam::new("127.0.1.0/29").expect("valid range");
        let a = ipam.allocate().expect("free");
        let b = ipam.allocate().expect("free");
        ipam.release(a);
        let c = ipam.allocate().expect("free");
        assert_ne!(c, a);
        assert_ne!(c, b);
    }

    #[test]
    fn reserve_respects_range_and_uniqueness() {
        let mut ipam = Ipam::new("127.0.0.0/16").expect("valid range");
        let ip = Ipv4Addr::new(127, 0, 3, 4);
        assert!(ipam.reserve(ip));
        assert!(!ipam.reserve(ip));
        assert!(!ipam.reserve(Ipv4Addr::new(127, 1, 0, 2)));
        assert!(!ipam.reserve(Ipv4Addr::LOCALHOST));
        for _ in 0..2000 {
            assert_ne!(ipam.allocate().expect("plenty left"), ip);
        }
    }

    #[test]
    fn held_ips_are_skipped_until_claimed_once() {
        let mut ipam = Ipam::new("127.0.0.0/29").expect("valid range");
        let existing = Ipv4Addr::new(127, 0, 0, 2);
        ipam.hold(existing);
        assert_ne!(ipam.allocate().expect("free"), existing);
        assert!(ipam.reserve(existing));
        assert!(!ipam.reserve(existing));
    }

    #[test]
    fn rejects_non_loopback_ranges() {
        assert!(Ipam::new("10.0.0.0/16").is_err());
        assert!(Ipam::new("127.0.0.0").is_err());
        assert!(Ipam::new("127.0.0.0/31").is_err());
    }
}
