//! Logical shards: which shard a channel belongs to, and the Redis hash tag each shard's keys
//! carry.
//!
//! The shard count is fixed for a deployment (`REDIS_SHARD_COUNT`): changing it moves channels
//! between shards, a migration. A channel's shard is a jump consistent hash of the FNV-1a hash
//! of its name (as Centrifugo does): stable, uniform, and cheap.

use crate::Channel;

/// How channels map to `count` shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shards {
    count: usize,
}

impl Shards {
    /// One shard: everything on one counter, as with a single Redis.
    pub const ONE: Shards = Shards { count: 1 };

    pub fn new(count: usize) -> Self {
        Self {
            count: count.max(1),
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The shard of `channel`.
    pub fn shard_of(&self, channel: &Channel) -> usize {
        if self.count == 1 {
            return 0;
        }
        jump_hash(fnv1a(channel.as_str().as_bytes()), self.count)
    }

    /// The hash tag of shard `shard` (`{eg3.17}`): every key of the shard carries it, so one
    /// script reaches all of them in a Redis Cluster (one slot). Tags are picked so shard `i`
    /// lands in the `i`-th of `count` equal ranges of the 16,384 slots: tags such as `{0}`,
    /// `{1}`, ... hash to a few clustered slots and would leave nodes idle.
    pub fn tag(&self, shard: usize) -> String {
        let range = (16_384 * shard / self.count)..(16_384 * (shard + 1) / self.count);
        (0u32..)
            .map(|n| format!("{{eg{shard}.{n}}}"))
            .find(|tag| range.contains(&(key_slot(tag.as_bytes()) as usize)))
            .unwrap_or_else(|| format!("{{eg{shard}}}"))
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Jump consistent hash (Lamping and Veach): a bucket in `0..buckets`, moving few keys when
/// the count changes.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (or of the whole key when it
/// has none), modulo 16,384. Written out because it is a dozen lines and must match Redis
/// exactly; the redis crate keeps its own copy private.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(0) | None => key,
            Some(len) => &key[open + 1..open + 1 + len],
        },
        None => key,
    };
    crc16(hashed) % 16_384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{}x"), key_slot(b"{}x"));
    }

    #[test]
    fn channels_spread_evenly_and_stay_put() {
        let shards = Shards::new(8);
        let mut counts = [0usize; 8];
        for i in 0..80_000 {
            let channel = Channel::parse(&format!("invoice:{i}")).unwrap();
            counts[shards.shard_of(&channel)] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
        // Stable: the same name, the same shard, always.
        let orders = Channel::parse("orders").unwrap();
        assert_eq!(shards.shard_of(&orders), Shards::new(8).shard_of(&orders));
        assert_eq!(Shards::ONE.shard_of(&orders), 0);
    }

    #[test]
    fn tags_spread_over_the_slot_ranges() {
        for count in [1, 3, 16, 64] {
            let shards = Shards::new(count);
            for shard in 0..count {
                let slot = key_slot(shards.tag(shard).as_bytes()) as usize;
                assert!(
                    (16_384 * shard / count..16_384 * (shard + 1) / count).contains(&slot),
                    "{count} shards: shard {shard} tag {} slot {slot}",
                    shards.tag(shard)
                );
            }
        }
    }
}
