//! The OpenAPI 3.1 description of `/admin/v1`, served at
//! `/admin/v1/openapi.json`. [`ROUTES`] lists every endpoint the router
//! answers; a test calls each one and checks that no other method on those
//! paths is answered, so the document and the router cannot drift apart.

use serde_json::{json, Map, Value};

/// One documented endpoint.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// Operator token only (org tokens get 403).
    pub operator_only: bool,
}

const fn route(method: &'static str, path: &'static str, summary: &'static str) -> RouteDoc {
    RouteDoc { method, path, summary, operator_only: false }
}

const fn operator(method: &'static str, path: &'static str, summary: &'static str) -> RouteDoc {
    RouteDoc { method, path, summary, operator_only: true }
}

pub const ROUTES: &[RouteDoc] = &[
    route("get", "/admin/v1/openapi.json", "This document"),
    operator("get", "/admin/v1/prices", "The price table in force and the last reload"),
    operator("post", "/admin/v1/prices/reload", "Reload the price file; 422 with every problem if invalid"),
    route("get", "/admin/v1/orgs", "Organizations (an org token sees its own)"),
    operator("post", "/admin/v1/orgs", "Create an organization, optionally with its first contract"),
    route("get", "/admin/v1/orgs/{org}", "One organization and its contracts"),
    route("post", "/admin/v1/orgs/{org}/contracts", "Add a contract term (renewal)"),
    route("get", "/admin/v1/orgs/{org}/users", "Users"),
    route("post", "/admin/v1/orgs/{org}/users", "Create a Pro or Lite user"),
    route("patch", "/admin/v1/orgs/{org}/users/{user}", "Change plan, Lite allowance or limits"),
    route("get", "/admin/v1/orgs/{org}/apps", "Applications"),
    route("post", "/admin/v1/orgs/{org}/apps", "Create an application"),
    route("put", "/admin/v1/orgs/{org}/apps/{app}/limits", "Set an application's and its end users' limits"),
    route("get", "/admin/v1/orgs/{org}/keys", "API keys, without secrets"),
    route("post", "/admin/v1/orgs/{org}/keys", "Create a key; the secret is returned once"),
    route("post", "/admin/v1/orgs/{org}/keys/{key}/revoke", "Revoke a key"),
    route("put", "/admin/v1/orgs/{org}/keys/{key}/limits", "Set a key's limits"),
    route("put", "/admin/v1/orgs/{org}/keys/{key}/scope", "Restrict a key to some routes and models"),
    route("post", "/admin/v1/orgs/{org}/purchases", "Buy credits (Idempotency-Key header required)"),
    route("post", "/admin/v1/orgs/{org}/adjustments", "Correct a wallet (Idempotency-Key header required)"),
    route("get", "/admin/v1/orgs/{org}/balances", "Pool and Lite wallets: balance, lots, holds"),
    route("get", "/admin/v1/orgs/{org}/ledger", "Ledger entries: cursor paging and filters"),
    route("get", "/admin/v1/orgs/{org}/usage", "Usage totals grouped by dimensions, JSON or CSV"),
];

/// Query parameters of the read endpoints.
fn query_parameters(path: &str) -> Vec<Value> {
    let names: &[&str] = match path {
        "/admin/v1/orgs/{org}/ledger" => &["after", "limit", "wallet", "kind", "key", "user", "from", "to"],
        "/admin/v1/orgs/{org}/usage" => &["group_by", "from", "to", "format"],
        _ => &[],
    };
    names
        .iter()
        .map(|name| json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}}))
        .collect()
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "integer"}}))
        .collect()
}

fn operation(route: &RouteDoc) -> Value {
    let mut parameters = path_parameters(route.path);
    parameters.extend(query_parameters(route.path));
    if route.path.ends_with("/purchases") || route.path.ends_with("/adjustments") {
        parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": true, "schema": {"type": "string"}}));
    }
    let mut op = json!({
        "summary": route.summary,
        "parameters": parameters,
        "responses": {
            "200": {"description": "OK"},
            "201": {"description": "Created"},
            "400": {"$ref": "#/components/responses/Error"},
            "401": {"$ref": "#/components/responses/Error"},
            "404": {"$ref": "#/components/responses/Error"},
        },
    });
    if route.operator_only {
        op["description"] = json!("Operator token only; organization tokens get 403.");
    }
    if matches!(route.method, "post" | "put" | "patch")
        && !route.path.ends_with("/revoke")
        && !route.path.ends_with("/reload")
    {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {"type": "object",
                "description": "Strict: unknown fields are rejected; amounts are decimal strings such as \"12.50\"."}}},
        });
    }
    op
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method] = operation(route);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "creditgate admin API", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {
                "description": "`{\"error\": {\"type\", \"code\", \"message\", \"field\"?}}`",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }},
        },
    })
}
