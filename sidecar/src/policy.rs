//! How many workers to run, and which route pool each worker slot serves.

use clustered_api::clusterd::{Rounding, RouteSpec, WorkerCount};

/// Name of the pool that serves every path no route claims.
pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerPolicy {
    pub workers: WorkerCount,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub rounding: Rounding,
}

impl WorkerPolicy {
    /// Workers wanted for `cores` CPUs: always at least 1.
    pub fn desired(&self, cores: f64) -> u32 {
        let base = match self.workers {
            WorkerCount::Fixed(n) => n,
            WorkerCount::Auto => {
                let rounded = match self.rounding {
                    Rounding::Floor => cores.floor(),
                    Rounding::Ceil => cores.ceil(),
                    Rounding::Round => cores.round(),
                };
                // `as` saturates: NaN → 0, huge → u32::MAX.
                rounded as u32
            }
        };
        let base = self.min.map_or(base, |min| base.max(min));
        let base = self.max.map_or(base, |max| base.min(max));
        base.max(1)
    }
}

/// The pool of each worker slot, indexed by worker id.
///
/// Route pools take the lowest ids, in the order the routes were given; the
/// default pool gets the rest and always at least one worker, so the total
/// can exceed `desired` when the routes claim everything. Scaling therefore
/// only ever adds or removes default-pool workers (highest ids first).
pub fn slot_layout(desired: u32, routes: &[RouteSpec]) -> Vec<String> {
    let mut layout: Vec<String> =
        routes.iter().flat_map(|r| std::iter::repeat_n(r.pool_name(), r.workers as usize)).collect();
    let dedicated = layout.len() as u32;
    let default_workers = desired.saturating_sub(dedicated).max(1);
    layout.extend(std::iter::repeat_n(DEFAULT_POOL.to_string(), default_workers as usize));
    layout
}

#[cfg(test)]
mod tests {
    use clustered_api::clusterd::RouteMatch;

    use super::*;

    fn auto(rounding: Rounding) -> WorkerPolicy {
        WorkerPolicy { workers: WorkerCount::Auto, min: None, max: None, rounding }
    }

    #[test]
    fn rounding_modes() {
        assert_eq!(auto(Rounding::Floor).desired(2.5), 2);
        assert_eq!(auto(Rounding::Ceil).desired(2.5), 3);
        assert_eq!(auto(Rounding::Round).desired(2.4), 2);
        assert_eq!(auto(Rounding::Round).desired(2.5), 3);
    }

    #[test]
    fn at_least_one_worker() {
        assert_eq!(auto(Rounding::Floor).desired(0.5), 1);
        assert_eq!(auto(Rounding::Floor).desired(0.0), 1);
        assert_eq!(auto(Rounding::Floor).desired(f64::NAN), 1);
    }

    #[test]
    fn bounds_apply_to_auto_and_fixed() {
        let p = WorkerPolicy { min: Some(2), max: Some(4), ..auto(Rounding::Floor) };
        assert_eq!(p.desired(1.0), 2);
        assert_eq!(p.desired(8.0), 4);
        let fixed = WorkerPolicy { workers: WorkerCount::Fixed(6), ..p };
        assert_eq!(fixed.desired(1.0), 4);
    }

    #[test]
    fn route_pools_take_the_lowest_ids_and_default_keeps_one() {
        let routes = vec![RouteSpec { matcher: RouteMatch::Prefix("/report".into()), workers: 1 }];
        assert_eq!(slot_layout(3, &routes), vec!["/report", "default", "default"]);
        assert_eq!(slot_layout(1, &routes), vec!["/report", "default"]);
        assert_eq!(slot_layout(2, &[]), vec!["default", "default"]);
    }
}
