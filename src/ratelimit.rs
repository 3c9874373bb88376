//! Rate limits: governor keyed limiters, one per distinct rate, keyed by
//! agent (whole-agent limits) or by (agent, tool rule).
//!
//! Checks are synchronous and lock-free on the decision path (governor's
//! GCRA state is an atomic per key; the key map is sharded). The limiters
//! outlive policy reloads: a new snapshot reuses the previous limiter for
//! every rate it still uses, so budgets survive a reload. Idle keys are
//! reclaimed by [`Limiters::reclaim`]. Keys are bounded by the manifests
//! (one per agent and one per rate-limited tool rule), never by call input.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::RateLimiter;

use crate::manifest::{Manifest, PolicySet, Rate};

/// An agent, and the tool rule for per-tool limits.
pub type Key = (Arc<str>, Option<Arc<str>>);

type Keyed<C> = RateLimiter<Key, DashMapStateStore<Key>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Agent,
    Tool,
}

/// A refused call: which limit, and when it may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

/// The limiters of one policy snapshot.
pub struct Limiters<C: Clock = DefaultClock> {
    by_rate: HashMap<Rate, Arc<Keyed<C>>>,
    clock: C,
}

impl<C: Clock + Clone> Limiters<C> {
    /// Limiters for every rate `policy` uses, reusing `previous`'s where the
    /// rate is unchanged (their budgets carry over).
    pub fn build(policy: &PolicySet, previous: Option<&Limiters<C>>, clock: C) -> Self {
        let mut by_rate = HashMap::new();
        let rates = policy.manifests().flat_map(|m| {
            m.rate
                .into_iter()
                .chain(m.tools.iter().filter_map(|t| t.rate))
        });
        for rate in rates {
            by_rate.entry(rate).or_insert_with(|| {
                previous
                    .and_then(|p| p.by_rate.get(&rate).cloned())
                    .unwrap_or_else(|| {
                        Arc::new(RateLimiter::dashmap_with_clock(rate.quota(), clock.clone()))
                    })
            });
        }
        Limiters { by_rate, clock }
    }

    fn check_one(&self, rate: Rate, key: &Key, scope: Scope) -> Result<(), Limited> {
        let Some(l) = self.by_rate.get(&rate) else {
            // Built from the same snapshot: every rate has a limiter.
            return Ok(());
        };
        l.check_key(key).map_err(|not_until| Limited {
            scope,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Counts one call against the agent's and the tool rule's limits.
    ///
    /// The agent's limit is taken first: a call it refuses spends nothing of
    /// the tool's. Governor cannot give a cell back, so one of the two
    /// orders must charge the first limit for a call the second refuses;
    /// this one charges the agent's own, usually wider and faster-refilling
    /// budget, never a tool's slow one (`2/hour` drained by calls that an
    /// exhausted agent budget refused would lock the tool for half an hour).
    pub fn check(&self, m: &Manifest, tool_rule: Option<usize>) -> Result<(), Limited> {
        if let Some(rate) = m.rate {
            self.check_one(rate, &(m.agent.clone(), None), Scope::Agent)?;
        }
        if let Some(rule) = tool_rule.and_then(|i| m.tools.get(i)) {
            if let Some(rate) = rule.rate {
                let key = (m.agent.clone(), Some(rule.pattern.clone()));
                self.check_one(rate, &key, Scope::Tool)?;
            }
        }
        Ok(())
    }

    /// Drops the state of keys whose budget is full again (idle agents).
    pub fn reclaim(&self) {
        for l in self.by_rate.values() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys currently tracked.
    pub fn key_count(&self) -> usize {
        self.by_rate.values().map(|l| l.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::path::Path;

    fn policy(text: &str) -> PolicySet {
        PolicySet::from_texts(
            vec![(Path::new("m.yaml").to_path_buf(), text.to_owned())],
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn calls_the_agent_limit_refuses_spend_nothing_of_the_tools() {
        let p = policy("agent: a\nrate_limit: 2/min\ntools:\n  - name: other\n  - name: slow\n    rate_limit: { rate: 2/hour, burst: 2 }\n");
        let clock = FakeRelativeClock::default();
        let l = Limiters::build(&p, None, clock.clone());
        let m = p.get("a").unwrap();
        assert_eq!(l.check(m, Some(0)), Ok(()));
        assert_eq!(l.check(m, Some(0)), Ok(()));
        for _ in 0..5 {
            assert_eq!(l.check(m, Some(1)).unwrap_err().scope, Scope::Agent);
        }
        // Once the agent's budget refills, the tool's is still whole.
        clock.advance(Duration::from_secs(60));
        assert_eq!(l.check(m, Some(1)), Ok(()));
        assert_eq!(l.check(m, Some(1)), Ok(()));
        // Now the tool's own budget (2 an hour) is what refuses.
        clock.advance(Duration::from_secs(60));
        assert_eq!(l.check(m, Some(1)).unwrap_err().scope, Scope::Tool);
    }

    #[test]
    fn allows_exactly_the_burst_then_refills_evenly() {
        let p = policy("agent: a\nrate_limit: 3/s\ntools: [ { name: t } ]\n");
        let clock = FakeRelativeClock::default();
        let l = Limiters::build(&p, None, clock.clone());
        let m = p.get("a").unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(m, Some(0)), Ok(()));
        }
        let e = l.check(m, Some(0)).unwrap_err();
        assert_eq!(e.scope, Scope::Agent);
        assert!(
            e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_millis(334),
            "{e:?}"
        );
        clock.advance(Duration::from_millis(334));
        assert_eq!(l.check(m, Some(0)), Ok(()));
        assert!(l.check(m, Some(0)).is_err());
    }

    #[test]
    fn tool_limits_are_per_agent_and_tool_and_explicit_burst_applies() {
        let p = policy("agent: a\ntools:\n  - name: t\n    rate_limit: { rate: 60/min, burst: 2 }\n  - name: u\n");
        let clock = FakeRelativeClock::default();
        let l = Limiters::build(&p, None, clock.clone());
        let m = p.get("a").unwrap();
        assert!(l.check(m, Some(0)).is_ok());
        assert!(l.check(m, Some(0)).is_ok());
        assert_eq!(l.check(m, Some(0)).unwrap_err().scope, Scope::Tool);
        assert!(l.check(m, Some(1)).is_ok(), "other tool unaffected");
        clock.advance(Duration::from_secs(1));
        assert!(l.check(m, Some(0)).is_ok());
    }

    #[test]
    fn budgets_survive_a_reload_with_the_same_rate() {
        let p = policy("agent: a\nrate_limit: 2/min\n");
        let clock = FakeRelativeClock::default();
        let l1 = Limiters::build(&p, None, clock.clone());
        let m = p.get("a").unwrap();
        assert!(l1.check(m, None).is_ok());
        assert!(l1.check(m, None).is_ok());
        let p2 = policy("agent: a\nrate_limit: 2/min\ndescription: edited\n");
        let l2 = Limiters::build(&p2, Some(&l1), clock.clone());
        assert!(l2.check(p2.get("a").unwrap(), None).is_err());
        assert_eq!(l2.key_count(), 1);
        clock.advance(Duration::from_secs(120));
        l2.reclaim();
        assert_eq!(l2.key_count(), 0, "idle keys are reclaimed");
    }
}
