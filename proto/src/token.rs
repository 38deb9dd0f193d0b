//! Signed playback tokens: a path element (`/live/<token>/<id>/...`) so that the relative segment
//! URIs in a playlist inherit it.
//!
//! Format: `<expiry>.<scope>.<sig>`: expiry in Unix seconds; scope `a` (any client) or `c` (bound
//! to one client address); sig = the first 16 bytes of HMAC-SHA256(secret,
//! "v1\n<channel>\n<expiry>\n<scope>\n<client or empty>") in hex. A token for one channel never opens
//! another, an expired one is refused, and any changed character breaks the signature.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt::Write as _;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

const SIG_BYTES: usize = 16;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed playback token")]
    Malformed,
    #[error("playback token expired")]
    Expired,
    #[error("playback token is not valid for this channel or client")]
    BadSignature,
    #[error("token secret must be at least 16 bytes")]
    WeakSecret,
}

fn mac(
    secret: &[u8],
    channel: &str,
    expiry: u64,
    scope: char,
    client: &str,
) -> Result<HmacSha256, TokenError> {
    if secret.len() < 16 {
        return Err(TokenError::WeakSecret);
    }
    let mut m = HmacSha256::new_from_slice(secret).map_err(|_| TokenError::WeakSecret)?;
    m.update(format!("v1\n{channel}\n{expiry}\n{scope}\n{client}").as_bytes());
    Ok(m)
}

/// Mints a token for `channel` valid until `expiry` (Unix seconds), optionally bound to a client address.
pub fn mint(
    secret: &[u8],
    channel: &str,
    expiry: u64,
    client: Option<&str>,
) -> Result<String, TokenError> {
    let scope = if client.is_some() { 'c' } else { 'a' };
    let sig = mac(secret, channel, expiry, scope, client.unwrap_or(""))?
        .finalize()
        .into_bytes();
    let mut out = format!("{expiry}.{scope}.");
    for b in &sig[..SIG_BYTES] {
        let _ = write!(out, "{b:02x}");
    }
    Ok(out)
}

/// Verifies a token for `channel` at time `now` (Unix seconds) from client address `client`.
pub fn verify(
    secret: &[u8],
    token: &str,
    channel: &str,
    now: u64,
    client: &str,
) -> Result<(), TokenError> {
    if token.len() > 128 {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(exp), Some(scope), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    // Canonical decimal only (no leading zero): one token has exactly one spelling.
    if exp.is_empty()
        || exp.len() > 12
        || (exp.len() > 1 && exp.starts_with('0'))
        || !exp.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(TokenError::Malformed);
    }
    let expiry: u64 = exp.parse().map_err(|_| TokenError::Malformed)?;
    let scope = match scope {
        "a" => 'a',
        "c" => 'c',
        _ => return Err(TokenError::Malformed),
    };
    // Lowercase hex only: one token has exactly one spelling (no 'A' for 'a').
    if sig.len() != SIG_BYTES * 2
        || !sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(TokenError::Malformed);
    }
    let mut bytes = [0u8; SIG_BYTES];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(sig.get(2 * i..2 * i + 2).ok_or(TokenError::Malformed)?, 16)
            .map_err(|_| TokenError::Malformed)?;
    }
    let client = if scope == 'c' { client } else { "" };
    // Check the signature before the expiry, so a forged token never learns anything from timing.
    mac(secret, channel, expiry, scope, client)?
        .verify_truncated_left(&bytes)
        .map_err(|_| TokenError::BadSignature)?;
    if expiry <= now {
        return Err(TokenError::Expired);
    }
    Ok(())
}

/// Whether a path element looks like a token (cheap pre-check before routing).
pub fn looks_like_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-secret";

    #[test]
    fn a_minted_token_opens_its_channel_until_it_expires() {
        let t = mint(SECRET, "bbc1", 1_000, None).expect("mint");
        assert_eq!(verify(SECRET, &t, "bbc1", 999, "1.2.3.4"), Ok(()));
        assert_eq!(
            verify(SECRET, &t, "bbc1", 1_000, "1.2.3.4"),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(SECRET, &t, "bbc2", 999, "1.2.3.4"),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"another-secret-of-16", &t, "bbc1", 999, ""),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn client_bound_tokens_check_the_address() {
        let t = mint(SECRET, "bbc1", 1_000, Some("10.0.0.7")).expect("mint");
        assert_eq!(verify(SECRET, &t, "bbc1", 10, "10.0.0.7"), Ok(()));
        assert_eq!(
            verify(SECRET, &t, "bbc1", 10, "10.0.0.8"),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let t = mint(SECRET, "c", 5_000, None).expect("mint");
        for i in 0..t.len() {
            for repl in ['0', '9', 'a', 'f', '.', 'x'] {
                let mut b: Vec<char> = t.chars().collect();
                if b[i] == repl {
                    continue;
                }
                b[i] = repl;
                let tampered: String = b.into_iter().collect();
                assert!(verify(SECRET, &tampered, "c", 1, "").is_err(), "{tampered}");
            }
        }
        // Extending the expiry breaks the signature.
        let longer = t.replacen("5000", "9000", 1);
        assert_eq!(
            verify(SECRET, &longer, "c", 1, ""),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 60) as usize;
            let s: String = (0..len)
                .map(|i| (b"0123456789abcdef.ac-x"[((x >> (i % 50)) % 21) as usize]) as char)
                .collect();
            let _ = verify(SECRET, &s, "c", 1, "");
        }
        assert_eq!(mint(b"short", "c", 1, None), Err(TokenError::WeakSecret));
    }
}
