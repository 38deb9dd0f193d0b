//! One task supervisor for a daemon's background tasks ([`Tasks`]).
//!
//! Every task has a name (the name in errors; the caller instruments it with its span, which keeps
//! each daemon's log lines as they were) and a [`Policy`] that says what
//! its end before shutdown means: a [`Policy::Critical`] task (the HTTP server, the keepalive, the
//! leader loop...) ends only when told to, so its early end, error or panic stops the daemon with
//! an error naming it; a [`Policy::Helper`] task (best-effort work) may end any time, which is
//! logged. Tasks are told to stop by the daemon's own means (a cancellation token); the supervisor
//! only watches them end and, at shutdown, waits for them with a bound.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// What a task's end before shutdown means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The daemon cannot do without it: an end before shutdown (return, error or panic) stops
    /// the daemon with an error naming the task.
    Critical,
    /// Best effort: an end is logged (an error or panic as a warning); the daemon goes on.
    Helper,
}

/// A critical task ended before shutdown: the daemon stops with this error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("background task {task} ended: {why}")]
pub struct TaskFailed {
    pub task: &'static str,
    pub why: String,
}

/// How a task ended: `Err` with a sentence when it failed.
pub type TaskResult = Result<(), String>;

/// What a task's future may give back: nothing (it ended), or a `Result` whose error says why it
/// failed.
pub trait TaskOutput {
    fn into_result(self) -> TaskResult;
}

impl TaskOutput for () {
    fn into_result(self) -> TaskResult {
        Ok(())
    }
}

impl<E: std::fmt::Display> TaskOutput for Result<(), E> {
    fn into_result(self) -> TaskResult {
        self.map_err(|e| e.to_string())
    }
}

type Ended = (&'static str, Policy, TaskResult);

/// A daemon's named background tasks; see the module docs.
pub struct Tasks {
    tracker: TaskTracker,
    ended_tx: mpsc::UnboundedSender<Ended>,
    ended_rx: mpsc::UnboundedReceiver<Ended>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    pub fn new() -> Self {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        Self {
            tracker: TaskTracker::new(),
            ended_tx,
            ended_rx,
        }
    }

    /// Runs `fut` as the task `name`; a panic counts as its end with an error.
    pub fn spawn<F>(&self, name: &'static str, policy: Policy, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let ended = self.ended_tx.clone();
        self.tracker.spawn(async move {
            let r = match futures_catch(fut).await {
                Ok(r) => r.into_result(),
                Err(()) => Err("panicked".to_string()),
            };
            // The receiver is gone only after `stop`: nobody is left to tell.
            let _ = ended.send((name, policy, r));
        });
    }

    /// Waits for `shutdown` or the early end of a critical task, which is returned as the failure.
    /// A helper's end is logged on the way. When both are ready, shutdown wins: a task that ended
    /// because the daemon is stopping is no failure.
    pub async fn until(&mut self, shutdown: impl Future<Output = ()>) -> Option<TaskFailed> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    info!("shutdown requested");
                    return None;
                }
                Some((task, policy, r)) = self.ended_rx.recv() => match policy {
                    Policy::Critical => {
                        let why = r.err().unwrap_or_else(|| "returned".into());
                        error!(task, %why, "background task ended unexpectedly; shutting down");
                        return Some(TaskFailed { task, why });
                    }
                    Policy::Helper => match r {
                        Ok(()) => info!(task, "background task ended"),
                        Err(why) => warn!(task, %why, "background task failed; going on without it"),
                    },
                },
            }
        }
    }

    /// Waits (at most `grace`) for the tasks, which were told to stop. Returns the first error a
    /// task ended with meanwhile (each is logged); a task that outlives the grace is left behind
    /// with a warning.
    pub async fn stop(mut self, grace: Duration) -> Option<TaskFailed> {
        if !close_and_wait(&self.tracker, grace).await {
            warn!(
                ?grace,
                "background tasks did not stop within the shutdown grace"
            );
        }
        let mut first = None;
        while let Ok((task, _, r)) = self.ended_rx.try_recv() {
            if let Err(why) = r {
                warn!(task, %why, "background task failed while stopping");
                first.get_or_insert(TaskFailed { task, why });
            }
        }
        first
    }
}

/// Closes `tracker` and waits for its tasks, at most `grace`: false when some are still running.
pub async fn close_and_wait(tracker: &TaskTracker, grace: Duration) -> bool {
    tracker.close();
    tokio::time::timeout(grace, tracker.wait()).await.is_ok()
}

/// `fut`'s output, or `Err` when it panicked.
async fn futures_catch<F: Future>(fut: F) -> Result<F::Output, ()> {
    use futures::FutureExt;
    AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_critical_task_ending_early_stops_the_daemon_naming_it() {
        let mut tasks = Tasks::new();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tasks.spawn(
            "waits",
            Policy::Critical,
            async move { c.cancelled().await },
        );
        tasks.spawn("fails", Policy::Critical, async {
            Err::<(), _>("no socket")
        });
        let failed = tasks.until(std::future::pending()).await;
        assert_eq!(
            failed,
            Some(TaskFailed {
                task: "fails",
                why: "no socket".into()
            })
        );
        assert_eq!(
            failed.map(|f| f.to_string()).as_deref(),
            Some("background task fails ended: no socket")
        );
        cancel.cancel();
        assert_eq!(tasks.stop(Duration::from_secs(5)).await, None);
    }

    #[tokio::test]
    async fn a_panic_is_an_end_with_an_error_and_a_helper_may_end() {
        let mut tasks = Tasks::new();
        tasks.spawn("helper", Policy::Helper, async { Err::<(), _>("gave up") });
        tasks.spawn("boom", Policy::Critical, async {
            if true {
                panic!("on purpose");
            }
        });
        let failed = tasks.until(std::future::pending()).await.expect("failed");
        assert_eq!((failed.task, failed.why.as_str()), ("boom", "panicked"));
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_tasks_with_a_bound() {
        let mut tasks = Tasks::new();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tasks.spawn("obeys", Policy::Critical, async move {
            c.cancelled().await;
            Err::<(), _>("stopped badly")
        });
        tasks.spawn("hangs", Policy::Critical, std::future::pending::<()>());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tx.send(()).expect("send");
        assert_eq!(tasks.until(async { rx.await.unwrap_or(()) }).await, None);
        cancel.cancel();
        let started = std::time::Instant::now();
        let failed = tasks.stop(Duration::from_millis(200)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(failed.map(|f| f.task), Some("obeys"));
    }
}
