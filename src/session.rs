//! MCP sessions of the session-based revisions (2025-06-18, 2025-11-25).
//!
//! A session is bound to the agent that opened it: presenting another
//! agent's session id is answered exactly like an unknown id (404), so ids
//! cannot be probed. Ids are 128 random bits. The table is bounded
//! (`limits.max_sessions`, and a share per agent) and idle sessions expire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::identity::now_unix;

/// One open session.
#[derive(Debug)]
pub struct Session {
    pub agent: Arc<str>,
    pub version: &'static str,
    last_seen: AtomicU64,
    /// A GET stream is open for it (at most one per session).
    pub listening: std::sync::atomic::AtomicBool,
}

/// Why a session could not be used or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("unknown or expired session")]
    NotFound,
    #[error("too many open sessions; close some (DELETE) and retry")]
    Full,
}

/// The session table.
pub struct Sessions {
    map: DashMap<String, Arc<Session>>,
    per_agent: DashMap<Arc<str>, usize>,
    max: usize,
    max_per_agent: usize,
    idle: Duration,
}

impl Sessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        Sessions {
            map: DashMap::new(),
            per_agent: DashMap::new(),
            max,
            max_per_agent: (max / 4).clamp(1, 1024),
            idle,
        }
    }

    /// Opens a session for `agent`.
    pub fn open(&self, agent: &Arc<str>, version: &'static str) -> Result<String, SessionError> {
        if self.map.len() >= self.max {
            self.sweep();
            if self.map.len() >= self.max {
                return Err(SessionError::Full);
            }
        }
        {
            let mut n = self.per_agent.entry(agent.clone()).or_insert(0);
            if *n >= self.max_per_agent {
                return Err(SessionError::Full);
            }
            *n += 1;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.map.insert(
            id.clone(),
            Arc::new(Session {
                agent: agent.clone(),
                version,
                last_seen: AtomicU64::new(now_unix()),
                listening: std::sync::atomic::AtomicBool::new(false),
            }),
        );
        Ok(id)
    }

    /// The session `id` if it exists and belongs to `agent`.
    pub fn get(&self, id: &str, agent: &str) -> Result<Arc<Session>, SessionError> {
        let s = self
            .map
            .get(id)
            .map(|s| s.clone())
            .ok_or(SessionError::NotFound)?;
        if &*s.agent != agent {
            return Err(SessionError::NotFound);
        }
        s.last_seen.store(now_unix(), Ordering::Relaxed);
        Ok(s)
    }

    /// Closes the session `id` if it belongs to `agent`.
    pub fn close(&self, id: &str, agent: &str) -> Result<(), SessionError> {
        match self.map.remove_if(id, |_, s| &*s.agent == agent) {
            Some((_, s)) => {
                self.release(&s.agent);
                Ok(())
            }
            None => Err(SessionError::NotFound),
        }
    }

    fn release(&self, agent: &Arc<str>) {
        let empty = match self.per_agent.get_mut(agent) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if empty {
            self.per_agent.remove_if(agent, |_, n| *n == 0);
        }
    }

    /// Drops sessions idle longer than the idle timeout.
    pub fn sweep(&self) {
        let cutoff = now_unix().saturating_sub(self.idle.as_secs());
        let mut gone = Vec::new();
        self.map.retain(|_, s| {
            let keep = s.last_seen.load(Ordering::Relaxed) >= cutoff;
            if !keep {
                gone.push(s.agent.clone());
            }
            keep
        });
        for a in gone {
            self.release(&a);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bound_to_their_agent() {
        let s = Sessions::new(100, Duration::from_secs(60));
        let a: Arc<str> = Arc::from("a");
        let id = s.open(&a, "2025-11-25").unwrap();
        assert_eq!(id.len(), 32);
        assert!(s.get(&id, "a").is_ok());
        assert_eq!(s.get(&id, "b").unwrap_err(), SessionError::NotFound);
        assert_eq!(s.close(&id, "b"), Err(SessionError::NotFound));
        assert!(s.close(&id, "a").is_ok());
        assert_eq!(s.get(&id, "a").unwrap_err(), SessionError::NotFound);
    }

    #[test]
    fn the_table_is_bounded_per_agent_and_in_total() {
        let s = Sessions::new(8, Duration::from_secs(60));
        let a: Arc<str> = Arc::from("a");
        for _ in 0..2 {
            s.open(&a, "2025-11-25").unwrap();
        }
        assert_eq!(s.open(&a, "2025-11-25"), Err(SessionError::Full));
        for i in 0..6 {
            s.open(&Arc::from(format!("x{i}")), "2025-11-25").unwrap();
        }
        assert_eq!(
            s.open(&Arc::from("y"), "2025-11-25"),
            Err(SessionError::Full)
        );
    }
}
