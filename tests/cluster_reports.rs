//! Usage reports in cluster mode are SQL aggregates over the shipped debits:
//! with traffic spread over three `creditgate serve` replicas on one real
//! PostgreSQL, every replica's report (JSON and CSV, many groupings, a day
//! in a far-from-UTC zone, a range) equals the report computed from the
//! ledger's debit entries, to the last decimal; an organization's token
//! cannot read another's; and the aggregate reads through its index.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::cluster::*;
use common::pg::Postgres;
use common::{send, Reply, ADMIN_TOKEN, ORG_TOKEN};
use creditgate::cluster::usage::USAGE_SQL;
use creditgate::cluster::Database;
use http::Request;
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Groupings checked: each dimension alone, mixes, and everything.
const GROUPINGS: &[&str] = &[
    "",
    "user",
    "app",
    "key",
    "end_user",
    "model",
    "tool",
    "route",
    "day",
    "month",
    "user,app,key",
    "model,day",
    "day,end_user,tool",
    "month,route,model,user",
    "user,app,key,end_user,model,tool,route,day,month",
];

/// A zone whose date differs from UTC's for ten minutes at least, so
/// grouping by day in UTC instead of the org's zone cannot pass by luck.
/// UTC-12 differs from 00:00 to 12:00 UTC and UTC+14 from 10:00 to 24:00;
/// no zone differs on both sides of midnight, so a test started in its last
/// ten minutes first waits for it to pass.
async fn far_zone() -> &'static str {
    use chrono::Timelike as _;
    let now = Utc::now();
    if now.hour() == 23 && now.minute() >= 50 {
        let to_midnight = 60 * (60 - u64::from(now.minute())) - u64::from(now.second());
        tokio::time::sleep(Duration::from_secs(to_midnight + 5)).await;
        return "Etc/GMT+12";
    }
    if now.hour() < 11 {
        "Etc/GMT+12"
    } else {
        "Pacific/Kiritimati"
    }
}

async fn get(admin: &str, path: &str, token: &str, accept: Option<&str>) -> Reply {
    let mut request =
        Request::get(format!("http://{admin}{path}")).header("authorization", format!("Bearer {token}"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    send(request.body(Full::new(bytes::Bytes::new())).unwrap()).await
}

/// One metered call through `proxy`; must be served.
async fn call_as(proxy: &str, secret: &str, route: &str, body: Value, end_user: Option<&str>) {
    let mut request = Request::post(format!("http://{proxy}{route}"))
        .header("authorization", format!("Bearer {secret}"))
        .header("content-type", "application/json");
    if let Some(end_user) = end_user {
        request = request.header("x-creditgate-end-user", end_user);
    }
    let reply = send(request.body(Full::new(bytes::Bytes::from(body.to_string()))).unwrap()).await;
    assert_eq!(reply.status, 200, "{route}: {:?}", reply.body);
}

/// When each request's debit was settled, as its replica shipped it. The
/// treasurer's ledger stamps a posted debit no earlier than the wallet's
/// clock (time never runs backwards in a wallet, and the treasurer ticks
/// every wallet each second), so an entry's `at` may be its posting time;
/// the usage happened at the settle.
async fn settled_at(url: &str) -> BTreeMap<String, DateTime<Utc>> {
    let db = Database::new(url, 1).unwrap();
    let client = db.client().await.unwrap();
    let rows = client
        .query("SELECT body->>'request_id', at FROM cg_debits WHERE wallet NOT LIKE 'limit:%'", &[])
        .await
        .unwrap();
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// Every debit entry of `org` as `replica`'s ledger endpoint shows it.
async fn debit_entries(replica: &Replica, org: u64) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let path = format!("/admin/v1/orgs/{org}/ledger?kind=debit&limit=1000&after={after}");
        let page = get(&replica.admin, &path, ADMIN_TOKEN, None).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let page = page.json();
        entries.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_u64() {
            Some(next) => after = next,
            None => return entries,
        }
    }
}

/// Waits until every replica's ledger shows `count` debits of `org`.
async fn every_replica_posted(cluster: &Cluster, org: u64, count: usize) {
    for replica in &cluster.replicas {
        let deadline = Instant::now() + Duration::from_secs(20);
        while debit_entries(replica, org).await.len() != count {
            assert!(Instant::now() < deadline, "a replica's ledger did not show {count} debits");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Default)]
struct Totals {
    requests: u64,
    charged: Decimal,
    operator_cost: Decimal,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    tool_units: u64,
}

impl Totals {
    fn fields(&self) -> [String; 7] {
        [
            self.requests.to_string(),
            self.charged.normalize().to_string(),
            self.operator_cost.normalize().to_string(),
            self.input_tokens.to_string(),
            self.cached_input_tokens.to_string(),
            self.output_tokens.to_string(),
            self.tool_units.to_string(),
        ]
    }

    fn json(&self) -> Value {
        let [_, charged, operator_cost, ..] = self.fields();
        json!({"requests": self.requests, "charged": charged, "operator_cost": operator_cost,
               "input_tokens": self.input_tokens, "cached_input_tokens": self.cached_input_tokens,
               "output_tokens": self.output_tokens, "tool_units": self.tool_units})
    }
}

/// The report the ledger's entries give, grouped by `group_by`, over
/// `[from, to)`: (JSON, CSV), written out independently of the gateway.
fn expected(
    entries: &[Value],
    group_by: &[&str],
    zone: chrono_tz::Tz,
    (from, to): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) -> (Value, String) {
    let mut groups: BTreeMap<Vec<String>, Totals> = BTreeMap::new();
    for entry in entries {
        let at: DateTime<Utc> = entry["at"].as_str().unwrap().parse().unwrap();
        if from.is_some_and(|from| at < from) || to.is_some_and(|to| at >= to) {
            continue;
        }
        let kind = &entry["kind"];
        let details = &kind["details"];
        let usage = &details["usage"];
        let route = details["route"].as_str().unwrap();
        let is_tool = usage["tool_units"].as_u64().unwrap() > 0 || route.contains("/tools/");
        let text = |value: &Value| value.as_u64().map(|n| n.to_string()).unwrap_or_default();
        let local = at.with_timezone(&zone);
        let cells = group_by
            .iter()
            .map(|dimension| match *dimension {
                "user" => text(&kind["owner"]["user"]),
                "app" => text(&kind["owner"]["app"]),
                "key" => text(&kind["key"]),
                "end_user" => kind["end_user"].as_str().unwrap_or("").to_owned(),
                "model" if !is_tool => details["model"].as_str().unwrap().to_owned(),
                "tool" if is_tool => details["model"].as_str().unwrap().to_owned(),
                "route" => route.to_owned(),
                "day" => local.format("%Y-%m-%d").to_string(),
                "month" => local.format("%Y-%m").to_string(),
                _ => String::new(),
            })
            .collect();
        let totals = groups.entry(cells).or_default();
        let decimal = |value: &Value| value.as_str().unwrap().parse::<Decimal>().unwrap();
        totals.requests += 1;
        totals.charged += -decimal(&entry["amount"]);
        totals.operator_cost += decimal(&kind["operator_cost"]);
        totals.input_tokens += usage["input_tokens"].as_u64().unwrap();
        totals.cached_input_tokens += usage["cached_input_tokens"].as_u64().unwrap();
        totals.output_tokens += usage["output_tokens"].as_u64().unwrap();
        totals.tool_units += usage["tool_units"].as_u64().unwrap();
    }
    let mut total = Totals::default();
    let mut rows = Vec::new();
    let mut csv = group_by.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    csv.extend(
        [
            "requests",
            "charged",
            "operator_cost",
            "input_tokens",
            "cached_input_tokens",
            "output_tokens",
            "tool_units",
        ]
        .map(str::to_owned),
    );
    let mut csv = format!("{}\n", csv.join(","));
    for (cells, totals) in &groups {
        total.requests += totals.requests;
        total.charged += totals.charged;
        total.operator_cost += totals.operator_cost;
        total.input_tokens += totals.input_tokens;
        total.cached_input_tokens += totals.cached_input_tokens;
        total.output_tokens += totals.output_tokens;
        total.tool_units += totals.tool_units;
        let mut row = totals.json();
        for (dimension, cell) in group_by.iter().zip(cells) {
            row[*dimension] = json!(cell);
        }
        rows.push(row);
        let mut line = cells.clone();
        line.extend(totals.fields());
        csv.push_str(&line.join(","));
        csv.push('\n');
    }
    (json!({"group_by": group_by, "rows": rows, "total": total.json()}), csv)
}

/// Checks every grouping's report, JSON and CSV, from every replica.
async fn reports_match(
    cluster: &Cluster,
    org: u64,
    entries: &[Value],
    zone: chrono_tz::Tz,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) {
    let mut bounds = String::new();
    if let Some(from) = range.0 {
        bounds.push_str(&format!("&from={}", from.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)));
    }
    if let Some(to) = range.1 {
        bounds.push_str(&format!("&to={}", to.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)));
    }
    let bounds = bounds.replace('+', "%2B");
    for grouping in GROUPINGS {
        let group_by: Vec<&str> = grouping.split(',').filter(|d| !d.is_empty()).collect();
        let (json_report, csv_report) = expected(entries, &group_by, zone, range);
        for replica in &cluster.replicas {
            let path = format!("/admin/v1/orgs/{org}/usage?group_by={grouping}{bounds}");
            let reply = get(&replica.admin, &path, ADMIN_TOKEN, None).await;
            assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
            assert_eq!(reply.json(), json_report, "{path} on {}", replica.admin);
            let reply = get(&replica.admin, &format!("{path}&format=csv"), ADMIN_TOKEN, None).await;
            assert_eq!(reply.header("content-type"), Some("text/csv; charset=utf-8"));
            assert_eq!(
                String::from_utf8_lossy(&reply.body),
                csv_report,
                "{path} as CSV on {}",
                replica.admin
            );
            let reply = get(&replica.admin, &path, ADMIN_TOKEN, Some("text/csv")).await;
            assert_eq!(String::from_utf8_lossy(&reply.body), csv_report, "{path} (Accept: text/csv)");
        }
    }
}

/// An org in `zone` with two Pro users (one with two keys, one under a
/// daily limit), two apps with a key each, and its org-wide funding;
/// returns (org id, key secrets).
async fn org_with_traffic_sources(cluster: &Cluster, name: &str, zone: &str) -> (u64, Vec<String>) {
    let replica = &cluster.replicas[0];
    // Started before today in any zone, so the allocation is in force.
    let start = (Utc::now() - chrono::TimeDelta::days(2)).date_naive().to_string();
    let org = admin_write(
        replica,
        "/admin/v1/orgs",
        json!({"name": name, "time_zone": zone,
               "contract": {"start": start, "years": 1, "platform_allocation_per_year": "500"}}),
        None,
    )
    .await;
    let org = org["id"].as_u64().unwrap();
    let base = format!("/admin/v1/orgs/{org}");
    let mut secrets = Vec::new();
    for (user, keys) in [("ana", 2), ("bo", 1)] {
        let user =
            admin_write(replica, &format!("{base}/users"), json!({"name": user, "plan": "pro"}), None).await;
        for _ in 0..keys {
            let limits = json!({"daily": "400"});
            let key = admin_write(
                replica,
                &format!("{base}/keys"),
                json!({"user": user["id"], "limits": limits}),
                None,
            )
            .await;
            secrets.push(key["secret"].as_str().unwrap().to_owned());
        }
    }
    for app in ["support-bot", "search-bot"] {
        let app = admin_write(replica, &format!("{base}/apps"), json!({"name": app}), None).await;
        let key = admin_write(replica, &format!("{base}/keys"), json!({"app": app["id"]}), None).await;
        secrets.push(key["secret"].as_str().unwrap().to_owned());
    }
    (org, secrets)
}

/// Waits until every replica knows the org's keys (it serves them).
async fn keys_known(cluster: &Cluster, org: u64, keys: usize) {
    for replica in &cluster.replicas {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = get(&replica.admin, &format!("/admin/v1/orgs/{org}/keys"), ADMIN_TOKEN, None).await;
            if reply.status == 200 && reply.json()["keys"].as_array().map(Vec::len) == Some(keys) {
                break;
            }
            assert!(Instant::now() < deadline, "a replica did not learn the org's keys");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `rounds` rounds of traffic: every key on every replica, chat and
/// messages models, the tool route, app keys naming end users.
async fn traffic(cluster: &Cluster, secrets: &[String], rounds: usize) -> usize {
    let mut calls = 0;
    for round in 0..rounds {
        for (i, secret) in secrets.iter().enumerate() {
            let proxy = &cluster.replicas[(round + i) % cluster.replicas.len()].proxy;
            let is_app = i >= 3;
            let end_user = is_app.then(|| format!("customer-{}", (round + i) % 3));
            let end_user = end_user.as_deref();
            let chat = json!({"model": "mock-gpt", "max_tokens": 10 + round, "seed": i,
                              "messages": [{"role": "user", "content": "hello"}]});
            call_as(proxy, secret, "/v1/chat/completions", chat, end_user).await;
            let messages = json!({"model": "mock-claude", "max_tokens": 7 + i,
                                  "messages": [{"role": "user", "content": "hi"}]});
            call_as(proxy, secret, "/v1/messages", messages, end_user).await;
            calls += 2;
            if is_app || round % 2 == 0 {
                let search = json!({"query": "q", "num_results": 1 + (round + i) % 4});
                call_as(proxy, secret, "/v1/tools/web-search", search, end_user).await;
                calls += 1;
            }
        }
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_reports_from_every_replica_equal_the_ledger_to_the_last_decimal() {
    let pg = Postgres::start();
    let cluster = start_cluster(&pg, "reports", 3).await;
    let zone_name = far_zone().await;
    let zone: chrono_tz::Tz = zone_name.parse().unwrap();
    let (org, secrets) = org_with_traffic_sources(&cluster, "reports-org", zone_name).await;
    // A second org with traffic of its own: never in the first's reports.
    let (other, other_secrets) = org_with_traffic_sources(&cluster, "other-org", "UTC").await;
    keys_known(&cluster, org, secrets.len()).await;
    keys_known(&cluster, other, other_secrets.len()).await;

    let first = traffic(&cluster, &secrets, 3).await;
    let other_calls = traffic(&cluster, &other_secrets, 1).await;
    // A range boundary between two phases, with nanoseconds (not on the
    // column's microseconds) to exercise the rounding.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = Utc::now() + chrono::TimeDelta::nanoseconds(417);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = traffic(&cluster, &secrets, 2).await;
    settled(&cluster.url).await;
    every_replica_posted(&cluster, org, first + second).await;
    every_replica_posted(&cluster, other, other_calls).await;

    let shipped = settled_at(&cluster.url).await;
    let mut entries = debit_entries(&cluster.replicas[1], org).await;
    for entry in &mut entries {
        let request = entry["kind"]["request_id"].as_str().unwrap();
        let at =
            shipped.get(request).unwrap_or_else(|| panic!("the ledger's debit {request} was not shipped"));
        entry["at"] = json!(at);
    }
    let in_zone = |entry: &Value| {
        let at: DateTime<Utc> = entry["at"].as_str().unwrap().parse().unwrap();
        at.with_timezone(&zone).date_naive() != at.date_naive()
    };
    assert!(entries.iter().all(in_zone), "the org's days are not UTC's, so day grouping is tested");
    reports_match(&cluster, org, &entries, zone, (None, None)).await;
    reports_match(&cluster, org, &entries, zone, (Some(middle), None)).await;
    reports_match(&cluster, org, &entries, zone, (None, Some(middle))).await;
    let whole = (Some(middle - chrono::TimeDelta::hours(1)), Some(middle + chrono::TimeDelta::hours(1)));
    reports_match(&cluster, org, &entries, zone, whole).await;

    let total = |reply: Reply| reply.json()["total"]["requests"].as_u64().unwrap();
    let path = |from: &str| format!("/admin/v1/orgs/{org}/usage?{from}");
    let after = get(
        &cluster.replicas[2].admin,
        &path(&format!("from={}", middle.to_rfc3339().replace('+', "%2B"))),
        ADMIN_TOKEN,
        None,
    )
    .await;
    assert_eq!(total(after), u64::try_from(second).unwrap(), "the range splits the two phases");
    let all = get(&cluster.replicas[0].admin, &path(""), ADMIN_TOKEN, None).await;
    assert_eq!(total(all), u64::try_from(first + second).unwrap(), "no limit counter is counted as usage");

    // The aggregate stops one row past a report's cap ([admin]
    // max_report_groups), so a report over millions of end users is not
    // read whole from the database.
    let books = books(&cluster.url).await;
    let by_key = |max_rows| creditgate::cluster::usage::UsageQuery {
        org,
        time_zone: "UTC".into(),
        by_key: true,
        max_rows,
        ..Default::default()
    };
    let every = books.usage(&by_key(0)).await.unwrap().len();
    assert!(every > 2, "{every} keys spent");
    assert_eq!(books.usage(&by_key(2)).await.unwrap().len(), 2);

    // Org isolation: the org token (org 1) reads its own usage, never org 2's.
    assert_eq!(org, 1, "the org token's org is the first one created");
    for replica in &cluster.replicas {
        let own =
            get(&replica.admin, &format!("/admin/v1/orgs/{org}/usage?group_by=key"), ORG_TOKEN, None).await;
        assert_eq!(own.status, 200, "{:?}", own.body);
        for format in ["", "&format=csv"] {
            let path = format!("/admin/v1/orgs/{other}/usage?group_by=key{format}");
            let theirs = get(&replica.admin, &path, ORG_TOKEN, None).await;
            assert_eq!(theirs.status, 404, "an org token reads another org's usage: {:?}", theirs.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_aggregate_reads_the_debits_through_its_index() {
    // Proves the report's plan: the org's wallets, then each wallet's debits
    // in the range through cg_debits_usage (the partial index without limit
    // counters), not a scan of every debit.
    let pg = Postgres::start();
    let url = pg.create_database("explain");
    let _books = books(&url).await;
    let db = Database::new(&url, 1).unwrap();
    let client = db.client().await.unwrap();
    // Sequential scans priced out, so the plan shows which index the
    // planner picks for this shape of query on a big table.
    client.batch_execute("SET enable_seqscan = off").await.unwrap();
    let from: Option<DateTime<Utc>> = Some("2026-11-01T00:00:00Z".parse().unwrap());
    let to: Option<DateTime<Utc>> = None;
    let (org, zone, flag) = (1_i64, "Europe/Berlin", true);
    let rows = client
        .query(
            &format!("EXPLAIN {USAGE_SQL}"),
            &[&org, &from, &to, &zone, &flag, &flag, &flag, &flag, &flag, &flag, &Some(100_001_i64)],
        )
        .await
        .unwrap();
    let plan: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("cg_debits_usage"), "the aggregate does not use its index:\n{plan}");
    assert!(plan.contains("cg_wallets_org"), "the org's wallets are found by index:\n{plan}");
}
