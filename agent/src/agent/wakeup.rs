//! What wakes the events thread: the kernel saying it wrote records (the ring buffer's fd,
//! the perf buffers' fds), or a timeout. An epoll set, level-triggered: a drain that leaves
//! nothing behind makes the next wait sleep. And how long the thread rests between drains:
//! a millisecond, longer and longer while drains keep finding bursts.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub(super) struct Wakeup {
    epoll: OwnedFd,
}

impl Wakeup {
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: epoll_create1 has no preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from the kernel, owned from here on.
        Ok(Wakeup {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Wakes [`Wakeup::wait`] whenever `fd` is readable. The fd must outlive this set's use
    /// (a closed fd leaves the set by itself).
    pub fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: both fds are open; `event` is a valid epoll_event.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until one of the fds is readable (true) or `timeout` passes (false). A signal
    /// counts as a timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `events` has room for the number of events passed.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                ms,
            )
        };
        n > 0
    }
}

/// The rest between two drains. Every wake-up costs the agent two context switches (tens of
/// microseconds on a VM) and the CPU it lands on a preemption, so a burst is read in batches:
/// each drain that found at least `burst` records doubles the next rest, up to `max`; a drain
/// that found fewer brings it back to `min`. A lone exec (its record, its first mappings) is
/// read at once; an exec storm costs at most one drain per `max`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spacing {
    rest: Duration,
    min: Duration,
    max: Duration,
    burst: usize,
}

impl Spacing {
    pub fn new(min: Duration, max: Duration, burst: usize) -> Spacing {
        Spacing {
            rest: min,
            min,
            max,
            burst,
        }
    }

    /// How long to rest after a drain that read `records`.
    pub fn after(&mut self, records: usize) -> Duration {
        self.rest = if records >= self.burst {
            (self.rest * 2).min(self.max)
        } else {
            self.min
        };
        self.rest
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::{Spacing, Wakeup};

    #[test]
    fn rests_grow_while_drains_find_bursts_and_reset_after_a_small_one() {
        let ms = Duration::from_millis;
        let mut spacing = Spacing::new(ms(1), ms(10), 16);
        assert_eq!(spacing.after(3), ms(1));
        let rests: Vec<_> = (0..6).map(|_| spacing.after(40)).collect();
        assert_eq!(rests, [ms(2), ms(4), ms(8), ms(10), ms(10), ms(10)]);
        assert_eq!(spacing.after(16), ms(10));
        assert_eq!(spacing.after(15), ms(1));
        assert_eq!(spacing.after(0), ms(1));
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds, each owned by one File.
        unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn wakes_when_an_fd_is_readable_and_times_out_otherwise() {
        let wakeup = Wakeup::new().unwrap();
        let (read, mut write) = pipe();
        wakeup.add(read.as_raw_fd()).unwrap();
        assert!(!wakeup.wait(Duration::from_millis(30)));
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            write.write_all(b"x").unwrap();
            write
        });
        assert!(wakeup.wait(Duration::from_secs(10)));
        // Level-triggered: still readable, so the next wait returns at once.
        assert!(wakeup.wait(Duration::from_secs(10)));
        drop(writer.join().unwrap());
    }

    #[test]
    fn an_fd_that_cannot_be_polled_is_an_error() {
        let wakeup = Wakeup::new().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(wakeup.add(file.as_raw_fd()).is_err());
    }
}
