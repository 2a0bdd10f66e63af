//! Admin API errors and their one mapping to HTTP responses.

use http::StatusCode;

use crate::ledger::LedgerError;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("send the operator or organization token as `Authorization: Bearer <token>`")]
    Unauthorized,
    #[error("the admin API is off: set the environment variable named by [admin] token_env")]
    Disabled,
    #[error("this endpoint is for the operator token only")]
    OperatorOnly,
    #[error(
        "creating or removing credit (purchases, adjustments, contracts, Lite allowances) needs the \
         operator token or an org token with `finance = true`"
    )]
    FinanceOnly,
    #[error("{0}")]
    NotFound(String),
    #[error("no admin endpoint {method} {path}; see GET /admin/v1/openapi.json")]
    NoRoute { method: String, path: String },
    #[error("{path} does not answer {method}; it answers {allow}")]
    MethodNotAllowed { method: String, path: String, allow: String },
    #[error("`{field}`: {reason}")]
    BadRequest { field: String, reason: String },
    /// A body the schema accepts, refused by a rule a schema cannot state
    /// (a Lite user without an allowance, one owner of two, a webhook to a
    /// private address): 422, so 400 always means "not the documented shape".
    #[error("`{field}`: {reason}")]
    Rule { field: String, reason: String },
    #[error("the {0} header is required: a retry with the same key changes nothing")]
    MissingHeader(&'static str),
    #[error(
        "this organization's token made {limit} admin writes within the last minute; retry after the \
         Retry-After seconds"
    )]
    TooManyWrites { limit: u32 },
    #[error(
        "that much of {wallet}'s credit is leased to replicas serving calls (or expires within \
         seconds); they were asked to give back what they are not using: retry in a few seconds \
         with the same Idempotency-Key"
    )]
    CreditLeased { wallet: String },
    #[error("{0}")]
    Ledger(LedgerError),
    #[error("the ledger store could not be read: {0}")]
    Store(String),
    /// A purchase or adjustment met a failing store: it may have been
    /// credited in memory and become durable once the store recovers, or not
    /// at all, so the caller cannot know. Its idempotency key settles it.
    #[error(
        "the outcome of this {operation} is unknown: the store failed ({reason}). It may or may not \
         have been recorded. Retry with the same Idempotency-Key once GET /readyz answers 200: the \
         retry answers the original result, and never credits twice"
    )]
    OutcomeUnknown { operation: &'static str, reason: String },
}

impl From<LedgerError> for AdminError {
    fn from(error: LedgerError) -> Self {
        AdminError::Ledger(error)
    }
}

impl AdminError {
    /// The answer to a money write that failed: a failing store makes its
    /// outcome unknown; anything else did nothing.
    pub fn money_write(operation: &'static str, error: LedgerError) -> Self {
        match error {
            LedgerError::Unavailable(reason) => {
                AdminError::OutcomeUnknown { operation, reason: reason.to_string() }
            }
            other => AdminError::Ledger(other),
        }
    }

    pub fn bad(field: impl Into<String>, reason: impl Into<String>) -> Self {
        AdminError::BadRequest { field: field.into(), reason: reason.into() }
    }

    pub fn rule(field: impl Into<String>, reason: impl Into<String>) -> Self {
        AdminError::Rule { field: field.into(), reason: reason.into() }
    }

    /// Status and stable code. Anything of another organization answers 404,
    /// exactly as if it did not exist.
    pub fn class(&self) -> (StatusCode, &'static str) {
        match self {
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "invalid_admin_token"),
            AdminError::Disabled => (StatusCode::FORBIDDEN, "admin_disabled"),
            AdminError::OperatorOnly => (StatusCode::FORBIDDEN, "operator_only"),
            AdminError::FinanceOnly => (StatusCode::FORBIDDEN, "finance_scope_required"),
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::NoRoute { .. } => (StatusCode::NOT_FOUND, "no_route"),
            AdminError::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            AdminError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_field"),
            AdminError::Rule { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rule_refused"),
            AdminError::MissingHeader(_) => (StatusCode::BAD_REQUEST, "missing_header"),
            AdminError::TooManyWrites { .. } => (StatusCode::TOO_MANY_REQUESTS, "admin_rate_limited"),
            AdminError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            AdminError::OutcomeUnknown { .. } => (StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown"),
            AdminError::CreditLeased { .. } => (StatusCode::CONFLICT, "credit_leased"),
            AdminError::Ledger(error) => ledger_class(error),
        }
    }
}

fn ledger_class(error: &LedgerError) -> (StatusCode, &'static str) {
    match error {
        LedgerError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ledger_unavailable"),
        LedgerError::UnknownOrg(_)
        | LedgerError::UnknownUser(_)
        | LedgerError::UnknownApp(_)
        | LedgerError::UnknownKey(_)
        | LedgerError::UnknownWallet(_)
        | LedgerError::CrossOrg { .. } => (StatusCode::NOT_FOUND, "not_found"),
        LedgerError::IdempotencyConflict { .. } => (StatusCode::CONFLICT, "idempotency_conflict"),
        LedgerError::DuplicateKey => (StatusCode::CONFLICT, "duplicate_key"),
        LedgerError::BadIdempotencyKey { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
        LedgerError::TooLong { .. } | LedgerError::Unprintable { .. } => {
            (StatusCode::BAD_REQUEST, "invalid_field")
        }
        // The request has the documented shape; the books' rules refuse it
        // (no contract in force, an expiry already past, an overlapping
        // term, an amount that must be positive, ...).
        _ => (StatusCode::UNPROCESSABLE_ENTITY, "rule_refused"),
    }
}
