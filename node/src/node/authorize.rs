//! Playback authorization: the one place that decides what a playback path may name. Viewer
//! requests, nginx's `auth_request` hook and the access socket all come through here.

use super::Refusal;
use crate::config::Config;
use farm_proto::validate::{self, HlsFile};

/// A playback request that passed validation and, when signed URLs are on, the token check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Playback {
    pub id: String,
    pub file: String,
    pub kind: HlsFile,
}

/// Checks the path elements after `/live/`: `<id>/<file>`, or `<token>/<id>/<file>` when signed
/// URLs are on.
pub fn authorize(cfg: &Config, parts: &[&str], client: &str) -> Result<Playback, Refusal> {
    let check = |id: &str, file: &str| -> Result<Playback, Refusal> {
        validate::channel_id(id).map_err(|e| Refusal::BadPath(e.to_string()))?;
        let kind = validate::hls_file(file).map_err(|e| Refusal::BadPath(e.to_string()))?;
        Ok(Playback {
            id: id.to_string(),
            file: file.to_string(),
            kind,
        })
    };
    match (&cfg.token_secret, parts) {
        (None, [id, file]) => check(id, file),
        (None, [_, _, _]) => Err(Refusal::NoSuchPath(
            "no such path: signed playback URLs are off",
        )),
        (Some(_), [_, _]) => Err(Refusal::TokenRequired),
        (Some(secret), [token, id, file]) => {
            let p = check(id, file)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            farm_proto::token::verify(secret.as_bytes(), token, id, now, client)
                .map_err(|e| Refusal::BadToken(e.to_string()))?;
            Ok(p)
        }
        _ => Err(Refusal::NoSuchPath("no such path")),
    }
}

/// [`authorize`] for a whole URI (`/live/...`, query ignored), as nginx reports it.
pub fn authorize_uri(cfg: &Config, uri: &str, client: &str) -> Result<Playback, Refusal> {
    let path = uri.split(['?', '#']).next().unwrap_or("");
    let rest = path
        .strip_prefix("/live/")
        .ok_or(Refusal::NoSuchPath("not a playback path"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    authorize(cfg, &parts, client)
}
