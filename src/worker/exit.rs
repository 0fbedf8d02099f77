//! Watching a worker process for its exit, whether it is busy or idle.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::watch;

/// How a worker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitInfo {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Its status could not be read.
    Unknown,
}

impl From<ExitStatus> for ExitInfo {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo::Code(code),
            (None, Some(signal)) => ExitInfo::Signal(signal),
            _ => ExitInfo::Unknown,
        }
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exit status {code}"),
            ExitInfo::Signal(signal) => {
                let name = match *signal {
                    libc::SIGKILL => " (SIGKILL)",
                    libc::SIGTERM => " (SIGTERM)",
                    libc::SIGSEGV => " (SIGSEGV)",
                    libc::SIGABRT => " (SIGABRT)",
                    libc::SIGINT => " (SIGINT)",
                    _ => "",
                };
                write!(f, "killed by signal {signal}{name}")
            }
            ExitInfo::Unknown => write!(f, "exit status unknown"),
        }
    }
}

/// A shared view of one process's exit status, filled in when it exits.
#[derive(Clone, Debug)]
pub struct ExitWatch {
    status: watch::Receiver<Option<ExitInfo>>,
}

/// The writing side of an [`ExitWatch`]: reports the exit once and runs the exit hook.
pub struct ExitReporter {
    status: watch::Sender<Option<ExitInfo>>,
    on_exit: Option<Box<dyn FnOnce(ExitInfo) + Send>>,
}

impl ExitReporter {
    /// Records how the process ended; only the first report counts.
    pub fn report(mut self, info: ExitInfo) {
        let first = self.status.send_if_modified(|status| {
            let first = status.is_none();
            if first {
                *status = Some(info);
            }
            first
        });
        if let (true, Some(on_exit)) = (first, self.on_exit.take()) {
            on_exit(info);
        }
    }
}

impl std::fmt::Debug for ExitReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitReporter").finish_non_exhaustive()
    }
}

impl ExitWatch {
    /// A watch and its reporter; `on_exit` runs once, when the exit is reported.
    pub fn channel(on_exit: impl FnOnce(ExitInfo) + Send + 'static) -> (ExitWatch, ExitReporter) {
        let (tx, status) = watch::channel(None);
        let reporter = ExitReporter {
            status: tx,
            on_exit: Some(Box::new(on_exit)),
        };
        (ExitWatch { status }, reporter)
    }

    /// Reaps `child` on a task of its own; `on_exit` runs once when it has exited.
    pub fn spawn(mut child: Child, on_exit: impl FnOnce(ExitInfo) + Send + 'static) -> Self {
        let (watch, reporter) = ExitWatch::channel(on_exit);
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(status) => ExitInfo::from(status),
                Err(_) => ExitInfo::Unknown,
            };
            reporter.report(info);
        });
        watch
    }

    /// True once the process has exited.
    pub fn exited(&self) -> bool {
        self.status.borrow().is_some()
    }

    /// Waits for the exit, however long it takes.
    pub async fn wait_forever(&self) -> ExitInfo {
        let mut status = self.status.clone();
        match status.wait_for(Option::is_some).await {
            Ok(info) => info.unwrap_or(ExitInfo::Unknown),
            // The reporter is gone without a report: treat as exited.
            Err(_) => ExitInfo::Unknown,
        }
    }

    /// Waits up to `limit` for the exit; `None` if the process is still running.
    pub async fn wait(&self, limit: Duration) -> Option<ExitInfo> {
        let mut status = self.status.clone();
        match tokio::time::timeout(limit, status.wait_for(Option::is_some)).await {
            Ok(Ok(info)) => *info,
            _ => *self.status.borrow(),
        }
    }
}
