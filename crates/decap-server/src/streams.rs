//! Long-lived answers and the server's stop: an event stream ends at once
//! when the server stops (or hands over to a new process in an upgrade),
//! with a `reconnect` event whose `retry` tells the browser how soon to
//! come back. Browsers reconnect on their own and resume from the last
//! event id (log streams carry byte offsets), so a restart shows nothing
//! twice and loses nothing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::sse::Event;
use futures::Stream;
use tokio::sync::watch;

/// How soon a viewer reconnects after a stop.
pub const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// `items`, cut short with `last` when `stopping` turns true.
pub fn cut_when_stopping<S, T>(
    items: S,
    mut stopping: watch::Receiver<bool>,
    last: T,
) -> impl Stream<Item = T>
where
    S: Stream<Item = T> + Send + 'static,
    T: Send + Unpin + 'static,
{
    Cut {
        items: Box::pin(items),
        stop: Box::pin(async move {
            let _ = stopping.wait_for(|s| *s).await;
        }),
        last: Some(last),
        done: false,
    }
}

/// A stream that ends with `last` as soon as `stop` completes.
struct Cut<T> {
    items: Pin<Box<dyn Stream<Item = T> + Send>>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    last: Option<T>,
    done: bool,
}

impl<T: Unpin> Stream for Cut<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(this.last.take());
        }
        match this.items.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

/// `events`, cut short with a `reconnect` event when `stopping` turns true.
pub fn until_stopping<S>(
    events: S,
    stopping: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let reconnect = Event::default()
        .event("reconnect")
        .retry(RECONNECT_AFTER)
        .data("Decap is restarting; reconnect");
    cut_when_stopping(events, stopping, Ok(reconnect))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_stream_ends_with_a_reconnect_hint_when_the_server_stops() {
        let (tx, rx) = watch::channel(false);
        let (etx, erx) = tokio::sync::mpsc::channel::<Event>(4);
        let mut s = Box::pin(until_stopping(
            tokio_stream::wrappers::ReceiverStream::new(erx).map(Ok),
            rx,
        ));
        etx.send(Event::default().data("one")).await.expect("open");
        assert!(s.next().await.is_some());
        tx.send_replace(true);
        let last = s.next().await.expect("a last event").expect("infallible");
        assert!(format!("{last:?}").contains("reconnect"), "{last:?}");
        // At once, though the events it cut would go on (`etx` is open).
        let end = tokio::time::timeout(Duration::from_secs(1), s.next()).await;
        assert!(matches!(end, Ok(None)), "then the stream ends");
        drop(etx);
    }

    #[tokio::test]
    async fn a_stream_that_ends_on_its_own_does_not_wait_for_the_stop() {
        let (_tx, rx) = watch::channel(false);
        let events = futures::stream::iter([Ok(Event::default().data("only"))]);
        let all: Vec<_> = until_stopping(events, rx).collect().await;
        assert_eq!(all.len(), 1);
    }
}
