//! Tasks a reload may replace, one per key (a source's, port's or listener's name), each
//! with the config it started with. [`Tasks::reconcile`] brings the set to what a config
//! wants; change detection compares the config values themselves.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A spawned task with its own stop signal, and what its starter keeps beside it.
pub(crate) struct Task<X = ()> {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
    /// E.g. a listener's password file, which a reload reads again.
    pub(crate) extra: X,
}

impl Task {
    /// Spawns `run` with the receiver its stop signal arrives on.
    pub(crate) fn spawn<F>(run: impl FnOnce(watch::Receiver<bool>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stop_rx) = watch::channel(false);
        Self {
            stop,
            handle: tokio::spawn(run(stop_rx)),
            extra: (),
        }
    }

    /// The task with `extra` kept beside it.
    pub(crate) fn with<X>(self, extra: X) -> Task<X> {
        Task {
            stop: self.stop,
            handle: self.handle,
            extra,
        }
    }
}

impl<X> Task<X> {
    /// Signals the stop and waits until the task has finished what it owes (acks of committed
    /// readings, outstanding PubAcks).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.handle.await;
    }
}

/// What a reconcile left alone and what it could not start.
pub(crate) struct Reconciled<K, E> {
    /// Keys whose task runs on untouched, in key order.
    pub(crate) kept: Vec<K>,
    /// Why wanted tasks did not start; the next reconcile tries them again.
    pub(crate) failed: Vec<E>,
}

/// Running tasks by key, stopped and started in key order.
pub(crate) struct Tasks<K, C, X = ()> {
    /// What the tasks are, for logs ("MQTT source", "serial port").
    kind: &'static str,
    running: BTreeMap<K, (C, Task<X>)>,
}

impl<K: Ord + Clone + Display, C: PartialEq, X> Tasks<K, C, X> {
    pub(crate) fn new(kind: &'static str) -> Self {
        Self {
            kind,
            running: BTreeMap::new(),
        }
    }

    /// Brings the running tasks to `desired`: stops those whose key is gone or whose config
    /// differs, then starts the wanted ones not running. Every stop comes before any start, so
    /// a changed task never runs twice at once (a listener's port, a serial device).
    /// (`start` returns a future that does not borrow the config, which keeps the futures of
    /// callers `Send`; an async closure's would not be.)
    pub(crate) async fn reconcile<E, F>(
        &mut self,
        desired: impl IntoIterator<Item = (K, C)>,
        mut start: impl FnMut(&C) -> F,
    ) -> Reconciled<K, E>
    where
        F: Future<Output = Result<Task<X>, E>>,
    {
        let mut wanted: BTreeMap<K, C> = desired.into_iter().collect();
        let mut kept = Vec::new();
        for (key, (config, task)) in std::mem::take(&mut self.running) {
            if wanted.get(&key) == Some(&config) {
                wanted.remove(&key);
                kept.push(key.clone());
                self.running.insert(key, (config, task));
            } else {
                tracing::info!(kind = self.kind, name = %key, "stopping (removed or changed)");
                task.stop().await;
            }
        }
        let mut failed = Vec::new();
        for (key, config) in wanted {
            tracing::info!(kind = self.kind, name = %key, "starting");
            match start(&config).await {
                Ok(task) => {
                    self.running.insert(key, (config, task));
                }
                Err(e) => failed.push(e),
            }
        }
        Reconciled { kept, failed }
    }

    /// Stops every task, in key order.
    pub(crate) async fn stop_all(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.running) {
            task.stop().await;
        }
    }

    /// The config a task runs with, and what is kept beside it.
    pub(crate) fn get(&self, key: &K) -> Option<(&C, &X)> {
        self.running
            .get(key)
            .map(|(config, task)| (config, &task.extra))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    type Desired = [(&'static str, u32)];

    /// Tasks whose starts (with their config) and stops are logged; config 0 cannot start.
    struct Harness {
        log: Arc<Mutex<Vec<String>>>,
        tasks: Tasks<&'static str, u32>,
    }

    impl Harness {
        /// Tasks running as `desired` wants, their starts taken off the log.
        async fn running(desired: &Desired) -> Self {
            let mut h = Harness {
                log: Arc::default(),
                tasks: Tasks::new("test"),
            };
            h.reconcile(desired).await;
            h.take();
            h
        }

        async fn reconcile(&mut self, desired: &Desired) -> Reconciled<&'static str, String> {
            let log = &self.log;
            let start = |config: &u32| std::future::ready(Self::start(log, *config));
            self.tasks.reconcile(desired.iter().copied(), start).await
        }

        fn start(log: &Arc<Mutex<Vec<String>>>, config: u32) -> Result<Task, String> {
            if config == 0 {
                return Err("config 0 cannot start".into());
            }
            log.lock().unwrap().push(format!("start {config}"));
            let log = log.clone();
            Ok(Task::spawn(move |mut stop| async move {
                let _ = stop.wait_for(|s| *s).await;
                log.lock().unwrap().push(format!("stop {config}"));
            }))
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }

        fn keys(&self) -> Vec<&'static str> {
            self.tasks.running.keys().copied().collect()
        }
    }

    #[tokio::test]
    async fn adds_starts_and_an_unchanged_key_keeps_running() {
        let mut h = Harness::running(&[("a", 1)]).await;
        let done = h.reconcile(&[("a", 1), ("b", 2)]).await;
        assert_eq!(h.take(), ["start 2"], "a is not touched");
        assert_eq!(done.kept, ["a"]);
        assert_eq!(h.keys(), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_changed_config_stops_the_old_task_before_the_new_one_starts() {
        let mut h = Harness::running(&[("a", 1), ("b", 2)]).await;
        let done = h.reconcile(&[("a", 10), ("b", 2)]).await;
        assert_eq!(h.take(), ["stop 1", "start 10"]);
        assert_eq!(done.kept, ["b"]);
        assert_eq!(h.tasks.get(&"a").map(|(c, _)| c), Some(&10));
    }

    #[tokio::test]
    async fn a_removed_key_is_stopped_and_the_rest_keep_running() {
        let mut h = Harness::running(&[("a", 1), ("b", 2), ("c", 3)]).await;
        let done = h.reconcile(&[("b", 2)]).await;
        assert_eq!(h.take(), ["stop 1", "stop 3"], "in key order");
        assert_eq!(done.kept, ["b"]);
        assert_eq!(h.keys(), ["b"]);
    }

    #[tokio::test]
    async fn a_task_that_cannot_start_is_reported_and_tried_again_next_time() {
        let mut h = Harness::running(&[]).await;
        let done = h.reconcile(&[("a", 1), ("b", 0)]).await;
        assert_eq!(done.failed, ["config 0 cannot start"]);
        assert_eq!(h.keys(), ["a"]);
        h.take();

        let done = h.reconcile(&[("a", 1), ("b", 2)]).await;
        assert!(done.failed.is_empty());
        assert_eq!(h.take(), ["start 2"]);
    }

    #[tokio::test]
    async fn stop_all_stops_every_task_in_key_order() {
        let mut h = Harness::running(&[("b", 2), ("a", 1)]).await;
        h.tasks.stop_all().await;
        assert_eq!(h.take(), ["stop 1", "stop 2"]);
        assert!(h.keys().is_empty());
    }
}
