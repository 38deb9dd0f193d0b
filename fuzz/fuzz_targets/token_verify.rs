//! Playback tokens: `verify` never panics on any token, channel or client; a token minted from the
//! input and then changed at one byte never verifies (a token has exactly one spelling).
#![no_main]

use arbitrary::Arbitrary;
use farm_proto::token;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    secret: &'a [u8],
    channel: &'a str,
    client: &'a str,
    bound: bool,
    expiry: u64,
    now: u64,
    /// Verified as is.
    raw_token: &'a str,
    /// Where and to what one byte of the minted token is changed.
    at: usize,
    byte: u8,
}

fuzz_target!(|input: Input<'_>| {
    let _ = token::verify(
        input.secret,
        input.raw_token,
        input.channel,
        input.now,
        input.client,
    );
    let _ = token::looks_like_token(input.raw_token);

    let expiry = input.expiry % 1_000_000_000_000;
    let client = input.bound.then_some(input.client);
    let Ok(minted) = token::mint(input.secret, input.channel, expiry, client) else {
        assert!(input.secret.len() < 16);
        return;
    };
    let now = input.now % expiry.max(1);
    if expiry > 0 {
        assert_eq!(
            token::verify(input.secret, &minted, input.channel, now, input.client),
            Ok(()),
            "{minted}"
        );
    }
    let mut changed = minted.clone().into_bytes();
    let at = input.at % changed.len();
    if changed[at] == input.byte {
        return;
    }
    changed[at] = input.byte;
    let Ok(changed) = String::from_utf8(changed) else {
        return;
    };
    assert!(
        token::verify(input.secret, &changed, input.channel, now, input.client).is_err(),
        "{minted:?} changed at byte {at} to {changed:?} still verifies"
    );
});
