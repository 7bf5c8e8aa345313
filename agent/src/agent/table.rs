//! The process table as the producer threads share it: the tracker, the kernel's copy of
//! the tracked pids kept in step with it, the change signal that wakes the sampler, and the
//! events thread's drain clock. Every thread that learns of a process holds an
//! `Arc<Table>`; what else a thread touches (the CUDA state, a published view, counters) it
//! gets as a handle of its own.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::containers::Containers;
use super::observe;
use crate::metrics::ContainerLabels;
use crate::proc::ProcRoot;
use crate::tracker::{Observed, Tracker};

/// Whether the agent is stopping: every producer thread's loop checks it.
#[derive(Debug, Default)]
pub(super) struct Life {
    stop: AtomicBool,
}

impl Life {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Sleeps `total`, or less when the agent stops meanwhile.
    pub fn sleep(&self, total: Duration) {
        let deadline = Instant::now() + total;
        while !self.stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// "The table changed": set by whoever changes it (or what its view shows, like container
/// names), waited for by the sampler.
#[derive(Debug, Default)]
pub(super) struct Changed {
    flag: Mutex<bool>,
    wake: Condvar,
}

impl Changed {
    pub fn signal(&self) {
        *self.flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_one();
    }

    /// Waits up to `timeout` for a signal (or for `life` to stop), and takes it.
    pub fn wait(&self, timeout: Duration, life: &Life) {
        let guard = self.flag.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |changed| !*changed && !life.stopping())
            .unwrap_or_else(PoisonError::into_inner);
        *guard = false;
    }
}

/// The kernel's set of tracked pids (the fork program reports children of these only).
pub(super) trait KernelSet: Send {
    fn insert(&mut self, pid: u32) -> Result<(), String>;
    fn remove(&mut self, pid: u32);
}

impl KernelSet for crate::ebpf::TrackedPids {
    fn insert(&mut self, pid: u32) -> Result<(), String> {
        crate::ebpf::TrackedPids::insert(self, pid)
    }

    fn remove(&mut self, pid: u32) {
        crate::ebpf::TrackedPids::remove(self, pid);
    }
}

/// Without a kernel (the unit tests): a plain set.
impl KernelSet for HashSet<u32> {
    fn insert(&mut self, pid: u32) -> Result<(), String> {
        HashSet::insert(self, pid);
        Ok(())
    }

    fn remove(&mut self, pid: u32) {
        HashSet::remove(self, &pid);
    }
}

pub(super) struct Table {
    tracker: Mutex<Tracker>,
    /// The kernel's copy of the tracked pids (for fork events). Lock order: tracker first.
    kernel_tracked: Mutex<Box<dyn KernelSet>>,
    pub proc: ProcRoot,
    pub grace: Duration,
    pub containers: Arc<Containers>,
    pub changed: Arc<Changed>,
    pub life: Arc<Life>,
    /// When the events thread's last complete drain began: every exit that happened before
    /// it has been handled.
    drained: Mutex<Instant>,
    drained_wake: Condvar,
}

impl Table {
    pub fn new(
        proc: ProcRoot,
        grace: Duration,
        tracker: Tracker,
        kernel_tracked: Box<dyn KernelSet>,
        containers: Arc<Containers>,
        life: Arc<Life>,
    ) -> Self {
        Table {
            tracker: Mutex::new(tracker),
            kernel_tracked: Mutex::new(kernel_tracked),
            proc,
            grace,
            containers,
            changed: Arc::default(),
            life,
            drained: Mutex::new(Instant::now()),
            drained_wake: Condvar::new(),
        }
    }

    pub fn stopping(&self) -> bool {
        self.life.stopping()
    }

    pub fn sleep(&self, total: Duration) {
        self.life.sleep(total);
    }

    /// The events thread finished a drain that began at `started`.
    pub fn set_drained(&self, started: Instant) {
        *self.drained.lock().unwrap_or_else(PoisonError::into_inner) = started;
        self.drained_wake.notify_all();
    }

    /// Whether a drain that began after `t` has been handled: a process found gone at `t`
    /// and still alive in the table then missed its exit event (a busy events thread only
    /// delays it).
    pub fn drained_after(&self, t: Instant) -> bool {
        *self.drained.lock().unwrap_or_else(PoisonError::into_inner) > t
    }

    /// Waits up to `limit` for [`Table::drained_after`]`(t)`; whether it came. The events
    /// thread drains at least every 100 ms, with nothing to read.
    pub fn wait_drained_after(&self, t: Instant, limit: Duration) -> bool {
        let drained = self.drained.lock().unwrap_or_else(PoisonError::into_inner);
        let (drained, _) = self
            .drained_wake
            .wait_timeout_while(drained, limit, |drained| *drained <= t && !self.stopping())
            .unwrap_or_else(PoisonError::into_inner);
        *drained > t
    }

    /// The table; a panic in another thread while holding it does not make it unusable.
    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The table changed: the sampler publishes a new view soon.
    pub fn table_changed(&self) {
        self.changed.signal();
    }

    /// Waits up to `timeout` for a change to the table.
    pub fn wait_for_change(&self, timeout: Duration) {
        self.changed.wait(timeout, &self.life);
    }

    fn kernel(&self) -> MutexGuard<'_, Box<dyn KernelSet>> {
        self.kernel_tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the table with `change` and the kernel's tracked set with it, under the
    /// table's lock: another writer (an exit on the events thread) cannot slip in between and
    /// leave the kernel tracking a process the table has ended. A new process's container is
    /// read from its cgroup after the lock is released (the sampler holds the process back
    /// until then, see `Tracked::container_read`).
    pub fn observe(&self, pid: u32, change: impl FnOnce(&mut Tracker) -> Observed) -> Observed {
        let mut tracker = self.tracker();
        let observed = change(&mut tracker);
        let mut kernel = self.kernel();
        match &observed {
            Observed::Added(_) => {
                if let Err(e) = kernel.insert(pid) {
                    tracing::debug!(pid, error = %e, "cannot add to the kernel's tracked set");
                }
            }
            Observed::Removed => kernel.remove(pid),
            Observed::Unchanged | Observed::Ignored | Observed::Dropped => return observed,
        }
        let start_ticks = tracker.get(pid).and_then(|t| t.start_ticks);
        drop(kernel);
        drop(tracker);
        if matches!(observed, Observed::Added(_)) {
            let container = self.proc.container(pid).ok().flatten();
            if let Some(c) = &container {
                self.containers.request(&c.id);
            }
            self.tracker().set_container(pid, start_ticks, container);
        }
        self.table_changed();
        observed
    }

    /// The process exited: starts its grace period. True when it was tracked and alive.
    pub fn exited(&self, pid: u32) -> bool {
        let mut tracker = self.tracker();
        let was_alive = tracker.exited(pid, Instant::now());
        let gone = tracker.get(pid).filter(|_| was_alive).cloned();
        self.forget_in_kernel(pid, was_alive);
        drop(tracker);
        if let Some(t) = gone {
            observe::log_exited(self, &t, "exit event");
        }
        was_alive
    }

    /// A reading taken after `as_of` found the process gone (see
    /// [`Tracker::exited_as_of`]). True when it was marked exited.
    pub fn exited_as_of(&self, pid: u32, start_ticks: Option<u64>, as_of: Instant) -> bool {
        let mut tracker = self.tracker();
        let marked = tracker.exited_as_of(pid, start_ticks, as_of, Instant::now());
        let gone = tracker.get(pid).filter(|_| marked).cloned();
        self.forget_in_kernel(pid, marked);
        drop(tracker);
        if let Some(t) = gone {
            observe::log_exited(self, &t, "found gone");
        }
        marked
    }

    /// The container labels of tracked process `pid` (empty when it is in none).
    pub fn container_labels(&self, pid: u32) -> ContainerLabels {
        let container = self.tracker().get(pid).and_then(|t| t.container.clone());
        container
            .map(|c| self.containers.labels(&c))
            .unwrap_or_default()
    }

    /// Called with the table locked (lock order: table, then the kernel's set).
    fn forget_in_kernel(&self, pid: u32, exited: bool) {
        if exited {
            self.kernel().remove(pid);
            self.table_changed();
        }
    }
}
