//! Where FFmpeg may connect: the egress policy and the per-channel gateway.
//!
//! An upstream chosen by the catalog is trusted as far as the operator wrote it; what the upstream
//! itself says (URIs inside an HLS playlist, a redirect) is not. So every FFmpeg that reads an
//! `http`/`https` upstream gets `-http_proxy` pointing at its own [`Gateway`], a tiny HTTP forward
//! proxy on 127.0.0.1 run by the node's guard process, which resolves each destination itself and
//! asks the [`Policy`]; with the Landlock sandbox (see `sandbox`) FFmpeg cannot open a TCP
//! connection to anything but that port, so no URI spelling gets around it.
//!
//! Invariants: the farm's own Redis, sentinels and node ports are never reached, whatever the
//! catalog says; internal addresses (loopback, private, link-local, shared) are reached only
//! through a `host:port` the channel's catalog names, or inside a network the operator allowed
//! (`--egress-allow`); `--egress-deny` networks and non-unicast addresses never. The decision is
//! made on resolved addresses, and the gateway connects to exactly the address it checked.
//!
//! Each gateway also caps what an upstream can make its channel cost ([`Limits`]: response head
//! size and time, bandwidth, request rate) and serves only its channel's own FFmpeg ([`peer`]).

mod gateway;
pub mod peer;
mod policy;

pub use gateway::{
    EventSink, Gateway, GatewayConfig, GatewayEvent, LimitKind, Limits, MAX_CONNECTIONS,
};
pub use policy::{endpoint, is_internal, proxied, scheme, vouched, Policy, PolicySpec, Refusal};
