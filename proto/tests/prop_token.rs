//! Property tests for signed playback tokens (`farm_proto::token`): a minted token opens its own
//! channel (and client, when bound) until it expires and nothing else; every single-byte change
//! to it is refused, so a token has exactly one spelling; arbitrary strings never panic the
//! verifier.

use farm_proto::token::{self, TokenError};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig::with_cases(farm_proto::proptest_cases(cases))
}

fn secret() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 16..64)
}

fn channel() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn client() -> impl Strategy<Value = String> {
    prop_oneof![
        "(25[0-5]|2[0-4][0-9]|1?[0-9]{1,2})(\\.(25[0-5]|2[0-4][0-9]|1?[0-9]{1,2})){3}",
        "[0-9a-f:]{2,39}",
    ]
}

/// A minted token with what it was minted for.
#[derive(Debug, Clone)]
struct Minted {
    secret: Vec<u8>,
    channel: String,
    expiry: u64,
    client: Option<String>,
    token: String,
}

fn minted() -> impl Strategy<Value = Minted> {
    (
        secret(),
        channel(),
        1u64..=999_999_999_999,
        prop::option::of(client()),
    )
        .prop_map(|(secret, channel, expiry, client)| {
            let token = token::mint(&secret, &channel, expiry, client.as_deref())
                .expect("a 16-byte secret mints");
            Minted {
                secret,
                channel,
                expiry,
                client,
                token,
            }
        })
}

impl Minted {
    fn verify_at(&self, token: &str, now: u64) -> Result<(), TokenError> {
        token::verify(
            &self.secret,
            token,
            &self.channel,
            now,
            self.client.as_deref().unwrap_or("203.0.113.9"),
        )
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn a_minted_token_opens_its_channel_and_client_until_it_expires(
        m in minted(),
        before in any::<prop::sample::Index>(),
        after in 0u64..1_000_000,
    ) {
        let now = before.index(m.expiry as usize) as u64; // 0 ..= expiry - 1
        prop_assert_eq!(m.verify_at(&m.token, now), Ok(()), "{:?}", m);
        prop_assert_eq!(m.verify_at(&m.token, m.expiry + after), Err(TokenError::Expired));
        prop_assert!(token::looks_like_token(&m.token), "the router must see it as a token: {}", m.token);
    }

    #[test]
    fn a_token_opens_no_other_channel_client_or_secret(
        m in minted(),
        other_channel in channel(),
        other_client in client(),
        other_secret in secret(),
    ) {
        let now = m.expiry - 1;
        if other_channel != m.channel {
            prop_assert_eq!(
                token::verify(&m.secret, &m.token, &other_channel, now, m.client.as_deref().unwrap_or("")),
                Err(TokenError::BadSignature)
            );
        }
        if let Some(c) = &m.client {
            if other_client != *c {
                prop_assert_eq!(
                    token::verify(&m.secret, &m.token, &m.channel, now, &other_client),
                    Err(TokenError::BadSignature)
                );
            }
        } else {
            // An any-client token works from every address.
            prop_assert_eq!(token::verify(&m.secret, &m.token, &m.channel, now, &other_client), Ok(()));
        }
        if other_secret != m.secret {
            prop_assert_eq!(
                token::verify(&other_secret, &m.token, &m.channel, now, m.client.as_deref().unwrap_or("")),
                Err(TokenError::BadSignature)
            );
        }
    }
}

proptest! {
    // Each case tries all 255 other values of every byte (about 12,000 verifications).
    #![proptest_config(config(64))]

    #[test]
    fn every_single_byte_change_is_refused(m in minted()) {
        let now = m.expiry - 1;
        let bytes = m.token.as_bytes();
        for i in 0..bytes.len() {
            for b in 0..=255u8 {
                if b == bytes[i] {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[i] = b;
                let Ok(changed) = String::from_utf8(changed) else { continue };
                let got = m.verify_at(&changed, now);
                prop_assert!(
                    got.is_err(),
                    "token {:?} with byte {} changed to {:?} still verifies as {:?}",
                    m.token, i, b as char, changed
                );
            }
        }
        // Dropping or adding a byte is refused too.
        for i in 0..bytes.len() {
            let mut shorter = bytes.to_vec();
            shorter.remove(i);
            let shorter = String::from_utf8(shorter).expect("ASCII");
            prop_assert!(m.verify_at(&shorter, now).is_err(), "{:?}", shorter);
        }
        for extra in ["0", ".", "a", " ", "\n"] {
            let appended = format!("{}{}", m.token, extra);
            let prepended = format!("{}{}", extra, m.token);
            prop_assert!(m.verify_at(&appended, now).is_err(), "{:?}", appended);
            prop_assert!(m.verify_at(&prepended, now).is_err(), "{:?}", prepended);
        }
    }
}

/// Token-shaped noise: the token alphabet plus signs, spaces, case and multi-byte characters.
fn token_noise() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "0",
        "1",
        "9",
        "a",
        "c",
        "f",
        "A",
        "F",
        "x",
        ".",
        "..",
        "+",
        "-",
        " ",
        "\u{0}",
        "é",
        "日",
        "99999999999999999999",
        "4294967296",
        "18446744073709551616",
        "00000000000000000000000000000000",
    ]);
    prop::collection::vec(piece, 0..48).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_strings_never_panic_and_never_verify(
        t in prop_oneof![token_noise(), any::<String>()],
        channel in prop_oneof![channel(), any::<String>()],
        client in any::<String>(),
        now in any::<u64>(),
        secret in prop_oneof![secret(), prop::collection::vec(any::<u8>(), 0..16)],
    ) {
        // Guessing a 128-bit signature never succeeds; the point is that nothing panics.
        prop_assert!(token::verify(&secret, &t, &channel, now, &client).is_err(), "{:?}", t);
        let _ = token::looks_like_token(&t);
    }

    #[test]
    fn minting_never_panics(
        secret in prop::collection::vec(any::<u8>(), 0..64),
        channel in any::<String>(),
        expiry in any::<u64>(),
        client in prop::option::of(any::<String>()),
    ) {
        match token::mint(&secret, &channel, expiry, client.as_deref()) {
            Ok(t) => prop_assert!(secret.len() >= 16 && t.len() <= 128, "{}", t),
            Err(e) => prop_assert_eq!(e, TokenError::WeakSecret),
        }
    }
}
