//! farmctl's scripted catalog write.

use super::{invoke, Call, Invocation};
use crate::keys::Keys;

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
        let flag = if self.pinned { "1" } else { "0" };
        invoke!(PIN; keys: k.channel(self.id), k.pinned(); args: flag, self.id)
    }
}
