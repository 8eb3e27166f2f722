//! Child processes owned by guards: killed (SIGKILL, by their own pid) and reaped when
//! dropped, so a failing test leaves nothing running.

use std::process::{Child, ChildStdin, Command, ExitStatus};
use std::time::Duration;

use super::wait_until;

/// A child process killed and reaped when dropped.
pub struct Guard {
    child: Child,
    what: String,
}

impl Guard {
    /// Spawns `cmd`, naming it `what` in failures.
    pub fn spawn(mut cmd: Command, what: &str) -> Guard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Guard {
            child,
            what: what.to_string(),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Sends `signal` (a name for kill(1): TERM, USR1…) to the child; panics when it
    /// cannot be sent.
    pub fn signal(&self, signal: &str) {
        assert!(
            self.try_signal(signal),
            "kill -{signal} {} ({}) failed",
            self.pid(),
            self.what
        );
    }

    /// Sends `signal` to the child; whether kill(1) succeeded (it fails once the child has
    /// exited and been reaped).
    pub fn try_signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The write end of the child's stdin, when it was spawned with `Stdio::piped()` (once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// SIGKILL now (unless it has exited), and reap.
    pub fn kill(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}
