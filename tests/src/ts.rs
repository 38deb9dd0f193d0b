//! Just enough MPEG-TS to loop a file as a live stream and to check a captured stream.
//!
//! Timestamps are 33-bit, 90 kHz. [`shift_packet`] moves a packet's PCR and PES PTS/DTS forward by an
//! offset (mod 2^33); [`ContinuityFixer`] renumbers continuity counters so a looped file has no CC
//! errors; [`check_monotonic`] verifies per-PID timestamps never go backwards (allowing for the wrap).

use std::collections::HashMap;

/// MPEG-TS packet size.
pub const PACKET: usize = 188;
/// Sync byte at the start of every packet.
pub const SYNC: u8 = 0x47;
/// Timestamps wrap at 2^33 ticks of 90 kHz (about 26.5 hours).
pub const TS_WRAP: u64 = 1 << 33;
/// 90 kHz clock.
pub const TS_HZ: u64 = 90_000;

/// PID of a packet (13 bits).
pub fn pid(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2])
}

fn payload_unit_start(p: &[u8]) -> bool {
    p[1] & 0x40 != 0
}

fn has_adaptation(p: &[u8]) -> bool {
    p[3] & 0x20 != 0
}

fn has_payload(p: &[u8]) -> bool {
    p[3] & 0x10 != 0
}

/// Offset of the payload within the packet, if it has one that fits.
fn payload_offset(p: &[u8]) -> Option<usize> {
    if !has_payload(p) {
        return None;
    }
    let off = if has_adaptation(p) {
        5 + usize::from(p[4])
    } else {
        4
    };
    (off < PACKET).then_some(off)
}

/// Byte offset of the 6-byte PCR field, if the packet carries one.
fn pcr_offset(p: &[u8]) -> Option<usize> {
    if !has_adaptation(p) || p[4] == 0 || 5 + usize::from(p[4]) > PACKET {
        return None;
    }
    (p[5] & 0x10 != 0 && p[4] >= 7).then_some(6)
}

/// PCR base (90 kHz part) of the packet, if any.
pub fn pcr(p: &[u8]) -> Option<u64> {
    let o = pcr_offset(p)?;
    Some(
        (u64::from(p[o]) << 25)
            | (u64::from(p[o + 1]) << 17)
            | (u64::from(p[o + 2]) << 9)
            | (u64::from(p[o + 3]) << 1)
            | (u64::from(p[o + 4]) >> 7),
    )
}

fn set_pcr_base(p: &mut [u8], o: usize, base: u64) {
    p[o] = (base >> 25) as u8;
    p[o + 1] = (base >> 17) as u8;
    p[o + 2] = (base >> 9) as u8;
    p[o + 3] = (base >> 1) as u8;
    p[o + 4] = (p[o + 4] & 0x7f) | (((base & 1) as u8) << 7);
}

/// Offsets of the PTS and DTS fields of a PES header starting in this packet.
fn pes_ts_offsets(p: &[u8]) -> (Option<usize>, Option<usize>) {
    if !payload_unit_start(p) {
        return (None, None);
    }
    let Some(o) = payload_offset(p) else {
        return (None, None);
    };
    if o + 14 > PACKET || p[o] != 0 || p[o + 1] != 0 || p[o + 2] != 1 {
        return (None, None);
    }
    let stream_id = p[o + 3];
    // Streams without the optional PES header (padding, private_stream_2, ECM, EMM, DSMCC...).
    if matches!(
        stream_id,
        0xbc | 0xbe | 0xbf | 0xf0 | 0xf1 | 0xf2 | 0xf8 | 0xff
    ) {
        return (None, None);
    }
    let flags = p[o + 7] >> 6;
    let pts = (flags & 0b10 != 0).then_some(o + 9);
    let dts = (flags == 0b11 && o + 19 <= PACKET).then_some(o + 14);
    (pts, dts)
}

fn read_ts(b: &[u8]) -> u64 {
    (u64::from((b[0] >> 1) & 0x07) << 30)
        | (u64::from(b[1]) << 22)
        | (u64::from(b[2] >> 1) << 15)
        | (u64::from(b[3]) << 7)
        | (u64::from(b[4]) >> 1)
}

fn write_ts(b: &mut [u8], v: u64) {
    b[0] = (b[0] & 0xf0) | (((v >> 29) & 0x0e) as u8) | 1;
    b[1] = (v >> 22) as u8;
    b[2] = (((v >> 14) & 0xfe) as u8) | 1;
    b[3] = (v >> 7) as u8;
    b[4] = (((v << 1) & 0xfe) as u8) | 1;
}

/// PES `(PTS, DTS)` of a packet that starts a PES packet.
pub fn pes_timestamps(p: &[u8]) -> (Option<u64>, Option<u64>) {
    let (pts, dts) = pes_ts_offsets(p);
    (pts.map(|o| read_ts(&p[o..])), dts.map(|o| read_ts(&p[o..])))
}

/// Adds `offset` (90 kHz ticks) to the packet's PCR base and PES PTS/DTS, mod 2^33.
pub fn shift_packet(p: &mut [u8], offset: u64) {
    if offset == 0 || p.len() < PACKET || p[0] != SYNC {
        return;
    }
    if let Some(o) = pcr_offset(p) {
        let base = pcr(p).unwrap_or(0);
        set_pcr_base(p, o, (base + offset) % TS_WRAP);
    }
    let (pts, dts) = pes_ts_offsets(p);
    for o in [pts, dts].into_iter().flatten() {
        let v = read_ts(&p[o..]);
        write_ts(&mut p[o..], (v + offset) % TS_WRAP);
    }
}

/// Renumbers continuity counters so they continue across a loop of the same file.
#[derive(Default)]
pub struct ContinuityFixer {
    last: HashMap<u16, u8>,
}

impl ContinuityFixer {
    /// Rewrites the CC of one packet: +1 per packet with payload, unchanged for adaptation-only ones.
    pub fn fix(&mut self, p: &mut [u8]) {
        if p.len() < PACKET || p[0] != SYNC {
            return;
        }
        let pid = pid(p);
        if pid == 0x1fff {
            return;
        }
        let cc = match self.last.get(&pid) {
            None => p[3] & 0x0f,
            Some(last) if has_payload(p) => (last + 1) & 0x0f,
            Some(last) => *last,
        };
        p[3] = (p[3] & 0xf0) | cc;
        self.last.insert(pid, cc);
    }
}

/// Forward distance from `a` to `b` on the 33-bit timestamp circle.
pub fn ts_forward(a: u64, b: u64) -> u64 {
    (b + TS_WRAP - a) % TS_WRAP
}

/// True if `b` is at or after `a`, treating differences of more than 2^32 as going backwards.
pub fn ts_not_before(a: u64, b: u64) -> bool {
    ts_forward(a, b) < TS_WRAP / 2
}

/// Decode timestamps of one PID in a TS buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidTimes {
    /// First and last decode timestamp (DTS if present, else PTS), in stream order.
    pub first: u64,
    pub last: u64,
    /// PES packets with a timestamp.
    pub count: usize,
    /// Smallest positive step between consecutive decode timestamps: a frame duration.
    pub min_step: Option<u64>,
}

impl PidTimes {
    /// `last - first + one frame`: how long this PID's media lasts.
    pub fn span_with_frame(&self) -> u64 {
        ts_forward(self.first, self.last) + self.min_step.unwrap_or(0)
    }
}

/// Timestamp overview of a TS buffer.
#[derive(Debug, Clone, Default)]
pub struct TsScan {
    pub packets: usize,
    pub pes: HashMap<u16, PidTimes>,
    /// Smallest and largest PTS/DTS seen (no wrap handling: for a single file).
    pub min_ts: Option<u64>,
    pub max_ts: Option<u64>,
}

impl TsScan {
    /// What to add to every timestamp so the same data can follow itself: for each PID its span plus
    /// one frame, and at least the overall span plus one tick.
    pub fn loop_offset(&self) -> Option<u64> {
        let overall = self.max_ts? - self.min_ts? + 1;
        let per_pid = self.pes.values().map(PidTimes::span_with_frame).max()?;
        Some(overall.max(per_pid))
    }
}

/// Scans whole packets of `data` (a trailing partial packet is ignored).
pub fn scan(data: &[u8]) -> TsScan {
    let mut out = TsScan::default();
    for p in data.chunks_exact(PACKET) {
        if p[0] != SYNC {
            continue;
        }
        out.packets += 1;
        let (pts, dts) = pes_timestamps(p);
        for v in [pts, dts].into_iter().flatten() {
            out.min_ts = Some(out.min_ts.map_or(v, |m| m.min(v)));
            out.max_ts = Some(out.max_ts.map_or(v, |m| m.max(v)));
        }
        if let Some(d) = dts.or(pts) {
            out.pes
                .entry(pid(p))
                .and_modify(|t| {
                    let step = ts_forward(t.last, d);
                    if step > 0 && step < TS_WRAP / 2 {
                        t.min_step = Some(t.min_step.map_or(step, |m| m.min(step)));
                    }
                    t.last = d;
                    t.count += 1;
                })
                .or_insert(PidTimes {
                    first: d,
                    last: d,
                    count: 1,
                    min_step: None,
                });
        }
    }
    out
}

/// Whole packets of `data` with their index and PID, for the checkers: an error at the first one
/// that lost sync.
fn checked_packets(data: &[u8]) -> impl Iterator<Item = Result<(usize, u16, &[u8]), String>> {
    data.chunks_exact(PACKET).enumerate().map(|(i, p)| {
        if p[0] != SYNC {
            return Err(format!("packet {i}: lost sync (byte 0x{:02x})", p[0]));
        }
        Ok((i, pid(p), p))
    })
}

/// Checks that continuity counters of every PID increase by one per packet with payload.
/// Returns the number of packets checked.
pub fn check_continuity(data: &[u8]) -> Result<usize, String> {
    let mut last: HashMap<u16, u8> = HashMap::new();
    let mut checked = 0;
    for packet in checked_packets(data) {
        let (i, pid, p) = packet?;
        if pid == 0x1fff {
            continue;
        }
        let cc = p[3] & 0x0f;
        if let Some(prev) = last.insert(pid, cc) {
            let want = if has_payload(p) {
                (prev + 1) & 0x0f
            } else {
                prev
            };
            if cc != want {
                return Err(format!("packet {i}: PID {pid} CC {cc}, expected {want}"));
            }
        }
        checked += 1;
    }
    Ok(checked)
}

/// Checks that, per PID, PCR and decode timestamps (DTS, else PTS) never go backwards.
/// Returns how many timestamps were checked.
pub fn check_monotonic(data: &[u8]) -> Result<usize, String> {
    let mut last_dts: HashMap<u16, u64> = HashMap::new();
    let mut last_pcr: HashMap<u16, u64> = HashMap::new();
    let mut checked = 0;
    for packet in checked_packets(data) {
        let (i, pid, p) = packet?;
        if let Some(v) = pcr(p) {
            if let Some(prev) = last_pcr.insert(pid, v) {
                if !ts_not_before(prev, v) {
                    return Err(format!(
                        "packet {i}: PCR on PID {pid} went back {prev} -> {v}"
                    ));
                }
            }
            checked += 1;
        }
        let (pts, dts) = pes_timestamps(p);
        if let Some(v) = dts.or(pts) {
            if let Some(prev) = last_dts.insert(pid, v) {
                if !ts_not_before(prev, v) {
                    return Err(format!(
                        "packet {i}: decode timestamp on PID {pid} went back {prev} -> {v}"
                    ));
                }
            }
            checked += 1;
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_with_pcr_and_pts(pcr_base: u64, pts: u64, dts: u64) -> Vec<u8> {
        let mut p = vec![0xffu8; PACKET];
        p[0] = SYNC;
        p[1] = 0x40 | 0x01; // PUSI, PID 0x100
        p[2] = 0x00;
        p[3] = 0x30; // adaptation + payload, CC 0
        p[4] = 7; // AF length
        p[5] = 0x10; // PCR flag
        set_pcr_base(&mut p, 6, pcr_base);
        p[10] |= 0x7e; // reserved bits
        p[11] = 0;
        let o = 12;
        p[o..o + 4].copy_from_slice(&[0, 0, 1, 0xe0]);
        p[o + 4] = 0;
        p[o + 5] = 0;
        p[o + 6] = 0x80;
        p[o + 7] = 0xc0;
        p[o + 8] = 10;
        p[o + 9] = 0x30;
        write_ts(&mut p[o + 9..], pts);
        p[o + 14] = 0x10;
        write_ts(&mut p[o + 14..], dts);
        p
    }

    #[test]
    fn shift_rewrites_pcr_pts_dts_with_wrap() {
        let mut p = packet_with_pcr_and_pts(TS_WRAP - 10, TS_WRAP - 5, TS_WRAP - 7);
        assert_eq!(pcr(&p), Some(TS_WRAP - 10));
        assert_eq!(pes_timestamps(&p), (Some(TS_WRAP - 5), Some(TS_WRAP - 7)));
        shift_packet(&mut p, 100);
        assert_eq!(pcr(&p), Some(90));
        assert_eq!(pes_timestamps(&p), (Some(95), Some(93)));
        // Marker bits and prefixes survive.
        assert_eq!(p[12 + 9] & 0xf1, 0x31);
        assert_eq!(p[12 + 14] & 0xf1, 0x11);
        assert!(ts_not_before(TS_WRAP - 7, 93));
        assert!(!ts_not_before(93, TS_WRAP - 7));
    }

    #[test]
    fn continuity_counters_continue() {
        let mut fx = ContinuityFixer::default();
        let mut a = packet_with_pcr_and_pts(0, 0, 0);
        a[3] = (a[3] & 0xf0) | 0x0e;
        fx.fix(&mut a);
        assert_eq!(a[3] & 0x0f, 0x0e);
        let mut b = packet_with_pcr_and_pts(0, 0, 0); // CC 0 in the source: becomes 0x0f
        fx.fix(&mut b);
        assert_eq!(b[3] & 0x0f, 0x0f);
        let mut c = packet_with_pcr_and_pts(0, 0, 0);
        fx.fix(&mut c);
        assert_eq!(c[3] & 0x0f, 0);
    }
}
