//! Who FFmpeg may reach: the egress [`Policy`], decided on resolved addresses.
//!
//! Built once by the node (it resolves the farm's own endpoints at start-up) and handed to the
//! guard process as a [`PolicySpec`], where every channel's gateway asks it.

use crate::config::IpNet;
use farm_proto::redis_url::host_port;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Schemes whose destination the policy decides (TCP-based). `udp`, `rtp` and `srt` are received
/// or sent over UDP, which no Redis or HTTP service on the farm answers.
fn tcp_default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" | "rtmps" => Some(443),
        "rtmp" => Some(1935),
        "tcp" => Some(0),
        _ => None,
    }
}

/// Whether FFmpeg reads this scheme through the gateway.
pub fn proxied(scheme: &str) -> bool {
    scheme == "http" || scheme == "https"
}

/// The lowercase scheme of a URL.
pub fn scheme(url: &str) -> String {
    url.split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default()
}

/// `host` (lowercase, IPv6 without brackets) and port of a URL's authority, the scheme's default
/// port when none is written. `None` for schemes the policy does not decide.
pub fn endpoint(url: &str) -> Option<(String, u16)> {
    let default = tcp_default_port(&scheme(url))?;
    host_port(url, default)
}

/// A port on some addresses that belongs to the farm itself.
#[derive(Debug, Clone)]
struct FarmPort {
    what: String,
    port: u16,
    /// `None`: every loopback and unspecified address (the service listens on this machine).
    ip: Option<IpAddr>,
}

impl FarmPort {
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        port == self.port
            && match self.ip {
                Some(own) => own == ip,
                None => ip.is_loopback() || ip.is_unspecified(),
            }
    }
}

/// Loopback, private, link-local, shared (CGNAT) and "this network" addresses.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
        }
    }
}

/// Why a destination is not connected to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The policy refuses every address of it.
    #[error("{0}")]
    Refused(String),
    /// The name does not resolve (now): nothing to decide.
    #[error("{0}")]
    Unresolved(String),
}

/// Who may be reached. Built once at start-up.
#[derive(Debug, Default)]
pub struct Policy {
    farm: Vec<FarmPort>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Policy {
    /// `farm`: the farm's own endpoints (`what`, `host`, `port`): Redis or sentinels, the node's
    /// listener. Names are resolved now; a name that does not resolve is kept for its port on
    /// this machine's addresses.
    pub async fn new(farm: &[(String, String, u16)], allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let mut ports = Vec::new();
        for (what, host, port) in farm {
            let addrs: Vec<IpAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .map(|it| it.map(|a| a.ip()).collect())
                .unwrap_or_default(),
            };
            let local = addrs.is_empty()
                || addrs
                    .iter()
                    .any(|ip| ip.to_canonical().is_loopback() || ip.is_unspecified());
            if local {
                ports.push(FarmPort {
                    what: what.clone(),
                    port: *port,
                    ip: None,
                });
            }
            for ip in addrs {
                ports.push(FarmPort {
                    what: what.clone(),
                    port: *port,
                    ip: Some(ip.to_canonical()),
                });
            }
        }
        Policy {
            farm: ports,
            allow,
            deny,
        }
    }

    /// Whether FFmpeg may connect to `addr`; `vouched` when the channel's catalog names the
    /// `host:port` it was resolved from. The error is the sentence for the operator.
    pub fn check(&self, addr: SocketAddr, vouched: bool) -> Result<(), String> {
        let ip = addr.ip().to_canonical();
        let port = addr.port();
        if let Some(f) = self.farm.iter().find(|f| f.matches(ip, port)) {
            return Err(format!("{ip}:{port} is the farm's {}", f.what));
        }
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast || port == 0 {
            return Err(format!("{ip}:{port} is not a unicast address"));
        }
        if let Some(net) = self.deny.iter().find(|n| n.contains(ip)) {
            return Err(format!("{ip} is inside --egress-deny {net}"));
        }
        if is_internal(ip) && !vouched && !self.allow.iter().any(|n| n.contains(ip)) {
            return Err(format!(
                "{ip}:{port} is an internal address the channel's catalog does not name \
                 (an upstream may not send FFmpeg there; --egress-allow opens a network)"
            ));
        }
        Ok(())
    }

    /// Resolves `host:port` and keeps the addresses the policy allows, in resolver order; the
    /// error names why the first one was refused, or that the name does not resolve.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        vouched: bool,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| {
                    Refusal::Unresolved(format!("resolving {host} took longer than {timeout:?}"))
                })?
                .map_err(|e| Refusal::Unresolved(format!("cannot resolve {host}: {e}")))?
                .collect(),
        };
        let mut first_refusal = None;
        let mut ok = Vec::new();
        for a in addrs {
            match self.check(a, vouched) {
                Ok(()) => ok.push(a),
                Err(e) => {
                    first_refusal.get_or_insert(e);
                }
            }
        }
        if ok.is_empty() {
            return Err(match first_refusal {
                Some(why) => Refusal::Refused(why),
                None => Refusal::Unresolved(format!("{host} has no address")),
            });
        }
        Ok(ok)
    }

    /// The check made before a channel starts: a catalog URL naming the farm itself, a denied
    /// network or a non-unicast address is refused. A name that does not resolve now is left to
    /// the run (FFmpeg reports it and the crash loop ends it).
    pub async fn check_source(&self, url: &str, timeout: Duration) -> Result<(), String> {
        let Some((host, port)) = endpoint(url) else {
            return Ok(());
        };
        match self.resolve(&host, port, true, timeout).await {
            Ok(_) | Err(Refusal::Unresolved(_)) => Ok(()),
            Err(Refusal::Refused(why)) => Err(format!("its upstream {host}:{port}: {why}")),
        }
    }
}

/// The `host:port`s a channel's catalog names: internal addresses behind them are the operator's
/// choice, not an upstream's.
pub fn vouched(sources: &[String]) -> HashSet<(String, u16)> {
    sources.iter().filter_map(|u| endpoint(u)).collect()
}

/// A [`Policy`] as plain data: what the node sends its guard, once, at the guard's start. The
/// farm's names are already resolved, so the guard decides exactly as the node would.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    /// `(what, port, ip)`; no ip: every loopback and unspecified address.
    pub farm: Vec<(String, u16, Option<IpAddr>)>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Policy {
    /// The data the guard rebuilds this policy from.
    pub fn spec(&self) -> PolicySpec {
        PolicySpec {
            farm: self
                .farm
                .iter()
                .map(|f| (f.what.clone(), f.port, f.ip))
                .collect(),
            allow: self.allow.iter().map(ToString::to_string).collect(),
            deny: self.deny.iter().map(ToString::to_string).collect(),
        }
    }

    /// Rebuilds a policy from [`Policy::spec`]; a network that does not parse is an error.
    pub fn from_spec(spec: &PolicySpec) -> Result<Policy, String> {
        let nets = |what: &str, list: &[String]| {
            list.iter()
                .map(|s| IpNet::parse(s).map_err(|e| format!("bad {what} network {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Policy {
            farm: spec
                .farm
                .iter()
                .map(|(what, port, ip)| FarmPort {
                    what: what.clone(),
                    port: *port,
                    ip: ip.map(|ip| ip.to_canonical()),
                })
                .collect(),
            allow: nets("allow", &spec.allow)?,
            deny: nets("deny", &spec.deny)?,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        IpNet::parse(s).expect("net")
    }

    /// The farm's Redis on 127.0.0.1:6379 and a sentinel at 10.1.2.3:26379, one allowed and one
    /// denied network.
    pub(in crate::egress) async fn policy() -> Policy {
        Policy::new(
            &[
                ("Redis".into(), "127.0.0.1".into(), 6379),
                ("sentinel".into(), "10.1.2.3".into(), 26379),
            ],
            vec![net("192.168.50.0/24")],
            vec![net("203.0.113.0/24")],
        )
        .await
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// The policy refuses `a` (vouched for by the catalog or not), saying `why`.
    fn refused(p: &Policy, a: &str, vouched: bool, why: &str) {
        let e = p.check(sa(a), vouched).expect_err(a);
        assert!(e.contains(why), "{a}: {e}");
    }

    #[tokio::test]
    async fn the_farm_itself_is_never_reached_in_any_spelling() {
        let p = policy().await;
        for a in [
            "127.0.0.1:6379",
            "127.0.0.2:6379",
            "0.0.0.0:6379",
            "[::1]:6379",
            "[::]:6379",
            "[::ffff:127.0.0.1]:6379",
            "10.1.2.3:26379",
        ] {
            refused(&p, a, true, "the farm's");
        }
        // Another port on the sentinel's host is only an internal address.
        assert!(p.check(sa("10.1.2.3:80"), true).is_ok());
    }

    #[tokio::test]
    async fn internal_addresses_need_the_catalog_or_an_allowed_network() {
        let p = policy().await;
        for a in [
            "127.0.0.1:8080",
            "10.0.0.1:80",
            "172.16.0.1:80",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "[fd00::1]:80",
            "[fe80::1]:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            refused(&p, a, false, "internal address");
            assert!(p.check(sa(a), true).is_ok(), "{a} vouched by the catalog");
        }
        assert!(p.check(sa("192.168.50.7:80"), false).is_ok(), "allowed net");
        assert!(p.check(sa("198.51.100.7:80"), false).is_ok(), "public");
        refused(&p, "203.0.113.9:80", true, "--egress-deny");
        for a in ["224.0.0.1:80", "255.255.255.255:80", "198.51.100.7:0"] {
            assert!(p.check(sa(a), true).is_err(), "{a}");
        }
    }

    #[tokio::test]
    async fn a_policy_survives_the_trip_to_the_guard() {
        let p = policy().await;
        let again = Policy::from_spec(&p.spec()).expect("spec");
        assert_eq!(again.spec(), p.spec());
        for (a, vouched) in [
            ("127.0.0.2:6379", true),
            ("10.1.2.3:26379", true),
            ("10.0.0.1:80", false),
            ("192.168.50.7:80", false),
            ("203.0.113.9:80", true),
            ("198.51.100.7:80", false),
        ] {
            assert_eq!(p.check(sa(a), vouched), again.check(sa(a), vouched), "{a}");
        }
        let bad = PolicySpec {
            deny: vec!["10.0.0.0/99".into()],
            ..PolicySpec::default()
        };
        assert!(Policy::from_spec(&bad)
            .expect_err("bad net")
            .contains("deny"));
    }

    #[test]
    fn endpoints_of_urls() {
        assert_eq!(
            endpoint("http://u:p@Provider.Example/x.ts"),
            Some(("provider.example".into(), 80))
        );
        assert_eq!(endpoint("https://[::1]:8443/a"), Some(("::1".into(), 8443)));
        assert_eq!(endpoint("rtmp://h/live/x"), Some(("h".into(), 1935)));
        assert_eq!(endpoint("udp://239.0.0.1:1234"), None);
        assert_eq!(endpoint("http://h:99999/"), None);
    }
}
