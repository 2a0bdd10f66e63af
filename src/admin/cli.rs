//! `creditgate admin ...` subcommands: the common operator tasks over the
//! admin API. The token comes from `CREDITGATE_ADMIN_TOKEN`.

use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};

use super::client::{table, AdminClient};

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// Operator or organization token.
    #[arg(long, env = "CREDITGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Args, Debug)]
pub struct ContractArgs {
    /// First day of the term (YYYY-MM-DD).
    #[arg(long)]
    start: String,
    /// Whole years.
    #[arg(long, default_value_t = 1)]
    years: u32,
    /// Platform credits per contract year, e.g. 1000.
    #[arg(long)]
    platform: String,
    #[arg(long, default_value_t = 0)]
    pro_seats: u32,
    /// Credits per Pro seat and contract year.
    #[arg(long, default_value = "0")]
    seat_allocation: String,
}

impl ContractArgs {
    fn json(&self) -> Value {
        json!({
            "start": self.start, "years": self.years, "platform_allocation_per_year": self.platform,
            "pro_seats": self.pro_seats, "seat_allocation_per_year": self.seat_allocation,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create an organization (operator token).
    CreateOrg {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        #[command(flatten)]
        contract: Option<ContractArgs>,
    },
    /// Add a contract term (a renewal).
    AddContract {
        #[arg(long)]
        org: u64,
        #[command(flatten)]
        contract: ContractArgs,
    },
    /// Add a user.
    AddUser {
        #[arg(long)]
        org: u64,
        #[arg(long)]
        name: String,
        /// pro or lite.
        #[arg(long)]
        plan: String,
        /// Monthly allowance for a Lite user, e.g. 10.
        #[arg(long)]
        lite_allowance: Option<String>,
    },
    /// Create an API key for a user or an application; prints the secret once.
    CreateKey {
        #[arg(long)]
        org: u64,
        #[arg(long, conflicts_with = "app", required_unless_present = "app")]
        user: Option<u64>,
        #[arg(long)]
        app: Option<u64>,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Buy credits for the org's pool.
    Purchase {
        #[arg(long)]
        org: u64,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        reference: Option<String>,
        /// Makes a retry safe; defaults to a fresh UUID (printed).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show the pool and Lite wallets of an org.
    Balance {
        #[arg(long)]
        org: u64,
    },
    /// Usage totals, as a table or CSV.
    Usage {
        #[arg(long)]
        org: u64,
        /// Comma-separated: user, app, key, end_user, model, tool, route, day, month.
        #[arg(long, default_value = "model")]
        group_by: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        csv: bool,
    },
}

/// Run one admin command and return what to print.
pub async fn run(args: AdminArgs) -> anyhow::Result<String> {
    let client = AdminClient::new(&args.url, &args.token);
    let pretty = |v: Value| serde_json::to_string_pretty(&v).unwrap_or_default();
    Ok(match args.command {
        AdminCommand::CreateOrg { name, time_zone, contract } => {
            let mut body = json!({"name": name, "time_zone": time_zone});
            if let Some(contract) = contract {
                body["contract"] = contract.json();
            }
            pretty(client.json(Method::POST, "/admin/v1/orgs", Some(&body), None).await?)
        }
        AdminCommand::AddContract { org, contract } => {
            let path = format!("/admin/v1/orgs/{org}/contracts");
            pretty(client.json(Method::POST, &path, Some(&contract.json()), None).await?)
        }
        AdminCommand::AddUser { org, name, plan, lite_allowance } => {
            let mut body = json!({"name": name, "plan": plan});
            if let Some(allowance) = lite_allowance {
                body["lite_monthly_allowance"] = json!(allowance);
            }
            pretty(
                client.json(Method::POST, &format!("/admin/v1/orgs/{org}/users"), Some(&body), None).await?,
            )
        }
        AdminCommand::CreateKey { org, user, app, label } => {
            let body = match (user, app) {
                (Some(user), _) => json!({"user": user, "label": label}),
                (None, app) => json!({"app": app, "label": label}),
            };
            pretty(client.json(Method::POST, &format!("/admin/v1/orgs/{org}/keys"), Some(&body), None).await?)
        }
        AdminCommand::Purchase { org, amount, reference, idempotency_key } => {
            let key = idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            // Said before sending: if the answer never comes (a timeout, a
            // dropped connection), the retry must reuse this key or it buys again.
            eprintln!("idempotency key: {key} (to retry safely, run again with --idempotency-key {key})");
            let body = json!({"amount": amount, "reference": reference});
            let path = format!("/admin/v1/orgs/{org}/purchases");
            let receipt =
                client.json(Method::POST, &path, Some(&body), Some(&key)).await.map_err(|error| {
                    anyhow::anyhow!(
                    "{error}\nthe purchase may or may not have been made; retry with --idempotency-key {key} \
                     (a retry with the same key never buys twice)"
                )
                })?;
            format!("idempotency key: {key}\n{}", pretty(receipt))
        }
        AdminCommand::Balance { org } => {
            let balances =
                client.json(Method::GET, &format!("/admin/v1/orgs/{org}/balances"), None, None).await?;
            balance_table(&balances)
        }
        AdminCommand::Usage { org, group_by, from, to, csv } => {
            // Encoded, so a time such as 2026-01-01T00:00:00+01:00 keeps its `+`.
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("group_by", &group_by);
            for (name, value) in [("from", from), ("to", to)] {
                if let Some(value) = value {
                    query.append_pair(name, &value);
                }
            }
            if csv {
                query.append_pair("format", "csv");
            }
            let path = format!("/admin/v1/orgs/{org}/usage?{}", query.finish());
            if csv {
                let bytes = client.send(Method::GET, &path, None, None).await?;
                String::from_utf8_lossy(&bytes).trim_end().to_owned()
            } else {
                usage_table(&client.json(Method::GET, &path, None, None).await?)
            }
        }
    })
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn balance_table(balances: &Value) -> String {
    let rows: Vec<Vec<String>> = balances["balances"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|b| {
                    vec![
                        text(&b["wallet"]),
                        text(&b["balance"]),
                        text(&b["available"]),
                        text(&b["held"]),
                        text(&b["open_holds"]),
                        text(&b["resets_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["wallet", "balance", "available", "held", "open_holds", "resets_at"], &rows)
}

fn usage_table(report: &Value) -> String {
    let dimensions: Vec<String> =
        report["group_by"].as_array().map(|d| d.iter().map(text).collect()).unwrap_or_default();
    let metrics = ["requests", "charged", "input_tokens", "output_tokens", "tool_units"];
    let mut header: Vec<&str> = dimensions.iter().map(String::as_str).collect();
    header.extend(metrics);
    let mut rows: Vec<Vec<String>> = report["rows"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|row| {
                    dimensions
                        .iter()
                        .map(|d| text(&row[d]))
                        .chain(metrics.iter().map(|m| text(&row[*m])))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut total: Vec<String> = dimensions.iter().map(|_| String::new()).collect();
    if let Some(first) = total.first_mut() {
        // Not ASCII: no end user's id (a client names them) reads the same.
        *first = "\u{2014} total \u{2014}".to_owned();
    }
    total.extend(metrics.iter().map(|m| text(&report["total"][*m])));
    rows.push(total);
    table(&header, &rows)
}
