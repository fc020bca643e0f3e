//! Request path → pool (`--route`).

use std::sync::Arc;

use super::Pool;
use crate::config::{RouteMatch, RouteSpec};
use crate::metrics::Metrics;
use crate::policy::DEFAULT_POOL;

/// Request path → pool: an exact path route first, then the longest
/// matching prefix, else `default`.
#[derive(Debug)]
pub struct Router {
    exact: Vec<(String, Arc<Pool>)>,
    /// Sorted by prefix length, longest first.
    prefixes: Vec<(String, Arc<Pool>)>,
    default: Arc<Pool>,
}

impl Router {
    pub fn new(routes: &[RouteSpec], metrics: &Metrics) -> Router {
        let (mut exact, mut prefixes) = (Vec::new(), Vec::new());
        for route in routes {
            let pool = Arc::new(Pool::new(&route.pool_name(), metrics));
            match &route.matcher {
                RouteMatch::Exact(path) => exact.push((path.clone(), pool)),
                RouteMatch::Prefix(prefix) => prefixes.push((prefix.clone(), pool)),
            }
        }
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Router { exact, prefixes, default: Arc::new(Pool::new(DEFAULT_POOL, metrics)) }
    }

    /// The pool for a request path (without the query).
    pub fn route(&self, path: &str) -> &Arc<Pool> {
        let exact = self.exact.iter().find(|(p, _)| p == path);
        let prefix = || self.prefixes.iter().find(|(p, _)| path.starts_with(p.as_str()));
        exact.or_else(prefix).map_or(&self.default, |(_, pool)| pool)
    }

    /// The pool named `name` (see [`RouteSpec::pool_name`]) or `default`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools().find(|pool| &*pool.name == name)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.exact.iter().chain(&self.prefixes).map(|(_, pool)| pool).chain(std::iter::once(&self.default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Router {
        fn new_for_test(routes: &[RouteSpec]) -> Router {
            Router::new(routes, &Metrics::new())
        }
    }

    fn routes(prefixes: &[&str], exact: &[&str]) -> Vec<RouteSpec> {
        let spec = |matcher| RouteSpec { matcher, workers: 1 };
        let prefixes = prefixes.iter().map(|p| spec(RouteMatch::Prefix(p.to_string())));
        prefixes.chain(exact.iter().map(|p| spec(RouteMatch::Exact(p.to_string())))).collect()
    }

    #[test]
    fn longest_prefix_wins() {
        let router = Router::new_for_test(&routes(&["/api", "/api/reports", "/report"], &[]));
        assert_eq!(&*router.route("/api/reports/1").name, "/api/reports");
        assert_eq!(&*router.route("/api/users").name, "/api");
        assert_eq!(&*router.route("/reports").name, "/report");
        assert_eq!(&*router.route("/light").name, "default");
        assert!(router.pool("default").is_some());
        assert!(router.pool("/nope").is_none());
    }

    #[test]
    fn exact_paths_win_over_prefixes() {
        let router = Router::new_for_test(&routes(&["/"], &["/", "/report"]));
        assert_eq!(&*router.route("/").name, "=/");
        assert_eq!(&*router.route("/report").name, "=/report");
        assert_eq!(&*router.route("/report/1").name, "/");
        assert!(router.pool("=/report").is_some());
    }
}
