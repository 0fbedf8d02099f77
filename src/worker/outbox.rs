//! The host's end of a worker's input: frames in order, written in batches.
//!
//! A sender encodes its frame and queues it ([`Outbox::push`]). A lone call's frame,
//! or a control frame, is then written by its sender right away ([`Outbox::flush`]),
//! with whatever was queued before it, without waiting for the pipe: a write that
//! would block leaves the rest to the outbox's task. A frame for a worker that is busy
//! anyway (a call behind others) only wakes the task ([`Outbox::flush_soon`]), which
//! first lets the other senders that are ready run, then writes every frame queued
//! with one system call. Frames leave in the order they were queued, and only the
//! task ever waits for the pipe, so a sender that goes away never leaves a frame half
//! written.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures::task::noop_waker_ref;
use tokio::io::AsyncWrite;
use tokio::sync::Notify;

use crate::worker::WorkerInput;

/// Most frames one write carries.
const MAX_BATCH: usize = 64;

/// The frames on their way to one worker.
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Wakes the task that writes deferred frames and waits for a full pipe.
    wake: Notify,
}

struct State {
    queue: VecDeque<Bytes>,
    /// The pipe, while nobody is writing to it.
    writer: Option<WorkerInput>,
    /// Closed by the host: no more frames; the pipe closes once the queue is written.
    closed: bool,
    /// A write failed: the worker does not read any more.
    broken: bool,
}

impl State {
    /// Puts the pipe back after a write; closes it if the host closed the outbox and
    /// everything is written.
    fn give_back(&mut self, writer: WorkerInput) {
        if !(self.closed && self.queue.is_empty()) {
            self.writer = Some(writer);
        }
    }
}

/// How far a write got without waiting.
enum Progress {
    Done,
    Blocked,
    Failed(std::io::Error),
}

impl Outbox {
    /// An outbox writing to `writer`, with its task started.
    pub fn start(writer: WorkerInput) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                writer: Some(writer),
                closed: false,
                broken: false,
            }),
            wake: Notify::new(),
        });
        tokio::spawn(Arc::clone(&outbox).run());
        outbox
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("outbox poisoned")
    }

    /// Queues `frame` behind the frames queued before it. Fails when the outbox is
    /// closed or a write to the pipe failed (the frame is then not sent).
    pub fn push(&self, frame: Bytes) -> std::io::Result<()> {
        let mut state = self.lock();
        if state.closed || state.broken {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        state.queue.push_back(frame);
        Ok(())
    }

    /// Writes what is queued now, without waiting for the pipe (a full pipe leaves
    /// the rest to the task). Does nothing while someone else writes: the queue goes
    /// with their next write. Fails when the pipe does (the queue is then dropped).
    pub fn flush(&self) -> std::io::Result<()> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            return Ok(());
        }
        let Some(mut writer) = state.writer.take() else {
            return Ok(());
        };
        match write_without_waiting(&mut writer, &mut state.queue) {
            Progress::Done => {
                state.give_back(writer);
                Ok(())
            }
            Progress::Blocked => {
                state.give_back(writer);
                drop(state);
                self.wake.notify_one();
                Ok(())
            }
            Progress::Failed(error) => {
                state.broken = true;
                state.queue.clear();
                Err(error)
            }
        }
    }

    /// Leaves what is queued to the task, which writes it after the senders ready to
    /// run have queued theirs.
    pub fn flush_soon(&self) {
        self.wake.notify_one();
    }

    /// Closes the worker's input once the frames queued are written.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        if let Some(writer) = state.writer.take() {
            state.give_back(writer);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Writes deferred frames, and frames a full pipe held back, until closed.
    async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            // Senders woken together with this task queue their frames first.
            tokio::task::yield_now().await;
            loop {
                let (mut writer, mut batch) = {
                    let mut state = self.lock();
                    if state.queue.is_empty() || state.broken {
                        if state.closed {
                            return;
                        }
                        break;
                    }
                    let Some(writer) = state.writer.take() else {
                        // A sender is writing; it takes the queue along.
                        break;
                    };
                    (writer, std::mem::take(&mut state.queue))
                };
                let written = write_all(&mut writer, &mut batch).await;
                let mut state = self.lock();
                match written {
                    // Frames queued meanwhile are in the queue, after this batch.
                    Ok(()) => state.give_back(writer),
                    Err(_) => {
                        // The worker stopped reading: its calls fail when its output
                        // ends.
                        state.broken = true;
                        state.queue.clear();
                    }
                }
            }
        }
    }
}

/// Writes from the front of `queue` as long as the pipe takes it.
fn write_without_waiting(writer: &mut WorkerInput, queue: &mut VecDeque<Bytes>) -> Progress {
    let mut context = Context::from_waker(noop_waker_ref());
    while !queue.is_empty() {
        match poll_write_some(writer, queue, &mut context) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => return Progress::Failed(error),
            Poll::Pending => return Progress::Blocked,
        }
    }
    Progress::Done
}

/// Writes all of `queue`, waiting for room in the pipe.
async fn write_all(writer: &mut WorkerInput, queue: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !queue.is_empty() {
        std::future::poll_fn(|context| poll_write_some(writer, queue, context)).await?;
    }
    Ok(())
}

/// One vectored write from the front of `queue`; drops what it wrote.
fn poll_write_some(
    writer: &mut WorkerInput,
    queue: &mut VecDeque<Bytes>,
    context: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    let slices: Vec<IoSlice<'_>> = queue
        .iter()
        .take(MAX_BATCH)
        .map(|frame| IoSlice::new(frame))
        .collect();
    let mut written = match Pin::new(&mut *writer).poll_write_vectored(context, &slices) {
        Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
        Poll::Ready(Ok(written)) => written,
        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
        Poll::Pending => return Poll::Pending,
    };
    while written > 0 {
        let front = queue.front_mut().expect("wrote no more than was queued");
        let taken = written.min(front.len());
        front.advance(taken);
        written -= taken;
        if front.is_empty() {
            queue.pop_front();
        }
    }
    Poll::Ready(Ok(()))
}
