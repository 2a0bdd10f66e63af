//! The response body the client receives: either a gateway-made body or the
//! upstream's body streamed through frame by frame. Whichever way it ends —
//! fully sent, client gone, upstream broken — it hands the request context to
//! the settle phase exactly once.
//!
//! A client that leaves a metered 2xx response early does not end its bill:
//! the gateway reads on in the background ([`super::read_on`]) to meter the
//! usage the upstream reports at the end, and charges the hold if it cannot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::context::{Outcome, RequestCtx};
use super::Proxy;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Error returned into the client stream when the upstream goes silent.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?}")]
pub struct IdleTimeout(Duration);

/// Error returned into the client stream when it ran too long.
#[derive(Debug, thiserror::Error)]
#[error("the response ran longer than {0:?} and was ended")]
pub struct TooLong(Duration);

enum Source {
    /// A body the gateway made itself (errors, refusals); `None` once sent.
    Local(Option<Bytes>),
    /// The upstream's body, passed through without buffering.
    Upstream {
        body: Incoming,
        idle_timeout: Duration,
        /// Armed only once the upstream makes the body wait: a response
        /// whose frames are ready when asked for (most of them) never
        /// touches the timer wheel. Boxed because `Sleep` is `!Unpin`.
        idle_timer: Option<Pin<Box<Sleep>>>,
        /// A frame came since the current wait began: the next wait
        /// begins at the next `Pending`.
        progressed: bool,
        /// When the current wait for the upstream began. The timer is not
        /// moved at every wait: armed for an earlier one, it fires early,
        /// and is then moved to this wait's end.
        waiting_since: Instant,
        /// When the response must have ended (`max_response_duration`).
        deadline: Instant,
        max_duration: Duration,
    },
}

/// Hands the context to [`Proxy::settle`] when the body ends or is dropped.
struct SettleOnDone {
    proxy: Arc<Proxy>,
    /// Boxed: the context is large and the body is moved around by hyper.
    ctx: Box<RequestCtx>,
}

impl SettleOnDone {
    /// A metered 2xx response whose usage is still to come.
    fn wants_usage(&self) -> bool {
        self.ctx.charge.as_ref().is_some_and(|charge| {
            charge.meter.is_some() && charge.upstream_status.is_some_and(|status| status.is_success())
        })
    }
}

pub struct GatewayBody {
    source: Source,
    settle: Option<SettleOnDone>,
}

impl GatewayBody {
    pub fn local(bytes: Bytes) -> Self {
        GatewayBody { source: Source::Local(Some(bytes)), settle: None }
    }

    pub fn upstream(body: Incoming, idle_timeout: Duration, max_duration: Duration) -> Self {
        let now = Instant::now();
        let deadline = now + max_duration;
        GatewayBody {
            source: Source::Upstream {
                body,
                idle_timeout,
                idle_timer: None,
                progressed: true,
                waiting_since: now,
                deadline,
                max_duration,
            },
            settle: None,
        }
    }

    /// Arrange for `proxy.settle(ctx, ..)` to run when this body is done.
    pub fn settle_with(&mut self, proxy: Arc<Proxy>, ctx: Box<RequestCtx>) {
        self.settle = Some(SettleOnDone { proxy, ctx });
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(done) = self.settle.take() {
            let SettleOnDone { proxy, ctx } = done;
            proxy.settle(ctx, outcome);
        }
    }

    fn meter_mut(&mut self) -> Option<&mut crate::meter::Meter> {
        self.settle.as_mut()?.ctx.charge.as_mut()?.meter.as_mut()
    }

    /// Pass a frame through the meter (which may trim injected usage) and
    /// count what reaches the client. `None`: nothing left to send yet.
    fn observe(&mut self, frame: Frame<Bytes>) -> Option<Frame<Bytes>> {
        let frame = match frame.into_data() {
            Ok(data) => {
                let data = match self.meter_mut() {
                    Some(meter) => meter.observe(data),
                    None => data,
                };
                self.count(data)?
            }
            Err(frame) => frame,
        };
        Some(frame)
    }

    fn count(&mut self, data: Bytes) -> Option<Frame<Bytes>> {
        if data.is_empty() {
            return None;
        }
        if let Some(settle) = self.settle.as_mut() {
            settle.ctx.response_bytes += data.len() as u64;
        }
        Some(Frame::data(data))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.poll_source(cx) {
                Poll::Ready(Some(Ok(frame))) => match this.observe(frame) {
                    Some(frame) => return Poll::Ready(Some(Ok(frame))),
                    // The meter is holding an incomplete event; read on.
                    None => continue,
                },
                Poll::Ready(None) => {
                    // The upstream ended: release what the meter still holds
                    // (a last event without its blank line) before ending.
                    this.source = Source::Local(None);
                    let tail = this.meter_mut().map(|meter| meter.end_of_body()).unwrap_or_default();
                    if let Some(frame) = this.count(tail) {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    this.finish(Outcome::Completed);
                    return Poll::Ready(None);
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Local(bytes) => bytes.is_none(),
            // Not ended while the meter may still hold a last event.
            Source::Upstream { body, .. } => {
                body.is_end_stream()
                    && !self
                        .settle
                        .as_ref()
                        .and_then(|s| s.ctx.charge.as_ref()?.meter.as_ref())
                        .is_some_and(|meter| meter.holds_bytes())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Local(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Source::Local(None) => SizeHint::with_exact(0),
            // The meter removes the usage the client did not ask for: the
            // body is shorter than the upstream's, and hyper would send the
            // upstream's length again if it were hinted.
            Source::Upstream { .. } if self.rewritten() => SizeHint::default(),
            Source::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl GatewayBody {
    /// Whether the client gets other bytes than the upstream sent.
    fn rewritten(&self) -> bool {
        self.settle.as_ref().and_then(|s| s.ctx.charge.as_ref()).is_some_and(|charge| charge.injected_usage)
    }

    /// The next frame from the source, with idle-timeout, deadline and error
    /// handling.
    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.source {
            Source::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream {
                body,
                idle_timeout,
                idle_timer,
                progressed,
                waiting_since,
                deadline,
                max_duration,
            } => {
                let max = *max_duration;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        *progressed = true;
                        // A body whose frames are always ready (its client
                        // reads slower than its upstream writes) never
                        // waits on the timer: its deadline is read here.
                        if Instant::now() >= *deadline {
                            return self.too_long(max);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.finish(Outcome::UpstreamBroke);
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => {
                        let now = Instant::now();
                        if now >= *deadline {
                            return self.too_long(max);
                        }
                        if std::mem::take(progressed) {
                            *waiting_since = now;
                        }
                        // One timer for both limits: whichever comes first.
                        let wake_at = (*waiting_since + *idle_timeout).min(*deadline);
                        let timer =
                            idle_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake_at)));
                        loop {
                            if timer.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            // Armed for an earlier wait, it fired before this one's end.
                            if timer.deadline() >= wake_at {
                                break;
                            }
                            timer.as_mut().reset(wake_at);
                        }
                        if Instant::now() >= *deadline {
                            return self.too_long(max);
                        }
                        let timeout = *idle_timeout;
                        self.finish(Outcome::UpstreamIdle);
                        Poll::Ready(Some(Err(IdleTimeout(timeout).into())))
                    }
                }
            }
        }
    }

    /// End a response that ran past `max_response_duration`.
    fn too_long(&mut self, max: Duration) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.source = Source::Local(None);
        self.finish(Outcome::TooLong);
        Poll::Ready(Some(Err(TooLong(max).into())))
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        // hyper may drop a body without polling past its last frame once
        // `is_end_stream` says it is done; only an unfinished body means the
        // client went away.
        if self.is_end_stream() {
            return self.finish(Outcome::Completed);
        }
        let Some(done) = self.settle.take() else { return };
        match std::mem::replace(&mut self.source, Source::Local(None)) {
            // Reading on needs the runtime (gone only while it shuts down).
            Source::Upstream { body, .. }
                if done.wants_usage() && tokio::runtime::Handle::try_current().is_ok() =>
            {
                let SettleOnDone { proxy, ctx } = done;
                super::read_on::body(proxy, ctx, body);
            }
            _ if done.wants_usage() => {
                let SettleOnDone { proxy, ctx } = done;
                proxy.settle(ctx, Outcome::Abandoned);
            }
            _ => {
                let SettleOnDone { proxy, ctx } = done;
                proxy.settle(ctx, Outcome::ClientGone);
            }
        }
    }
}
