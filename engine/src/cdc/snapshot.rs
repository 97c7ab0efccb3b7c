//! PostgreSQL snapshots (`pg_snapshot` text, `xmin:xmax:xip,...`) and the
//! visibility of a transaction id in one, as `pg_visible_in_snapshot`
//! judges it. The CDC source skips streamed events whose transaction a
//! partition's mark snapshot already covers.

use std::fmt;

/// A parsed `pg_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted.
    xip: Vec<u64>,
    text: String,
}

/// The text is not a `pg_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a pg_snapshot: {0:?}")]
pub struct BadSnapshot(pub String);

impl Snapshot {
    pub fn parse(text: &str) -> Result<Snapshot, BadSnapshot> {
        let bad = || BadSnapshot(text.to_owned());
        let mut parts = text.splitn(3, ':');
        let mut next = || parts.next().ok_or_else(bad);
        let xmin: u64 = next()?.parse().map_err(|_| bad())?;
        let xmax: u64 = next()?.parse().map_err(|_| bad())?;
        let xip_text = next()?;
        let mut xip = Vec::new();
        if !xip_text.is_empty() {
            for x in xip_text.split(',') {
                xip.push(x.parse::<u64>().map_err(|_| bad())?);
            }
        }
        if xmin > xmax || xip.iter().any(|x| *x < xmin || *x >= xmax) {
            return Err(bad());
        }
        xip.sort_unstable();
        Ok(Snapshot {
            xmin,
            xmax,
            xip,
            text: text.to_owned(),
        })
    }

    /// Whether the transaction `xid` had committed when the snapshot was
    /// taken (for an id that did commit, as every streamed one did).
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s = Snapshot::parse("10:20:12,15").expect("snapshot");
        assert!(s.sees(9));
        assert!(s.sees(10));
        assert!(!s.sees(12));
        assert!(s.sees(13));
        assert!(!s.sees(15));
        assert!(s.sees(19));
        assert!(!s.sees(20));
        assert!(!s.sees(25));
        let empty = Snapshot::parse("1:1:").expect("snapshot");
        assert!(!empty.sees(1));
        assert_eq!(empty.as_str(), "1:1:");
    }

    #[test]
    fn malformed_snapshots_are_errors() {
        for bad in [
            "", "1", "1:2", "a:2:", "5:3:", "1:5:7", "1:5:x", "1:5:2,", "-1:2:",
        ] {
            assert!(Snapshot::parse(bad).is_err(), "{bad:?}");
        }
    }
}
