//! Why the node refuses a request, in the node's words: a playback path it does not allow, a
//! channel it cannot start, serve or route here, a client past its limits, an admin call without
//! its token. The HTTP layer gives each reason its status, its sentence and its redirect in one
//! place (`crate::http::refusal`); nothing here knows HTTP.

use std::time::Duration;

/// A node's public base URL (`http://host:port`, as its heartbeat records it) and the
/// `host:port` part of it, which nginx's internal owner location is keyed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUrl {
    base: String,
    authority: String,
}

impl NodeUrl {
    pub fn new(base: String) -> Self {
        let authority = base
            .split_once("://")
            .map_or(base.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        Self { base, authority }
    }
    /// The URL as the node published it.
    pub fn base(&self) -> &str {
        &self.base
    }
    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

/// The node's reasons to refuse a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    // The playback path.
    /// A path element (channel id, file name) is malformed.
    BadPath(String),
    /// The path names nothing this node serves (`why` says what was expected).
    NoSuchPath(&'static str),
    /// Signed playback URLs are on and the path has no token.
    TokenRequired,
    /// The token does not allow this path (expired, forged, another client's).
    BadToken(String),
    /// A playlist name other than the channel's one.
    NoSuchPlaylist { file: String },
    /// A segment that is not (or no longer) on disk.
    SegmentGone { id: String, file: String },
    /// `_HLS_msn` is not a number.
    BadMsn { value: String },
    /// `_HLS_part`: no partial segments here.
    NoPartials,

    // The client.
    /// The client used up its requests that would start a channel (`rate` a second, `burst` at
    /// once); it may try again after `wait`.
    FirstRequestsLimited {
        rate: u32,
        burst: u32,
        wait: Duration,
    },
    /// The admin API is off (no token configured).
    AdminDisabled,
    /// A missing or wrong admin token.
    AdminUnauthorized,
    /// Too many wrong admin tokens from this address: it waits `wait` first.
    AdminThrottled { wait: Duration },
    /// An admin stop of a channel this node does not run.
    NotHere { id: String },

    // Where the channel runs.
    /// Another node runs the channel: the viewer goes there.
    Owned(NodeUrl),
    /// This node has no room (or is draining); a live node with room should start the channel.
    Forwarded(NodeUrl),
    /// The channel's lease is held by a node whose heartbeat is gone.
    OwnerAway { id: String, owner: String },
    /// Its owner is known but has no reachable address (a segment request).
    OwnerUnreachable { id: String },
    /// Nobody runs it; only a playlist request starts a channel.
    NotRunning { id: String },
    /// Redis could not say where the channel runs.
    Unlocatable { id: String, why: String },

    // Starting it here.
    /// The catalog does not know the channel.
    UnknownChannel { id: String },
    /// Redis did not answer as expected while starting (the error itself is logged).
    StoreUnavailable { id: String },
    /// The catalog entry cannot start as it is (an upstream URL, a provider, a profile).
    BadCatalog { id: String, why: String },
    /// Too little free space on the HLS folder.
    DiskLow {
        id: String,
        free: u64,
        min_free: u64,
    },
    /// An earlier run on this node still holds the lease.
    HeldHere { id: String },
    /// The lease was released elsewhere a moment ago; that node stops the channel first.
    JustReleased { id: String, node: String },
    /// This node is full and no live node has room.
    FarmFull {
        id: String,
        node: String,
        running: u64,
        capacity: u32,
    },
    /// The request was forwarded to nodes with room as often as allowed and none took it.
    NoRoomAfterForwards,
    /// This node drains and no other node has room.
    DrainingNoRoom { id: String, node: String },
    /// The provider account has no free connection.
    ProviderFull {
        id: String,
        provider: String,
        max: u64,
    },
    /// Redis restarted empty and the farm is recovering.
    Recovering { id: String },
    /// This node's first heartbeat has not reached Redis yet.
    Registering { id: String, node: String },
    /// A drain's handover lost a race: the lease is now `lease` (or free).
    HandoverStale {
        id: String,
        from: String,
        lease: Option<String>,
    },
    /// A drain's handover found this node full.
    HandoverFull {
        id: String,
        from: String,
        running: u64,
    },
    /// No start slot within `start_timeout`: `busy` other channels are starting.
    NoStartSlot {
        id: String,
        node: String,
        busy: u32,
        waited: Duration,
    },
    /// The node is shutting down.
    ShuttingDown,

    // Serving it here.
    /// The channel ended in a crash loop (`reason` is what viewers may read); retry after `hold`.
    Failed { reason: String, hold: Duration },
    /// No segment yet after `waited`.
    StartTimeout { id: String, waited: Duration },
    /// The channel is stopping here.
    Stopping { id: String },
    /// A blocking reload asks for a segment beyond the next ones.
    BeyondNext { id: String, want: u64, last: u64 },
}

#[cfg(test)]
mod tests {
    use super::NodeUrl;

    #[test]
    fn a_node_url_knows_its_host_and_port() {
        for (base, authority) in [
            ("http://10.0.0.2:8080", "10.0.0.2:8080"),
            ("http://10.0.0.2:8080/", "10.0.0.2:8080"),
            ("https://[::1]:443/farm", "[::1]:443"),
            ("node-b:8080", "node-b:8080"),
        ] {
            assert_eq!(NodeUrl::new(base.into()).authority(), authority, "{base}");
        }
    }
}
