//! Standard output of the commands that print. When its reader goes away
//! (`dnsfence fqdn list | head -1`), writing fails with a broken pipe: the command then stops
//! quietly with status 0, as Unix filters do, instead of panicking (which `println!` does)
//! or reporting an error.

use std::fmt;
use std::io::{self, Write};

/// Standard output was closed by its reader: the end of the command, not a failure.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Locked standard output, whose broken-pipe errors carry [`StdoutClosed`].
pub(crate) struct Stdout(io::StdoutLock<'static>);

/// Standard output, locked.
pub(crate) fn stdout() -> Stdout {
    Stdout(io::stdout().lock())
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(closed)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(closed)
    }
}

fn closed(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

/// Whether `e` comes from writing to a standard output its reader closed. A broken pipe
/// elsewhere (a socket to the proxy, say) is a real error and does not count.
pub(crate) fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.is::<StdoutClosed>()
            || cause
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_stdout_counts() {
        let from_stdout = anyhow::Error::from(closed(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(is_closed(&from_stdout));
        assert!(is_closed(&from_stdout.context("printing")));
        let from_socket = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!is_closed(&from_socket));
        let other = anyhow::Error::from(closed(io::Error::from(io::ErrorKind::WriteZero)));
        assert!(!is_closed(&other));
    }
}
