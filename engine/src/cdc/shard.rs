//! The shard of an aggregate, computed as the outbox's generated `shard`
//! column computes it: `(hashtextextended(aggregate_id, 0) & (2^63 - 1)) %
//! shards`. PostgreSQL 15 leaves generated columns out of logical
//! replication, so the CDC source recomputes it from `aggregate_id`.
//!
//! `hashtextextended` under a deterministic collation hashes the text's
//! bytes with `hash_bytes_extended` (Bob Jenkins' lookup3, in PostgreSQL's
//! `src/common/hashfn.c`), reading the bytes as little-endian words on
//! little-endian machines. The integration tests compare this with the
//! server's own result for many keys.

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

fn word(k: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w[..k.len().min(4)].copy_from_slice(&k[..k.len().min(4)]);
    u32::from_le_bytes(w)
}

/// PostgreSQL's `hash_bytes_extended(k, len, seed)`.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let len = k.len() as u32;
    let init = 0x9e37_79b9u32.wrapping_add(len).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    let mut rest = k;
    while rest.len() >= 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    // The last 0-11 bytes; the lowest byte of c is left for the length.
    let n = rest.len();
    if n > 8 {
        c = c.wrapping_add(word(&rest[8..]) << 8);
    }
    if n > 4 {
        b = b.wrapping_add(word(&rest[4..n.min(8)]));
    }
    if n > 0 {
        a = a.wrapping_add(word(&rest[..n.min(4)]));
    }
    finish(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// The shard of `aggregate_id` among `shards`, as the outbox's `shard`
/// column has it.
pub fn shard_of(aggregate_id: &str, shards: u32) -> u32 {
    let h = hash_bytes_extended(aggregate_id.as_bytes(), 0) & (i64::MAX as u64);
    (h % shards.max(1) as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_in_range_and_stable() {
        for n in [1u32, 4, 16, 1024] {
            for key in ["", "a", "order-1", "ключ", "0123456789abcdefghij"] {
                let s = shard_of(key, n);
                assert!(s < n);
                assert_eq!(s, shard_of(key, n));
            }
        }
    }
}
