//! A connection task that does not reschedule itself for its own wake-ups.
//!
//! hyper's HTTP/1 body channel wakes its sender whenever the receiver takes a
//! chunk, and on a server the sender is the connection's own dispatcher: a
//! handler that reads the request body, as every tools/call does, wakes the
//! very task that is polling it. Tokio then requeues the task as a yield and
//! wakes an idle worker to run it, which finds nothing to do: a futex wake,
//! two context switches and often a migration to the other core, on every
//! call (strace at concurrency 1: two futex calls per call through toolgate,
//! none through the bare pass-through, whose body is read by another task).
//!
//! [`Coalesced`] polls its future with a waker that, while the future is
//! being polled, only notes a wake-up; the future is then polled again at
//! once, in the same turn, a few times at most. A wake-up at any other time
//! goes straight to the task. No wake-up is lost: the state changes are
//! compare-and-swaps, so a wake-up racing the end of a poll either is seen by
//! the poll loop or wakes the task.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// Polls in one turn at most: the first and this many again. A future that
/// keeps waking itself (hyper yields after 16 rounds, tokio when a task's
/// budget is spent) still goes back to the scheduler, after a few polls.
const POLLS_PER_TURN: usize = 3;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN_WHILE_POLLING: u8 = 2;

struct Shared {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.state.compare_exchange(
            POLLING,
            WOKEN_WHILE_POLLING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // The poll loop sees it and polls again.
            Ok(_) | Err(WOKEN_WHILE_POLLING) => {}
            Err(_) => self.task.wake(),
        }
    }
}

/// `fut`, whose wake-ups of itself during its own poll are served by polling
/// again instead of by the scheduler. See the module docs.
pub struct Coalesced<F> {
    fut: Pin<Box<F>>,
    shared: Arc<Shared>,
    waker: Waker,
}

impl<F: Future> Coalesced<F> {
    pub fn new(fut: F) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(shared.clone());
        Coalesced {
            fut: Box::pin(fut),
            shared,
            waker,
        }
    }
}

impl<F: Future> Future for Coalesced<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.shared.task.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        for _ in 0..POLLS_PER_TURN {
            this.shared.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(out) = this.fut.as_mut().poll(&mut inner) {
                this.shared.state.store(IDLE, Ordering::Release);
                return Poll::Ready(out);
            }
            if this
                .shared
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
            // Woken while polling. A spent budget would only make the next
            // poll return at once: yield to the scheduler instead.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        this.shared.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wake-ups the task (the outer waker) gets.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn outer() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    /// Wakes itself during its first `n` polls, then is ready.
    struct WakesItself {
        n: usize,
        polls: usize,
    }
    impl Future for WakesItself {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > self.n {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn a_wake_up_during_the_poll_is_served_by_polling_again() {
        let (count, waker) = outer();
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(Coalesced::new(WakesItself { n: 1, polls: 0 }));
        assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(2));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "the task was not woken");
    }

    #[test]
    fn a_future_that_keeps_waking_itself_still_yields_to_the_scheduler() {
        let (count, waker) = outer();
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(Coalesced::new(WakesItself {
            n: usize::MAX,
            polls: 0
        }));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(f.fut.polls, POLLS_PER_TURN);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "woken to be polled again"
        );
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(f.fut.polls, 2 * POLLS_PER_TURN);
    }

    /// Pending until its flag is set; keeps the waker it was polled with.
    struct Flag {
        set: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }
    impl Future for Flag {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.set.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_wake_up_between_polls_reaches_the_task_also_from_another_thread() {
        let (count, waker) = outer();
        let mut cx = Context::from_waker(&waker);
        let set = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kept = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut f = std::pin::pin!(Coalesced::new(Flag {
            set: set.clone(),
            waker: kept.clone(),
        }));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        set.store(true, Ordering::SeqCst);
        let w = kept.lock().unwrap().clone().unwrap();
        std::thread::spawn(move || w.wake()).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }

    /// Racing wake-ups from another thread against polls: every wake-up after
    /// the flag is set leads to a ready poll, by the loop or by the task.
    #[test]
    fn no_wake_up_is_lost_to_a_race_with_the_end_of_a_poll() {
        for _ in 0..2000 {
            let (count, waker) = outer();
            let mut cx = Context::from_waker(&waker);
            let set = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let kept = Arc::new(std::sync::Mutex::new(None::<Waker>));
            let mut f = Box::pin(Coalesced::new(Flag {
                set: set.clone(),
                waker: kept.clone(),
            }));
            assert!(f.as_mut().poll(&mut cx).is_pending());
            let w = kept.lock().unwrap().clone().unwrap();
            let s = set.clone();
            let waking = std::thread::spawn(move || {
                s.store(true, Ordering::SeqCst);
                w.wake();
            });
            let mut ready = f.as_mut().poll(&mut cx).is_ready();
            waking.join().unwrap();
            if !ready {
                // Not seen by that poll: then the task must have been woken.
                assert_eq!(count.0.load(Ordering::SeqCst), 1, "wake-up lost");
                ready = f.as_mut().poll(&mut cx).is_ready();
            }
            assert!(ready);
        }
    }
}
