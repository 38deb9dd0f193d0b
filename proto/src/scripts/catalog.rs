//! farmctl's scripted catalog write.

use super::{call, invoke};

call! {
    /// `pin.lua`: set or clear channel `id`'s `pinned` flag, only if it is in the catalog, and keep
    /// `farm:pinned` in step.
    ///
    /// KEYS: channel, pinned. ARGV: "1" pin / "0" unpin, channel. Replies `true` when written,
    /// `false` when the channel is not in the catalog (nothing created).
    pub struct Pin<'a>: PIN -> bool {
        pub id: &'a str,
        pub pinned: bool,
    }

    fn invocation(&self, k) {
        let flag = if self.pinned { "1" } else { "0" };
        invoke!(keys: k.channel(self.id), k.pinned(); args: flag, self.id)
    }
}
