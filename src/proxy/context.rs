//! The typed per-request context every phase reads and writes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, StatusCode, Uri};

/// What one request has picked up on its way through the phases. Created when
/// the request arrives, handed to `settle` exactly once when its response ends.
pub struct RequestCtx {
    /// Minted by the gateway for every request: it keys the hold, so nothing
    /// a client sends can name another request's hold.
    pub request_id: HeaderValue,
    /// The client's own `x-request-id`, kept for the access log only.
    pub client_request_id: Option<HeaderValue>,
    /// The caller presented a valid API key (false on public routes).
    pub authenticated: bool,
    pub started: Instant,
    pub peer: SocketAddr,
    /// Index into the config's upstreams, once the route phase has picked one.
    pub upstream: Option<usize>,
    /// The matched route's prefix (a bounded metric label).
    pub route_prefix: Option<Arc<str>>,
    /// Index into the config's routes, beside the prefix: it finds the
    /// route's cached metric handles.
    pub route_index: Option<usize>,
    /// Status of the upstream's response head, if one arrived.
    pub upstream_status: Option<StatusCode>,
    /// Status the client received.
    pub status: StatusCode,
    /// Machine code of the error the gateway answered with, if any.
    pub error_code: Option<&'static str>,
    /// The wallet that pays, once the caller is identified.
    pub wallet: Option<crate::ledger::ids::WalletId>,
    /// Counts this request against its key's in-flight cap until settle.
    pub in_flight: Option<pingora_limits::inflight::Guard>,
    /// The request's money state, once it holds credits.
    pub charge: Option<super::charge::Charge>,
    /// Body bytes handed to the client so far.
    pub response_bytes: u64,
    /// The request was already counted and logged by the context it was
    /// detached from (a 504 whose call settles later): settling this one
    /// records the money only.
    pub counted: bool,
    pub span: tracing::Span,
}

impl RequestCtx {
    /// The span (and so the access log) names the path only, clipped: a
    /// query string can carry secrets, and a client picks the length.
    pub fn new(request_id: HeaderValue, peer: SocketAddr, method: &Method, uri: &Uri) -> Self {
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or("-"),
            method = %method,
            path = super::error::clipped(uri.path()),
        );
        RequestCtx {
            request_id,
            client_request_id: None,
            authenticated: false,
            started: Instant::now(),
            peer,
            upstream: None,
            route_prefix: None,
            route_index: None,
            upstream_status: None,
            status: StatusCode::OK,
            error_code: None,
            wallet: None,
            in_flight: None,
            charge: None,
            response_bytes: 0,
            counted: false,
            span,
        }
    }

    /// Moves the request's charge (and its in-flight place) to a context of
    /// its own, for a task that settles the call after this request has
    /// answered or its client has gone; `status` is what the client got,
    /// `counted` whether this context still answers (and so counts and logs
    /// the request).
    pub fn detach_charge(&mut self, status: StatusCode, counted: bool) -> Box<RequestCtx> {
        Box::new(RequestCtx {
            request_id: self.request_id.clone(),
            client_request_id: self.client_request_id.clone(),
            authenticated: self.authenticated,
            started: self.started,
            peer: self.peer,
            upstream: self.upstream,
            route_prefix: self.route_prefix.clone(),
            route_index: self.route_index,
            upstream_status: None,
            status,
            error_code: None,
            wallet: self.wallet,
            in_flight: self.in_flight.take(),
            charge: self.charge.take(),
            response_bytes: 0,
            counted,
            span: self.span.clone(),
        })
    }
}

/// How a response ended, as seen by the settle phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte reached the client.
    Completed,
    /// The client went away before the body ended.
    ClientGone,
    /// The upstream broke off the body (reset, protocol error).
    UpstreamBroke,
    /// The upstream went silent for longer than its idle timeout.
    UpstreamIdle,
    /// The client went away and reading on for the usage ran out of time or
    /// bytes (or the gateway shut down first).
    Abandoned,
    /// The response ran past `[server] max_response_ms` and was ended.
    TooLong,
    /// The upstream was sent the call and gave no response head in time
    /// (or the gateway shut down first): it may still bill up to the cap.
    NoAnswer,
}

impl Outcome {
    /// The upstream may have produced up to the held cap, and no usage says
    /// otherwise: only the hold is sure not to bill less. An upstream cut for
    /// silence counts: a reasoning model is billed for thinking it does not
    /// stream.
    pub fn charges_hold_without_usage(self) -> bool {
        matches!(
            self,
            Outcome::Completed
                | Outcome::Abandoned
                | Outcome::TooLong
                | Outcome::UpstreamIdle
                | Outcome::NoAnswer
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamBroke => "upstream_broke",
            Outcome::UpstreamIdle => "upstream_idle",
            Outcome::Abandoned => "abandoned",
            Outcome::TooLong => "too_long",
            Outcome::NoAnswer => "no_answer",
        }
    }
}
