//! Channel ids from free-form names: the slug the importer derives from tvg-id, tvg-name or the title.

/// The longest channel id a slug may produce (the channel-id rule's limit).
pub const MAX_ID_LEN: usize = 64;

/// Turns a free-form name into a channel id: ASCII letters lowercased, digits and `_` kept,
/// common accented Latin, Greek and Cyrillic letters transliterated, other letters dropped, runs of
/// anything else become one `-`; no leading or trailing `-`; at most [`MAX_ID_LEN`] bytes. May be
/// empty; a non-empty result is always a valid channel id.
///
/// `"BBC One HD"` → `bbc-one-hd`, `"bbc1.uk"` → `bbc1-uk`, `"Das Erste (Österreich)"` →
/// `das-erste-oesterreich`, `"Первый канал"` → `pervyj-kanal`.
pub fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_ID_LEN));
    let mut gap = false;
    let mut buf = [0u8; 4];
    for c in s.chars() {
        let piece: &str = if c.is_ascii_alphanumeric() || c == '_' {
            c.to_ascii_lowercase().encode_utf8(&mut buf)
        } else if let Some(t) = transliterate(c) {
            t
        } else if c.is_alphanumeric() || is_combining_mark(c) {
            "" // a letter we cannot spell in ASCII: dropped, no separator
        } else {
            gap = true;
            continue;
        };
        if piece.is_empty() {
            continue;
        }
        if gap && !out.is_empty() {
            if out.len() + 1 >= MAX_ID_LEN {
                break;
            }
            out.push('-');
        }
        gap = false;
        if out.len() + piece.len() > MAX_ID_LEN {
            break;
        }
        out.push_str(piece);
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

fn is_combining_mark(c: char) -> bool {
    matches!(c, '\u{0300}'..='\u{036f}')
}

/// ASCII spellings of common non-ASCII letters (lowercase): each row's letters and their spelling.
const TRANSLITERATIONS: &[(&str, &str)] = &[
    // Latin-1 and Latin Extended-A ('i' is the lowercase of 'İ')
    ("i", "i"),
    ("àáâãåāăą", "a"),
    ("äæ", "ae"),
    ("çćĉċč", "c"),
    ("ďđð", "d"),
    ("èéêëēĕėęě", "e"),
    ("ĝğġģ", "g"),
    ("ĥħ", "h"),
    ("ìíîïĩīĭįı", "i"),
    ("ĵ", "j"),
    ("ķ", "k"),
    ("ĺļľŀł", "l"),
    ("ñńņň", "n"),
    ("òóôõōŏő", "o"),
    ("öøœ", "oe"),
    ("ŕŗř", "r"),
    ("śŝşšș", "s"),
    ("ß", "ss"),
    ("ţťŧț", "t"),
    ("þ", "th"),
    ("ùúûũūŭůűų", "u"),
    ("ü", "ue"),
    ("ŵ", "w"),
    ("ýÿŷ", "y"),
    ("źżž", "z"),
    // Greek
    ("αά", "a"),
    ("β", "v"),
    ("γ", "g"),
    ("δ", "d"),
    ("εέ", "e"),
    ("ζ", "z"),
    ("ηή", "i"),
    ("θ", "th"),
    ("ιίϊΐ", "i"),
    ("κ", "k"),
    ("λ", "l"),
    ("μ", "m"),
    ("ν", "n"),
    ("ξ", "x"),
    ("οό", "o"),
    ("π", "p"),
    ("ρ", "r"),
    ("σς", "s"),
    ("τ", "t"),
    ("υύϋΰ", "y"),
    ("φ", "f"),
    ("χ", "ch"),
    ("ψ", "ps"),
    ("ωώ", "o"),
    // Cyrillic (Russian, Ukrainian, Belarusian, Serbian, Bulgarian)
    ("а", "a"),
    ("б", "b"),
    ("в", "v"),
    ("гґ", "g"),
    ("д", "d"),
    ("ђ", "dj"),
    ("еёєэ", "e"),
    ("ж", "zh"),
    ("з", "z"),
    ("иії", "i"),
    ("ы", "y"),
    ("йј", "j"),
    ("к", "k"),
    ("л", "l"),
    ("љ", "lj"),
    ("м", "m"),
    ("н", "n"),
    ("њ", "nj"),
    ("о", "o"),
    ("п", "p"),
    ("р", "r"),
    ("с", "s"),
    ("т", "t"),
    ("ћ", "c"),
    ("уў", "u"),
    ("ф", "f"),
    ("х", "h"),
    ("ц", "c"),
    ("ч", "ch"),
    ("џ", "dz"),
    ("ш", "sh"),
    ("щ", "shch"),
    ("ю", "ju"),
    ("я", "ja"),
    ("ъь", ""),
];

/// ASCII spelling of common non-ASCII letters (lowercase), `None` for anything else.
fn transliterate(c: char) -> Option<&'static str> {
    let lower = c.to_lowercase().next().unwrap_or(c);
    TRANSLITERATIONS
        .iter()
        .find(|(letters, _)| letters.contains(lower))
        .map(|(_, ascii)| *ascii)
}
