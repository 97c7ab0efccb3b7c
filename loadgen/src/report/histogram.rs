//! Latency histograms kept whole in `report.json`, so that the `.hgrm`
//! files and the latency chart can be drawn again from the report alone.
//! Each is in HdrHistogram's V2 compressed encoding, base64: the form
//! HdrHistogram's interval logs use (`HISTFAAA...`), so its own tools read
//! it too. Values are microseconds.

use std::io::Cursor;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Commit returned → message received (e2e).
pub const COMMIT_TO_RECEIVE: &str = "latency_commit_to_receive";
/// Commit returned → the broker's append time (e2e, when the broker
/// stamped it).
pub const COMMIT_TO_APPEND: &str = "latency_commit_to_append";
/// Due time (or start) → message received (e2e).
pub const INTENDED_TO_RECEIVE: &str = "latency_intended_to_receive";
/// Begin → commit of each transaction (e2e and write-only runs).
pub const TRANSACTION: &str = "latency_transaction";
/// Send → acknowledgement (broker ceiling).
pub const SEND_TO_ACK: &str = "latency_send_to_ack";

/// One histogram of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// What it measures (one of the constants above), also the stem of
    /// its `.hgrm` file.
    pub name: String,
    /// HdrHistogram V2 with deflate, base64.
    pub v2_deflate_base64: String,
}

impl Recorded {
    pub fn new(name: &str, h: &Histogram<u64>) -> Result<Self> {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(h, &mut bytes)
            .with_context(|| format!("encoding histogram {name}"))?;
        Ok(Self {
            name: name.to_string(),
            v2_deflate_base64: encode(&bytes),
        })
    }

    /// The histogram, as recorded.
    pub fn histogram(&self) -> Result<Histogram<u64>> {
        let bytes = decode(&self.v2_deflate_base64)
            .with_context(|| format!("histogram {}: not base64", self.name))?;
        Deserializer::new()
            .deserialize(&mut Cursor::new(bytes))
            .map_err(|e| anyhow!("histogram {}: {e}", self.name))
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (written here: one short function is less
/// than a dependency for it).
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn decode(text: &str) -> Result<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            bail!("unexpected character {:?}", char::from(c));
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hgrm::percentile_distribution;

    #[test]
    fn base64_round_trips() {
        for (bytes, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(bytes), text);
            assert_eq!(decode(text).unwrap(), bytes);
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)).unwrap(), all);
        assert!(decode("Zm9v!").is_err());
    }

    #[test]
    fn a_recorded_histogram_draws_the_same_distribution() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in (1..=20_000u64).map(|i| i * i % 900_000 + 100) {
            h.record(us).unwrap();
        }
        let r = Recorded::new(TRANSACTION, &h).expect("encoded");
        assert!(
            r.v2_deflate_base64.starts_with("HISTF"),
            "{}",
            r.v2_deflate_base64
        );
        let back = r.histogram().expect("decoded");
        assert_eq!(back.len(), h.len());
        assert_eq!(percentile_distribution(&back), percentile_distribution(&h));
        let empty = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        let r = Recorded::new(TRANSACTION, &empty).unwrap();
        assert_eq!(
            percentile_distribution(&r.histogram().unwrap()),
            percentile_distribution(&empty)
        );
    }
}
