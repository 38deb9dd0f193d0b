//! `farm_coordinator::ctl::import::m3u::parse` on any text: never panics; what it accepts is safe for the catalog
//! (valid and unique ids, valid URLs, no control characters); every error names a line that exists.
#![no_main]

use farm_coordinator::ctl::import::m3u;
use farm_proto::validate::{self, DEFAULT_ALLOWED_SCHEMES};
use farm_tests::abuse::m3u_line_count;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match m3u::parse(&text, DEFAULT_ALLOWED_SCHEMES) {
        Ok(channels) => {
            let mut ids = HashSet::new();
            for c in &channels {
                assert!(validate::channel_id(&c.id).is_ok(), "{c:?}");
                assert!(
                    validate::upstream_url(&c.url, DEFAULT_ALLOWED_SCHEMES).is_ok(),
                    "{c:?}"
                );
                assert!(ids.insert(c.id.clone()), "duplicate {c:?}");
                assert!(!c.name.chars().any(char::is_control), "{c:?}");
                assert!(!c.group.chars().any(char::is_control), "{c:?}");
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            let max = m3u_line_count(&text);
            for e in &errors {
                assert!((1..=max).contains(&e.line), "{e} beyond line {max}");
            }
            assert!(errors.windows(2).all(|w| w[0].line <= w[1].line));
        }
    }
});
