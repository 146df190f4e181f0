//! This node's clock against PostgreSQL's. Webhook leases are times one
//! node writes and the others compare with their own clocks, so nodes whose
//! clocks disagree by seconds can take over a delivery still being
//! attempted; PostgreSQL's clock is the one every node can read, and the
//! measure of how far each node's clock is from it. SQLite has one node
//! and nothing to compare.

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};

use super::{now_millis, DbConn, StorageError};

/// How far this node's clock may be from the database's before it is
/// reported: well within the margin a lease keeps beyond its attempt
/// (15 s), so a warning comes long before a takeover.
pub const TOLERATED_MS: i64 = 2_000;

/// This node's clock against the database's, from one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// This node's time minus the database's, in milliseconds, from the
    /// middle of the round trip (positive: this node runs ahead).
    pub ms: i64,
    /// Half the round trip: the reading is right within this.
    pub within_ms: i64,
}

impl Offset {
    /// The offset from this node's time before the query (`sent`), the
    /// database's time in it (`database`) and this node's time after it
    /// (`received`).
    pub fn from_reading(sent: i64, database: i64, received: i64) -> Self {
        let round_trip = received.saturating_sub(sent).max(0);
        Offset {
            ms: sent.saturating_add(round_trip / 2).saturating_sub(database),
            within_ms: round_trip / 2,
        }
    }

    /// Whether the clocks are surely further apart than [`TOLERATED_MS`].
    pub fn out_of_step(&self) -> bool {
        self.ms.saturating_abs().saturating_sub(self.within_ms) > TOLERATED_MS
    }
}

#[derive(QueryableByName)]
struct Now {
    #[diesel(sql_type = BigInt)]
    ms: i64,
}

/// Reads the database's clock against this node's: `None` on SQLite.
pub fn offset(conn: &mut DbConn) -> Result<Option<Offset>, StorageError> {
    let DbConn::Pg(c) = conn else {
        return Ok(None);
    };
    let query = diesel::sql_query(
        "SELECT CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT) AS ms",
    );
    let sent = now_millis();
    let database = query.get_result::<Now>(c)?.ms;
    Ok(Some(Offset::from_reading(sent, database, now_millis())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_taken_at_the_middle_of_the_round_trip() {
        let o = Offset::from_reading(10_000, 7_004, 10_008);
        assert_eq!(
            o,
            Offset {
                ms: 3_000,
                within_ms: 4
            }
        );
        assert!(o.out_of_step());
        let behind = Offset::from_reading(10_000, 12_600, 10_000);
        assert_eq!(behind.ms, -2_600);
        assert!(behind.out_of_step());
    }

    /// A reading whose round trip could explain the gap is not reported.
    #[test]
    fn a_gap_within_the_tolerance_or_the_round_trip_is_in_step() {
        assert!(!Offset::from_reading(10_000, 8_000, 10_000).out_of_step());
        assert!(Offset::from_reading(10_000, 7_999, 10_000).out_of_step());
        // 2.5 s apart by the middle, but the reading took 2 s.
        assert!(!Offset::from_reading(10_000, 8_500, 12_000).out_of_step());
    }
}
