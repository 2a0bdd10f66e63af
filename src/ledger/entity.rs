//! Entity records: organizations, users, applications and API keys.
//!
//! These are plain data, stored whole in the journal on every change (an
//! upsert), so a replay only has to keep the last version of each.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ledger::calendar::YearMonth;
use crate::ledger::contract::ContractTerm;
use crate::ledger::ids::{AppId, KeyId, OrgId, Owner, UserId};
use crate::ledger::limit::Limits;

/// The customer: owns a pool wallet and a list of contract terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organization {
    /// Id.
    pub id: OrgId,
    /// Display name.
    pub name: String,
    /// Zone in which days, months and contract years begin.
    pub time_zone: Tz,
    /// Terms in start order, never overlapping.
    pub contracts: Vec<ContractTerm>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The `Idempotency-Key` it was created under: a retry answers this org.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Which wallet a user draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// Draws from the org pool.
    Pro,
    /// Draws from a personal Lite wallet funded monthly.
    Lite,
}

/// A named user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Id.
    pub id: UserId,
    /// Owning organization.
    pub org: OrgId,
    /// Display name.
    pub name: String,
    /// Current plan.
    pub plan: Plan,
    /// Allowance granted on the 1st of each month while on Lite.
    pub lite_monthly_allowance: Decimal,
    /// On a Pro -> Lite downgrade, grant a pro-rated allowance at once
    /// instead of waiting for the next 1st.
    pub prorate_on_downgrade: bool,
    /// First month granted in full on the current Lite stint (`None` on Pro).
    pub lite_allowance_from: Option<YearMonth>,
    /// The user's own spending limits (all their keys together).
    pub limits: Limits,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The `Idempotency-Key` they were created under: a retry answers this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// An embedded application drawing from the org pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    /// Id.
    pub id: AppId,
    /// Owning organization.
    pub org: OrgId,
    /// Display name.
    pub name: String,
    /// Limits of the application as a whole.
    pub limits: Limits,
    /// Limits applied to each end-user id separately.
    pub end_user_limits: Limits,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// SHA-256 of an API key secret; the secret itself is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a presented secret.
    pub fn of_secret(secret: &str) -> Self {
        KeyHash(Sha256::digest(secret.as_bytes()).into())
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only a prefix: enough to tell keys apart in logs.
        write!(f, "KeyHash({}..)", hex::encode(&self.0[..4]))
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&text, &mut bytes).map_err(serde::de::Error::custom)?;
        Ok(KeyHash(bytes))
    }
}

/// An API key record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Id.
    pub id: KeyId,
    /// Owning organization.
    pub org: OrgId,
    /// The user or application it speaks for.
    pub owner: Owner,
    /// Hash of the secret.
    pub hash: KeyHash,
    /// Operator label.
    pub label: String,
    /// The key's own spending limits.
    pub limits: Limits,
    /// Revoked keys resolve to nothing and cannot hold.
    pub revoked: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// What the key may be used for; empty lists allow everything. Records
    /// written before this field existed read as "everything".
    #[serde(default)]
    pub scope: KeyScope,
}

/// Routes and models a key is restricted to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyScope {
    /// Route prefixes (as in the gateway config); empty: any route.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Model or tool names; empty: any.
    #[serde(default)]
    pub models: Vec<String>,
}

impl KeyScope {
    /// A scope written with the trailing `/` the config trims from a
    /// metered prefix still names that route.
    pub fn allows_route(&self, route: &str) -> bool {
        fn bare(prefix: &str) -> &str {
            if prefix.len() > 1 {
                prefix.strip_suffix('/').unwrap_or(prefix)
            } else {
                prefix
            }
        }
        self.routes.is_empty() || self.routes.iter().any(|r| r == route || bare(r) == route)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

#[cfg(test)]
mod tests {
    use super::KeyScope;

    #[test]
    fn a_scope_names_a_metered_route_with_or_without_its_trailing_slash() {
        // The config trims a metered prefix's trailing '/'; a key scoped to
        // the prefix as the operator wrote it keeps its route.
        let scope = KeyScope { routes: vec!["/v1/chat/completions/".into(), "/".into()], models: vec![] };
        assert!(scope.allows_route("/v1/chat/completions"));
        assert!(scope.allows_route("/"));
        assert!(!scope.allows_route("/v1/embeddings"));
        assert!(!KeyScope { routes: vec!["/v1/".into()], models: vec![] }.allows_route("/"));
    }
}
