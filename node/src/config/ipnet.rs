//! IP networks in settings: trusted proxies and the egress allow and deny lists.

/// An IP network (`10.0.0.0/8`, `192.168.1.7`, `::1`): the `ipnet` crate's, read as operators
/// write it (an IP alone is a network of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// In settings: `--trusted-proxies`, `--egress-allow`, `--egress-deny` (lists of them).
impl farm_runtime::config::Value for IpNet {
    fn parse(text: &str) -> Result<Self, String> {
        IpNet::parse(text).map_err(|e| format!("invalid network {e}"))
    }

    /// The flag's errors say the text without "invalid network": clap says "invalid value".
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::new(IpNet::parse)
    }
}

impl IpNet {
    /// Parses an IP (a network of one) or a CIDR; whitespace around it is ignored.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("{s:?}: use an IP or a CIDR like 10.0.0.0/8");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
        let net = match prefix {
            Some(p) => ipnet::IpNet::new(addr, p).map_err(|_| bad())?,
            None => ipnet::IpNet::from(addr),
        };
        Ok(Self(net))
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains(&ip)
    }
}
