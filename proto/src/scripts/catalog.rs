//! farmctl's scripted catalog write.

use super::{flag, Call, Invocation, ReplyError};
use crate::Keys;
use redis::Value;

/// `pin.lua`: set or clear channel `id`'s `pinned` flag, only if it is in the catalog, and keep
/// `farm:pinned` in step.
///
/// KEYS: channel, pinned. ARGV: "1" pin / "0" unpin, channel. Replies `true` when written, `false`
/// when the channel is not in the catalog (nothing created).
#[derive(Debug, Clone)]
pub struct Pin<'a> {
    pub id: &'a str,
    pub pinned: bool,
}

impl Call for Pin<'_> {
    type Reply = bool;
    const FILE: &'static str = "pin.lua";
    fn invocation(&self, k: &Keys) -> Invocation {
        Invocation::new(&super::PIN)
            .key(k.channel(self.id))
            .key(k.pinned())
            .arg(if self.pinned { "1" } else { "0" })
            .arg(self.id)
    }
    fn parse(reply: Value) -> Result<bool, ReplyError> {
        flag(Self::FILE, reply)
    }
}
