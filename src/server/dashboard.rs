//! The live dashboard: `GET /` serves one page (its style and script built into the
//! binary; nothing is fetched from anywhere else), and `GET /v1/dashboard/events`
//! streams what it shows as Server-Sent Events.
//!
//! Once the pool is ready, a task samples it every second and records its worker
//! events, in rings of fixed size (five minutes of samples, the last 50 events). A
//! stream starts with `history` (the samples and events kept) and the latest
//! `snapshot`, then sends a `snapshot` every second (workers, queue, sessions, totals
//! and that second's sample) and a `worker` event as each happens. At most
//! [`MAX_STREAMS`] streams are open at once; past that, `503 too_many_streams`.
//!
//! The page holds no data, so it is served without a token; the stream is an
//! operator route (it shows workers' stderr). The page sends the token itself, read
//! from the URL fragment (`/#token=...`, never sent to the server) or asked for when
//! the stream answers 401, which is why it reads the stream with `fetch` rather than
//! `EventSource` (which cannot send headers).

mod history;
mod sampler;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::{Stream, StreamExt, stream};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::ServerState;
use super::errors::refusal;
use crate::pool::PoolEvent;
use history::History;
use sampler::Sampler;

/// Most dashboard streams open at once.
const MAX_STREAMS: usize = 16;
/// How often the pool is sampled and a snapshot sent.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Updates a stream may fall behind by before it skips some.
const UPDATES_BUFFERED: usize = 16;

/// The page, with its style and script put in.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    include_str!("dashboard/index.html")
        .replace(
            "/* dashboard.css */",
            include_str!("dashboard/dashboard.css"),
        )
        .replace("// dashboard.js", include_str!("dashboard/dashboard.js"))
});

/// What the page may do: run its own inline script and style, and read this server.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Something to send to every open stream.
#[derive(Clone, Debug)]
enum Update {
    /// The pool now (JSON).
    Snapshot(Arc<str>),
    /// A worker event (JSON).
    Worker(Arc<str>),
}

impl Update {
    fn event(&self) -> Event {
        match self {
            Update::Snapshot(json) => Event::default().event("snapshot").data(&**json),
            Update::Worker(json) => Event::default().event("worker").data(&**json),
        }
    }
}

/// The dashboard's part of the server state: what it remembers of the pool, and
/// its open streams.
#[derive(Debug)]
pub(super) struct Dashboard {
    history: Mutex<History>,
    /// Sent while `history` is locked, so a new stream's history and its updates
    /// neither overlap nor leave a gap.
    updates: broadcast::Sender<Update>,
    recording: AtomicBool,
    streams: AtomicUsize,
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            history: Mutex::default(),
            updates: broadcast::channel(UPDATES_BUFFERED).0,
            recording: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
        }
    }
}

impl Dashboard {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().expect("dashboard history poisoned")
    }

    fn record_sample(&self, sample: sampler::Sample, snapshot: String) {
        let snapshot: Arc<str> = Arc::from(snapshot);
        let mut history = self.history();
        history.push_sample(sample, snapshot.clone());
        let _ = self.updates.send(Update::Snapshot(snapshot));
    }

    fn record_event(&self, event: &PoolEvent) {
        let mut history = self.history();
        let Some(recent) = history.push_event(event) else {
            return;
        };
        let json = serde_json::to_string(recent).expect("an event serialises");
        let _ = self.updates.send(Update::Worker(Arc::from(json)));
    }
}

/// Starts recording the pool of `state` for the dashboard, once (it needs a Tokio
/// runtime; without one nothing is recorded). The task ends with the state.
pub(super) fn record(state: &Arc<ServerState>) {
    let (Some(pool), Ok(runtime)) = (state.pool(), tokio::runtime::Handle::try_current()) else {
        return;
    };
    if state.dashboard.recording.swap(true, Ordering::SeqCst) {
        return;
    }
    runtime.spawn(run(Arc::downgrade(state), pool.subscribe()));
}

/// Samples the pool every second and records its worker events, while `state` lasts.
async fn run(state: Weak<ServerState>, mut events: broadcast::Receiver<PoolEvent>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sampler = Sampler::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(state) = state.upgrade() else { return };
                if let Some(pool) = state.pool() {
                    let (sample, snapshot) = sampler.take(pool);
                    state.dashboard.record_sample(sample, snapshot);
                }
            }
            event = events.recv() => match event {
                Ok(event) => {
                    let Some(state) = state.upgrade() else { return };
                    state.dashboard.record_event(&event);
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "the dashboard missed pool events");
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// `GET /`: the dashboard's page.
pub(super) async fn page() -> Response {
    let mut response = Html(PAGE.as_str()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One of the [`MAX_STREAMS`] stream slots, given back when dropped.
struct StreamSlot(Arc<ServerState>);

impl StreamSlot {
    fn take(state: &Arc<ServerState>) -> Option<StreamSlot> {
        state
            .dashboard
            .streams
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(state.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.dashboard.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `GET /v1/dashboard/events`: `history`, the latest `snapshot`, then a `snapshot`
/// every second and each `worker` event, until the client leaves or the server
/// drains.
pub(super) async fn events(State(state): State<Arc<ServerState>>) -> Response {
    if let Err(unavailable) = state.serving_pool() {
        return unavailable.into_response();
    }
    let Some(slot) = StreamSlot::take(&state) else {
        let mut response = refusal(
            "too_many_streams",
            StatusCode::SERVICE_UNAVAILABLE,
            format!("at most {MAX_STREAMS} dashboard streams may be open at once"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    let (first, updates) = {
        let history = state.dashboard.history();
        let mut first = vec![Event::default().event("history").data(history.to_json())];
        first.extend(history.snapshot().map(|s| Update::Snapshot(s).event()));
        (first, state.dashboard.updates.subscribe())
    };
    Sse::new(
        stream::iter(first)
            .chain(live(updates, slot))
            .map(Ok::<_, Infallible>),
    )
    .into_response()
}

/// The updates as they come, while the server serves; skips those a slow client
/// fell behind on (the next snapshot is whole).
fn live(updates: broadcast::Receiver<Update>, slot: StreamSlot) -> impl Stream<Item = Event> {
    stream::unfold((updates, slot), |(mut updates, slot)| async move {
        loop {
            let update = updates.recv().await;
            if slot.0.serving_pool().is_err() {
                return None;
            }
            match update {
                Ok(update) => return Some((update.event(), (updates, slot))),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_holds_its_style_and_script() {
        assert!(!PAGE.contains("/* dashboard.css */") && !PAGE.contains("// dashboard.js"));
        assert!(PAGE.contains("/v1/dashboard/events"));
        // Nothing is fetched from elsewhere.
        for external in ["http://", "https://", "src=", "@import", "url("] {
            assert!(!PAGE.contains(external), "the page names {external}");
        }
    }
}
