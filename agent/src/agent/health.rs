//! Whether the producer threads are alive and making progress: what `/healthz` reports and
//! what makes the agent exit non-zero (so a supervisor restarts it).
//!
//! Each thread holds a [`Heartbeat`] and beats from its loop. A thread that returns or
//! panics drops it, which marks the thread dead (unless the agent is stopping); a thread
//! that has not beaten within its stall limit is stalled. A dead thread is fatal; a stalled
//! one makes `/healthz` answer 503 until it beats again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Beat {
    name: &'static str,
    /// None: only death is checked (a thread that may block on a driver call for long, whose
    /// restart would not help: NVML).
    stall_limit: Option<Duration>,
    /// Milliseconds since `Health::start` at the last beat.
    last_ms: AtomicU64,
    dead: AtomicBool,
}

pub struct Health {
    start: Instant,
    beats: Mutex<Vec<Arc<Beat>>>,
    stopping: AtomicBool,
}

/// A thread's handle on its health entry; dropping it (return or panic) marks it dead.
pub struct Heartbeat {
    beat: Arc<Beat>,
    health: Arc<Health>,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.beat
            .last_ms
            .store(self.health.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if !self.health.stopping.load(Ordering::Relaxed) {
            self.beat.dead.store(true, Ordering::Relaxed);
            if std::thread::panicking() {
                tracing::error!(thread = self.beat.name, "thread panicked");
            } else {
                tracing::error!(thread = self.beat.name, "thread stopped");
            }
        }
    }
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            start: Instant::now(),
            beats: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A new entry for thread `name`, beaten now.
    pub fn register(
        self: &Arc<Self>,
        name: &'static str,
        stall_limit: Option<Duration>,
    ) -> Heartbeat {
        let beat = Arc::new(Beat {
            name,
            stall_limit,
            last_ms: AtomicU64::new(self.now_ms()),
            dead: AtomicBool::new(false),
        });
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(beat.clone());
        Heartbeat {
            beat,
            health: self.clone(),
        }
    }

    /// From here on, threads ending is expected.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The first dead thread, if any.
    pub fn dead(&self) -> Option<&'static str> {
        let beats = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        beats
            .iter()
            .find(|b| b.dead.load(Ordering::Relaxed))
            .map(|b| b.name)
    }

    /// Ok, or what is wrong: dead threads and threads past their stall limit, by name.
    pub fn check(&self) -> Result<(), String> {
        let now = self.now_ms();
        let beats = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let problems: Vec<String> = beats
            .iter()
            .filter_map(|b| {
                if b.dead.load(Ordering::Relaxed) {
                    return Some(format!("thread {} has stopped", b.name));
                }
                let silent =
                    Duration::from_millis(now.saturating_sub(b.last_ms.load(Ordering::Relaxed)));
                b.stall_limit
                    .filter(|limit| silent > *limit)
                    .map(|_| format!("thread {} has made no progress for {silent:?}", b.name))
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_and_stalled_threads_are_named() {
        let health = Health::new();
        let events = health.register("events", Some(Duration::from_millis(50)));
        let nvml = health.register("nvml", None);
        assert_eq!(health.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(80));
        let err = health.check().unwrap_err();
        assert!(err.contains("events has made no progress"), "{err}");
        assert!(!err.contains("nvml"), "no stall limit: {err}");
        events.beat();
        assert_eq!(health.check(), Ok(()));
        let _ = std::thread::spawn(move || {
            let _held = nvml;
            panic!("injected");
        })
        .join();
        assert_eq!(health.dead(), Some("nvml"));
        assert!(health
            .check()
            .unwrap_err()
            .contains("thread nvml has stopped"));
        health.stopping();
        drop(events);
        assert_eq!(health.dead(), Some("nvml"), "stopping threads are not dead");
    }
}
