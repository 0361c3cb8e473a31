//! File descriptors: every connection costs one (two while its handshake is
//! watched), so they are what a flood exhausts first.
//!
//! At start the gateway raises its soft `RLIMIT_NOFILE` to the hard limit
//! (the soft default of 1024 is a relic of `select`; the hard limit is
//! the operator's). When they run out anyway, a listener that cannot
//! accept would leave connections waiting in its backlog, unanswered, and
//! wake up again and again for them; instead each listener keeps one
//! descriptor in reserve, and on `EMFILE`/`ENFILE` gives it up to accept
//! the waiting connection, resets it (a clear, counted refusal) and takes
//! the reserve back.

use std::fs::File;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("reading RLIMIT_NOFILE: {0}")]
    Get(io::Error),
    #[error("raising the RLIMIT_NOFILE soft limit from {from} to {to}: {source}")]
    Set {
        from: u64,
        to: u64,
        source: io::Error,
    },
}

/// The soft limit before and after [`raise_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub now: u64,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit.
pub fn raise_limit() -> Result<Raised, DescriptorError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(DescriptorError::Get(io::Error::last_os_error()));
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur == limit.rlim_max {
        return Ok(Raised {
            before,
            now: before,
        });
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the rlimit we pass; the soft limit is at most
    // the hard one, which any process may do.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
        return Err(DescriptorError::Set {
            from: before,
            to: limit.rlim_max,
            source: io::Error::last_os_error(),
        });
    }
    Ok(Raised {
        before,
        now: limit.rlim_max,
    })
}

/// Whether `e` says this process (or the system) has no descriptor left.
pub fn exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One descriptor held back for refusing connections when there are none.
pub struct Reserve(Option<File>);

impl Reserve {
    pub fn new() -> Reserve {
        Reserve(open())
    }

    /// Gives the descriptor up for a moment; false when there was none to
    /// give (it could not be taken back last time).
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the descriptor back (false when another thread was quicker).
    pub fn retake(&mut self) -> bool {
        if self.0.is_none() {
            self.0 = open();
        }
        self.0.is_some()
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::new()
    }
}

fn open() -> Option<File> {
    File::open("/dev/null").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let raised = raise_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
            0
        );
        assert_eq!(
            (raised.now, limit.rlim_cur),
            (limit.rlim_max, limit.rlim_max)
        );
        assert!(raised.before <= raised.now);
    }

    #[test]
    fn a_reserve_is_given_up_and_taken_back() {
        let mut r = Reserve::new();
        assert!(r.release());
        assert!(!r.release());
        assert!(r.retake());
        assert!(r.release());
    }

    #[test]
    fn emfile_and_enfile_are_exhaustion() {
        assert!(exhausted(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(exhausted(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!exhausted(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
