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
//!
//! Parts: `policy` (who may be reached; the node asks it too, before a start), `peer` (who is
//! connecting), `limits` (what a channel may spend, and the reports), `request` (FFmpeg's request
//! head and the credential rewrite), and the gateway itself: `gateway` (its life: the listener,
//! who is let in, the fence) and `relay` (one request through it). The first four know nothing of
//! the gateway; the guard plugs its fence clock in through [`Fence`], and nothing here knows the
//! guard or the node.

mod gateway;
mod limits;
pub mod peer;
mod policy;
mod relay;
mod request;
#[cfg(test)]
mod tests;

pub use gateway::{Fence, Gateway, GatewayConfig, MAX_CONNECTIONS};
pub use limits::{EventSink, GatewayEvent, LimitKind, Limits};
pub use policy::{endpoint, is_internal, proxied, scheme, vouched, Policy, PolicySpec, Refusal};
