//! Reading on after the client left: a metered call the upstream was sent is
//! billed by it whether or not anyone reads the answer, so the gateway reads
//! the answer itself in the background and settles from the usage in it.
//!
//! Two ways in: the client left a 2xx response before its usage
//! ([`body`], from the response body's drop), or before the response head
//! came, or the gateway stopped waiting for the head and answered 504
//! ([`head`]). Both are bounded by `[server] read_on_timeout_ms` and
//! `read_on_max_bytes`, and by the grace period of a shutdown, as the
//! requests still being served are; what they cannot read is charged the
//! hold.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::context::{Outcome, RequestCtx};
use super::upstream::HeadFuture;
use super::Proxy;

/// Reads the rest of a 2xx upstream body through the meter, then settles.
pub(super) fn body(proxy: Arc<Proxy>, ctx: Box<RequestCtx>, body: Incoming) {
    let background = proxy.background.clone();
    background.spawn(async move {
        let mut ctx = ctx;
        let max_bytes = proxy.config.server.read_on_max_bytes;
        let outcome = within_bounds(&proxy, None, drain_through_meter(body, &mut ctx, max_bytes)).await;
        proxy.settle(ctx, outcome.unwrap_or(Outcome::Abandoned));
    });
}

/// Waits for the response head of a call the upstream was sent (until
/// `head_deadline`, then `read_on_timeout` more), reads its body through the
/// meter, then settles. Without a head in time the call is charged its hold:
/// the upstream had it and may bill it all.
pub(super) fn head(proxy: Arc<Proxy>, ctx: Box<RequestCtx>, head: HeadFuture, head_deadline: Instant) {
    // The grace period over (or the runtime gone): no time to wait.
    let grace_over = proxy.grace_ends().is_some_and(|ends| ends <= Instant::now());
    if grace_over || tokio::runtime::Handle::try_current().is_err() {
        return proxy.settle(ctx, Outcome::NoAnswer);
    }
    let background = proxy.background.clone();
    background.spawn(async move {
        let mut ctx = ctx;
        let max_bytes = proxy.config.server.read_on_max_bytes;
        let read = async {
            match head.await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    ctx.upstream_status = Some(parts.status);
                    if let Some(charge) = ctx.charge.as_mut() {
                        charge.on_response_head(parts.status, &parts.headers);
                    }
                    drain_through_meter(body, &mut ctx, max_bytes).await
                }
                Err(_) => Outcome::UpstreamBroke,
            }
        };
        let outcome = within_bounds(&proxy, Some(head_deadline), read).await;
        let outcome = outcome.unwrap_or(if ctx.upstream_status.is_some() {
            Outcome::Abandoned
        } else {
            Outcome::NoAnswer
        });
        proxy.settle(ctx, outcome);
    });
}

/// `read`'s outcome, or `None` once `read_on_timeout` has passed (counted
/// from `from`, or from now) or a shutdown's grace period is over.
async fn within_bounds(
    proxy: &Proxy,
    from: Option<Instant>,
    read: impl std::future::Future<Output = Outcome>,
) -> Option<Outcome> {
    let deadline =
        from.unwrap_or_else(Instant::now).max(Instant::now()) + proxy.config.server.read_on_timeout;
    tokio::select! {
        outcome = read => Some(outcome),
        () = tokio::time::sleep_until(deadline) => None,
        () = proxy.grace_over() => None,
    }
}

async fn drain_through_meter(mut body: Incoming, ctx: &mut RequestCtx, max_bytes: u64) -> Outcome {
    let mut read = 0u64;
    loop {
        match body.frame().await {
            None => {
                // A last event without its blank line is still an event:
                // the rewriter holds it until told the body ended.
                if let Some(meter) = ctx.charge.as_mut().and_then(|c| c.meter.as_mut()) {
                    let _for_nobody = meter.end_of_body();
                }
                return Outcome::Completed;
            }
            Some(Err(_)) => return Outcome::UpstreamBroke,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                read += data.len() as u64;
                if read > max_bytes {
                    return Outcome::Abandoned;
                }
                if let Some(meter) = ctx.charge.as_mut().and_then(|c| c.meter.as_mut()) {
                    meter.observe(data);
                }
            }
        }
    }
}
