//! The one cursor a connection resumes from, whatever shards its channels are on.
//!
//! A connection whose channels are all on one shard has that shard's `seq` as its id: plain
//! decimal, as on a single Redis. A connection over several shards has one position per
//! shard, written `v1.` followed by base64url (no padding) of unsigned LEB128 varints: the
//! deployment's shard count, then each (shard, seq) pair in increasing shard order. The count
//! makes a cursor of another deployment recognisable.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

/// Why a client's id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event id {0:?} is not valid: expected an id this gateway sent (a decimal such as \"1042\", or \"v1.…\")"
)]
pub struct CursorError(pub String);

/// A client's id, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// A decimal id: the position on the one shard of its connection's channels.
    Plain(u64),
    /// Positions on several shards of a deployment of `count` shards, by shard.
    Shards {
        count: usize,
        positions: Vec<(usize, u64)>,
    },
}

const PREFIX: &str = "v1.";

/// Most positions a cursor carries (one per shard).
const MAX_POSITIONS: usize = 4096;

impl Cursor {
    /// Parses an id from `Last-Event-ID`, `last_event_id` or `since`.
    pub fn parse(text: &str) -> Result<Cursor, CursorError> {
        let refused = || CursorError(text.chars().take(60).collect());
        if let Some(encoded) = text.strip_prefix(PREFIX) {
            let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| refused())?;
            let mut reader = Varints(&bytes);
            let count = reader.next().ok_or_else(refused)?;
            if count < 2 || count > MAX_POSITIONS as u64 {
                return Err(refused());
            }
            let mut positions = Vec::new();
            while !reader.0.is_empty() {
                let shard = reader.next().ok_or_else(refused)?;
                let seq = reader.next().ok_or_else(refused)?;
                let in_order = positions
                    .last()
                    .is_none_or(|&(last, _)| (last as u64) < shard);
                if shard >= count || !in_order || positions.len() >= MAX_POSITIONS {
                    return Err(refused());
                }
                positions.push((shard as usize, seq));
            }
            if positions.is_empty() {
                return Err(refused());
            }
            return Ok(Cursor::Shards {
                count: count as usize,
                positions,
            });
        }
        let valid =
            !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit());
        if !valid {
            return Err(refused());
        }
        text.parse().map(Cursor::Plain).map_err(|_| refused())
    }

    /// A plain decimal id (a WebSocket `since`, per channel).
    pub fn parse_plain(text: &str) -> Result<u64, CursorError> {
        match Cursor::parse(text)? {
            Cursor::Plain(seq) => Ok(seq),
            Cursor::Shards { .. } => Err(CursorError(text.chars().take(60).collect())),
        }
    }

    /// Writes positions on `count` shards: plain when there is one position and one shard's
    /// channels, else `v1.…`. `positions` must be in increasing shard order.
    pub fn render(count: usize, positions: &[(usize, u64)]) -> String {
        if let [(_, seq)] = positions {
            return seq.to_string();
        }
        let mut bytes = Vec::with_capacity(2 + positions.len() * 10);
        put_varint(&mut bytes, count as u64);
        for &(shard, seq) in positions {
            put_varint(&mut bytes, shard as u64);
            put_varint(&mut bytes, seq);
        }
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

struct Varints<'a>(&'a [u8]);

impl Varints<'_> {
    /// The next varint; `None` at a truncated or over-long one.
    fn next(&mut self) -> Option<u64> {
        let mut value: u64 = 0;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_is_plain_decimal() {
        assert_eq!(Cursor::parse("1042"), Ok(Cursor::Plain(1042)));
        assert_eq!(Cursor::render(1, &[(0, 1042)]), "1042");
        assert_eq!(Cursor::render(16, &[(5, 77)]), "77");
        for bad in ["", "-1", "12a", " 12", "1.5", "18446744073709551616", "1e3"] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn several_shards_round_trip_compactly() {
        let positions = vec![
            (0, 1_796_296_254_785_903),
            (3, 1_796_296_254_786_000),
            (15, 7),
        ];
        let text = Cursor::render(16, &positions);
        assert!(text.starts_with("v1.") && text.len() < 48, "{text}");
        assert_eq!(
            Cursor::parse(&text),
            Ok(Cursor::Shards {
                count: 16,
                positions
            })
        );
    }

    #[test]
    fn malformed_cursors_are_refused() {
        let good = Cursor::render(4, &[(1, 5), (2, 6)]);
        for bad in [
            "v1.".to_owned(),
            "v1.!!!".to_owned(),
            "v2.AQI".to_owned(),
            format!("{good}=="),
            // Count 4, shard 4: out of range.
            format!("v1.{}", URL_SAFE_NO_PAD.encode([4, 4, 1])),
            // Shards out of order.
            format!("v1.{}", URL_SAFE_NO_PAD.encode([4, 2, 1, 1, 1])),
            // A truncated pair.
            format!("v1.{}", URL_SAFE_NO_PAD.encode([4, 1])),
            // A varint longer than ten bytes.
            format!("v1.{}", URL_SAFE_NO_PAD.encode([0xff; 12])),
        ] {
            assert!(Cursor::parse(&bad).is_err(), "{bad}");
        }
    }
}
