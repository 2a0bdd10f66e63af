//! Seeding a gateway through its admin API: organizations, Lite and Pro
//! users, an application, their keys, and which wallet pays for each key.
//!
//! Layout (the same on every gateway, so key `i` means the same tenant):
//! - org `load`: a pool of $1,000,000 a year; `keys` funded users, the first
//!   `lite_share` of them Lite with a $1,000 monthly allowance, the rest Pro;
//!   then `dry_lite` Lite users with a small allowance, meant to run dry;
//! - org `small-pool` (when `dry_pool` > 0): a small pool shared by one Pro
//!   user's key and one application's key, meant to run dry.

use std::collections::BTreeMap;

use anyhow::Context;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::client::Admin;
use crate::mix::KeyCounts;

/// Yearly allocation of the large pool (dollars).
const LARGE_POOL: &str = "1000000";
/// Monthly allowance of a funded Lite user (dollars).
const LARGE_ALLOWANCE: &str = "1000";

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub keys: usize,
    pub lite_share: f64,
    pub dry_lite: usize,
    pub dry_allowance: Decimal,
    pub dry_pool: Decimal,
}

impl TenantConfig {
    /// Keys of the small wallets (Lite users, plus two on the small pool).
    pub fn dry_keys(&self) -> usize {
        self.dry_lite + if self.dry_pool > Decimal::ZERO { 2 } else { 0 }
    }

    pub fn key_counts(&self) -> KeyCounts {
        KeyCounts { funded: self.keys, dry: self.dry_keys() }
    }
}

/// A wallet as the admin API names it: `{"pool": org}` or `{"lite": user}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalletRef {
    Pool(u64),
    Lite(u64),
}

impl WalletRef {
    pub fn from_json(value: &Value) -> Option<WalletRef> {
        if let Some(org) = value.get("pool").and_then(Value::as_u64) {
            return Some(WalletRef::Pool(org));
        }
        value.get("lite").and_then(Value::as_u64).map(WalletRef::Lite)
    }
}

impl std::fmt::Display for WalletRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalletRef::Pool(org) => write!(f, "pool:{org}"),
            WalletRef::Lite(user) => write!(f, "lite:{user}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub secret: String,
    pub wallet: WalletRef,
    /// Seeded small, expected to run dry.
    pub small: bool,
    /// For reports: `pro`, `lite`, `app`.
    pub kind: &'static str,
}

/// The seeded keys of one gateway, in mix order (funded, then small).
#[derive(Debug, Clone)]
pub struct Tenants {
    pub keys: Vec<Tenant>,
    pub orgs: Vec<u64>,
}

impl Tenants {
    /// Every wallet a key pays from.
    pub fn wallets(&self) -> BTreeMap<WalletRef, bool> {
        self.keys.iter().map(|t| (t.wallet, t.small)).collect()
    }
}

pub async fn seed(admin: &Admin, config: &TenantConfig) -> anyhow::Result<Tenants> {
    let today = chrono::Utc::now().date_naive().to_string();
    let org = create_org(admin, "load", &today, LARGE_POOL).await?;
    let mut tenants = Tenants { keys: Vec::new(), orgs: vec![org] };
    let lite_users = (config.keys as f64 * config.lite_share).round() as usize;
    for i in 0..config.keys {
        let tenant = if i < lite_users {
            user_key(admin, org, &format!("lite-{i}"), Some(LARGE_ALLOWANCE), false).await?
        } else {
            user_key(admin, org, &format!("pro-{i}"), None, false).await?
        };
        tenants.keys.push(tenant);
    }
    let allowance = config.dry_allowance.to_string();
    for i in 0..config.dry_lite {
        tenants.keys.push(user_key(admin, org, &format!("small-lite-{i}"), Some(&allowance), true).await?);
    }
    if config.dry_pool > Decimal::ZERO {
        let small = create_org(admin, "small-pool", &today, &config.dry_pool.to_string()).await?;
        tenants.orgs.push(small);
        tenants.keys.push(user_key(admin, small, "small-pro", None, true).await?);
        let app = admin.post(&format!("/admin/v1/orgs/{small}/apps"), &json!({"name": "small-app"})).await?;
        let key = admin.post(&format!("/admin/v1/orgs/{small}/keys"), &json!({"app": app["id"]})).await?;
        tenants.keys.push(Tenant {
            secret: secret(&key)?,
            wallet: WalletRef::Pool(small),
            small: true,
            kind: "app",
        });
    }
    Ok(tenants)
}

async fn create_org(admin: &Admin, name: &str, today: &str, pool: &str) -> anyhow::Result<u64> {
    let body = json!({"name": name,
        "contract": {"start": today, "years": 1, "platform_allocation_per_year": pool}});
    let org = admin.post("/admin/v1/orgs", &body).await?;
    org["id"].as_u64().with_context(|| format!("creating org {name}: no id in {org}"))
}

/// A user (Lite when `allowance` is given) and a key for them.
async fn user_key(
    admin: &Admin,
    org: u64,
    name: &str,
    allowance: Option<&str>,
    small: bool,
) -> anyhow::Result<Tenant> {
    let body = match allowance {
        Some(allowance) => json!({"name": name, "plan": "lite", "lite_monthly_allowance": allowance}),
        None => json!({"name": name, "plan": "pro"}),
    };
    let user = admin.post(&format!("/admin/v1/orgs/{org}/users"), &body).await?;
    let user_id = user["id"].as_u64().with_context(|| format!("creating user {name}: no id in {user}"))?;
    let key = admin.post(&format!("/admin/v1/orgs/{org}/keys"), &json!({"user": user_id})).await?;
    let (wallet, kind) = match allowance {
        Some(_) => (WalletRef::Lite(user_id), "lite"),
        None => (WalletRef::Pool(org), "pro"),
    };
    Ok(Tenant { secret: secret(&key)?, wallet, small, kind })
}

fn secret(key: &Value) -> anyhow::Result<String> {
    Ok(key["secret"].as_str().with_context(|| format!("no secret in the new key {key}"))?.to_owned())
}
