//! Resume: cursors, and deciding whether history after a cursor is complete.
//!
//! Every event has a `seq` from one counter per broker, so one cursor (the last `seq` a client
//! saw) is a resume point on every channel at once. History after a cursor is complete on a
//! channel when no entry with a higher `seq` was removed from its stream; the rules are in
//! [`assess`] and the reasoning in `docs/resume.md`.

use crate::Event;

/// The broker's current position: its counter, and the epoch the counter was seeded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Changes when the counter is re-created (a Redis that lost its data).
    pub epoch: u64,
    /// The highest `seq` handed out so far.
    pub seq: u64,
}

/// What is known about entries removed from a channel's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Nothing was ever removed from this stream.
    Nothing,
    /// Every removed entry had a `seq` at most this.
    Upto(u64),
    /// Entries were removed: trimmed ones all below the first retained entry, deleted ones at
    /// most `max_deleted`. Redis reports this much and no more.
    BelowFirst { max_deleted: u64 },
}

/// What a broker knows about one channel's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFacts {
    /// No stream: the channel never had an event, or its history expired.
    Missing,
    Present {
        /// `seq` of the oldest retained entry; `None` when the stream is empty.
        first: Option<u64>,
        removed: Removed,
    },
}

/// Why history after a cursor cannot be shown to be complete. Clients get an `event: reset`
/// naming the channels and this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Entries after the cursor were trimmed by `HISTORY_MAX_LEN`.
    Trimmed,
    /// The channel's history expired (`HISTORY_TTL`) and the cursor is older than that.
    Expired,
    /// The cursor is ahead of the broker's counter: it comes from another broker or from before
    /// a data loss.
    UnknownPosition,
    /// The broker lost its data (Redis restarted empty) while the client was connected.
    DataLost,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Trimmed => "history_trimmed",
            GapReason::Expired => "history_expired",
            GapReason::UnknownPosition => "unknown_position",
            GapReason::DataLost => "data_lost",
        }
    }
}

/// A history read: for each `(channel, after)`, a page of the events with
/// `after < seq <= upto`.
#[derive(Debug, Clone, Copy)]
pub struct HistoryRead<'a> {
    pub requests: &'a [(crate::Channel, u64)],
    pub upto: u64,
    /// Most events per page.
    pub limit: usize,
    /// Most bytes of event bodies per page; a page holds at least one event.
    pub max_bytes: usize,
    /// The epoch of the position `upto` came from: a broker that began another epoch since
    /// answers [`crate::BrokerError::EpochChanged`] instead of a history that may miss events.
    pub epoch: u64,
}

/// One channel's answer to a history read.
#[derive(Debug, Clone)]
pub struct ChannelPage {
    pub facts: StreamFacts,
    /// Every event with a `seq` above the requested cursor was published less than
    /// `HISTORY_TTL` ago, so none of them can have expired.
    pub recent: bool,
    /// Events after the cursor, up to the requested end and size, in order.
    pub events: Vec<Event>,
    /// The page stopped at its size (count or bytes): more events may follow.
    pub more: bool,
    /// The `seq` of the last entry read, decodable or not: the next page starts after it.
    pub through: Option<u64>,
    /// Entries that could not be decoded (not written by eventgate), skipped.
    pub skipped: usize,
}

impl Default for ChannelPage {
    fn default() -> Self {
        Self {
            facts: StreamFacts::Missing,
            recent: false,
            events: Vec::new(),
            more: false,
            through: None,
            skipped: 0,
        }
    }
}

/// Decides whether the history of one channel is complete after `after`.
pub fn assess(after: u64, facts: &StreamFacts, recent: bool) -> Result<(), GapReason> {
    // An event after the cursor could have lived in an earlier incarnation of the stream that
    // expired; that is impossible when every such event is younger than the TTL.
    let expired_unless_recent = || {
        if recent {
            Ok(())
        } else {
            Err(GapReason::Expired)
        }
    };
    match *facts {
        StreamFacts::Missing => expired_unless_recent(),
        StreamFacts::Present { first, removed } => match removed {
            Removed::Nothing => match first {
                Some(first) if first <= after => Ok(()),
                _ => expired_unless_recent(),
            },
            Removed::Upto(upto) if upto <= after => Ok(()),
            Removed::Upto(_) => Err(GapReason::Trimmed),
            Removed::BelowFirst { max_deleted } => match first {
                Some(first) if first <= after && max_deleted <= after => Ok(()),
                _ => Err(GapReason::Trimmed),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECENT: bool = true;
    const OLD: bool = false;

    fn present(first: Option<u64>, removed: Removed) -> StreamFacts {
        StreamFacts::Present { first, removed }
    }

    #[test]
    fn a_missing_stream_is_complete_only_for_a_recent_cursor() {
        assert_eq!(assess(10, &StreamFacts::Missing, RECENT), Ok(()));
        assert_eq!(
            assess(10, &StreamFacts::Missing, OLD),
            Err(GapReason::Expired)
        );
    }

    #[test]
    fn an_untrimmed_stream_is_complete_when_it_began_at_or_before_the_cursor() {
        let facts = present(Some(5), Removed::Nothing);
        assert_eq!(assess(5, &facts, OLD), Ok(()));
        assert_eq!(assess(9, &facts, OLD), Ok(()));
        // Began after the cursor: an expired earlier stream may have held events.
        assert_eq!(assess(4, &facts, OLD), Err(GapReason::Expired));
        assert_eq!(assess(4, &facts, RECENT), Ok(()));
    }

    #[test]
    fn trimming_after_the_cursor_is_a_gap() {
        // Redis: trimmed entries lie somewhere below the first retained one.
        let facts = present(Some(100), Removed::BelowFirst { max_deleted: 0 });
        assert_eq!(assess(100, &facts, RECENT), Ok(()));
        assert_eq!(assess(99, &facts, RECENT), Err(GapReason::Trimmed));
        let deleted = present(Some(100), Removed::BelowFirst { max_deleted: 150 });
        assert_eq!(assess(120, &deleted, RECENT), Err(GapReason::Trimmed));
        // Memory broker: the highest removed id is known exactly.
        let exact = present(Some(100), Removed::Upto(60));
        assert_eq!(assess(60, &exact, OLD), Ok(()));
        assert_eq!(assess(59, &exact, RECENT), Err(GapReason::Trimmed));
    }
}
