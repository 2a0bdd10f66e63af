//! The response body the client receives: either a gateway-made body or the
//! upstream's body streamed through frame by frame. Whichever way it ends —
//! fully sent, client gone, upstream broken — it hands the request context to
//! the settle phase exactly once.

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

enum Source {
    /// A body the gateway made itself (errors, refusals); `None` once sent.
    Local(Option<Bytes>),
    /// The upstream's body, passed through without buffering.
    Upstream {
        body: Incoming,
        idle_timeout: Duration,
        /// Boxed because `Sleep` is `!Unpin`; one allocation per streamed response.
        idle_timer: Pin<Box<Sleep>>,
    },
}

/// Hands the context to [`Proxy::settle`] when the body ends or is dropped.
struct SettleOnDone {
    proxy: Arc<Proxy>,
    ctx: RequestCtx,
}

pub struct GatewayBody {
    source: Source,
    /// Boxed: the context is large and the body is moved around by hyper.
    settle: Option<Box<SettleOnDone>>,
}

impl GatewayBody {
    pub fn local(bytes: Bytes) -> Self {
        GatewayBody { source: Source::Local(Some(bytes)), settle: None }
    }

    pub fn upstream(body: Incoming, idle_timeout: Duration) -> Self {
        let idle_timer = Box::pin(tokio::time::sleep(idle_timeout));
        GatewayBody { source: Source::Upstream { body, idle_timeout, idle_timer }, settle: None }
    }

    /// Arrange for `proxy.settle(ctx, ..)` to run when this body is done.
    pub fn settle_with(&mut self, proxy: Arc<Proxy>, ctx: RequestCtx) {
        self.settle = Some(Box::new(SettleOnDone { proxy, ctx }));
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(done) = self.settle.take() {
            let SettleOnDone { proxy, ctx } = *done;
            proxy.settle(ctx, outcome);
        }
    }

    /// Pass a frame through the meter (which may trim injected usage) and
    /// count what reaches the client. `None`: nothing left to send yet.
    fn observe(&mut self, frame: Frame<Bytes>) -> Option<Frame<Bytes>> {
        let Some(settle) = self.settle.as_mut() else {
            return Some(frame);
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let data = match settle.ctx.charge.as_mut().and_then(|c| c.meter.as_mut()) {
                    Some(meter) => meter.observe(data),
                    None => data,
                };
                if data.is_empty() {
                    return None;
                }
                settle.ctx.response_bytes += data.len() as u64;
                Frame::data(data)
            }
            Err(frame) => frame,
        };
        Some(frame)
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
            Source::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Local(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Source::Local(None) => SizeHint::with_exact(0),
            Source::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl GatewayBody {
    /// The next frame from the source, with idle-timeout and error handling.
    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.source {
            Source::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream { body, idle_timeout, idle_timer } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    idle_timer.as_mut().reset(Instant::now() + *idle_timeout);
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    self.finish(Outcome::UpstreamBroke);
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    if idle_timer.as_mut().poll(cx).is_ready() {
                        let timeout = *idle_timeout;
                        self.finish(Outcome::UpstreamIdle);
                        Poll::Ready(Some(Err(IdleTimeout(timeout).into())))
                    } else {
                        Poll::Pending
                    }
                }
            },
        }
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        // hyper may drop a body without polling past its last frame once
        // `is_end_stream` says it is done; only an unfinished body means the
        // client went away.
        let outcome = if self.is_end_stream() { Outcome::Completed } else { Outcome::ClientGone };
        self.finish(outcome);
    }
}
