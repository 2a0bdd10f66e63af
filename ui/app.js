// creditgate dashboard. Plain JavaScript, no build step, no outside code.
// Everything it shows comes from /admin/v1 with the signed-in token
// (kept in sessionStorage, sent as a Bearer header; no cookies).
// Money arrives as decimal strings: totals shown are the server's or are
// summed here as exact decimals (BigInt nano-dollars), never as floats.
"use strict";

const API = "/admin/v1";
const TOKEN_KEY = "creditgate.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const DIMENSIONS = ["model", "user", "app", "key", "end_user", "tool"];

const state = { who: null, orgs: [], names: {} };

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

// Exact decimal strings as BigInt nano-dollars (the ledger keeps at most 9 places).
const SCALE = 9;
function toNanos(text) {
  const match = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(text ?? "0"));
  if (!match) return 0n;
  const fraction = (match[3] || "").padEnd(SCALE, "0").slice(0, SCALE);
  const value = BigInt(match[2]) * 10n ** BigInt(SCALE) + BigInt(fraction || "0");
  return match[1] ? -value : value;
}
function fromNanos(nanos) {
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const unit = 10n ** BigInt(SCALE);
  let fraction = (abs % unit).toString().padStart(SCALE, "0").replace(/0+$/, "");
  const text = (abs / unit).toString() + (fraction ? "." + fraction : "");
  return (negative ? "-" : "") + text;
}
function addDecimals(values) {
  return fromNanos(values.reduce((sum, v) => sum + toNanos(v), 0n));
}

// Display only: the exact value is in the title.
function money(text) {
  const value = Number(text);
  // As many places as the exact value has, between 2 and 6: a balance that
  // moved by a fraction of a cent must not look unchanged.
  const places = (/\.(\d*?)0*$/.exec(String(text)) || ["", ""])[1].length;
  const digits = Math.min(6, Math.max(2, places));
  const shown = new Intl.NumberFormat("en-US", {
    style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: digits,
  }).format(value);
  return el("span", { class: "money", title: `${text} USD (exact)`, "data-exact": text, text: shown });
}

function orgZone(org) {
  return (org && org.time_zone) || "UTC";
}
function when(iso, zone, withTime = true) {
  if (!iso) return "—";
  const options = { timeZone: zone, year: "numeric", month: "short", day: "2-digit" };
  if (withTime) Object.assign(options, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  const text = new Intl.DateTimeFormat("en-GB", options).format(new Date(iso));
  return el("time", { datetime: iso, title: `${iso} (${zone})`, text });
}

// The offset of `zone` from UTC at an instant, in minutes.
function zoneOffset(zone, instant) {
  const parts = {};
  for (const p of new Intl.DateTimeFormat("en-US", {
    timeZone: zone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  }).formatToParts(instant)) parts[p.type] = p.value;
  const local = Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour, +parts.minute, +parts.second);
  return Math.round((local - Math.floor(instant.getTime() / 1000) * 1000) / 60000);
}
// Today's local date in `zone` as [year, month (1-12), day].
function localDate(zone, instant = new Date()) {
  const parts = {};
  for (const p of new Intl.DateTimeFormat("en-US", { timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit" })
    .formatToParts(instant)) parts[p.type] = p.value;
  return [+parts.year, +parts.month, +parts.day];
}
// The instant of local midnight starting a date in `zone`.
function localMidnight(zone, year, month, day) {
  const guess = Date.UTC(year, month - 1, day);
  let instant = new Date(guess - zoneOffset(zone, new Date(guess)) * 60000);
  instant = new Date(guess - zoneOffset(zone, instant) * 60000);
  return instant;
}
function isoDay(year, month, day) {
  const d = new Date(Date.UTC(year, month - 1, day));
  return d.toISOString().slice(0, 10);
}

function showError(message) {
  const banner = document.getElementById("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` },
    options.headers || {});
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(API + path, {
    method: options.method || "GET", headers, credentials: "omit", cache: "no-store",
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function table(headers, rows, footer) {
  const cls = (i) => [headers[i] && headers[i].num ? "num" : "", (headers[i] && headers[i].cls) || ""].join(" ").trim() || null;
  const head = el("tr", {}, headers.map((h, i) => el("th", { class: cls(i), text: h.label })));
  const body = rows.length
    ? rows.map((row) => el("tr", row.attrs || {}, row.cells.map((cell, i) =>
      el("td", { class: cls(i), "data-label": headers[i] ? headers[i].label : "" }, cell))))
    : [el("tr", {}, el("td", { class: "empty", colspan: String(headers.length), text: "Nothing yet." }))];
  const foot = footer ? el("tfoot", {}, el("tr", {}, footer.map((cell, i) => el("td", { class: cls(i), "data-label": i ? headers[i].label : "" }, cell)))) : null;
  return el("div", { class: "scroll stack" }, el("table", {}, el("thead", {}, head), el("tbody", {}, body), foot));
}

// A two-column table of facts: a label and its value per row.
function facts(rows) {
  return el("div", { class: "scroll" }, el("table", { class: "facts" },
    el("tbody", {}, rows.map(([label, value]) => el("tr", {}, el("th", { scope: "row", text: label }), el("td", {}, value))))));
}

function card(title, ...children) {
  return el("section", { class: "card" }, title ? el("h2", { text: title }) : null, ...children);
}

function stat(label, value, id) {
  return el("div", { class: "card stat", id }, el("div", { class: "label", text: label }), el("div", { class: "value" }, value));
}

function walletName(wallet, org) {
  if (!wallet) return "—";
  if (wallet.pool !== undefined) return "Pool";
  const user = state.names[org] && state.names[org].user[wallet.lite];
  return `Lite: ${user || "user " + wallet.lite}`;
}

// Every item of a paged list (`users`, `apps`, `keys`), page after page.
async function listAll(path, field) {
  const items = [];
  let after = null;
  for (;;) {
    const page = await api(after === null ? path : `${path}?after=${after}`);
    items.push(...page[field]);
    if (page.next_cursor === null || page.next_cursor === undefined) return items;
    after = page.next_cursor;
  }
}

// Names of users, apps and keys of an org, for labels.
async function loadNames(org) {
  const [users, apps, keys] = await Promise.all([
    listAll(`/orgs/${org}/users`, "users"), listAll(`/orgs/${org}/apps`, "apps"), listAll(`/orgs/${org}/keys`, "keys")]);
  const names = { user: {}, app: {}, key: {}, users, apps, keys };
  for (const u of users) names.user[u.id] = u.name;
  for (const a of apps) names.app[a.id] = a.name;
  for (const k of keys) names.key[k.id] = k.label || `key ${k.id}`;
  state.names[org] = names;
  return names;
}

// ---------------------------------------------------------------- routing

function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  return { parts, params: new URLSearchParams(query || "") };
}

function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function orgById(id) {
  return state.orgs.find((o) => String(o.id) === String(id));
}

function navLinks(current) {
  const nav = document.getElementById("nav");
  nav.replaceChildren();
  if (!state.who) return;
  const links = [];
  if (state.who.scope === "operator") links.push(["#/orgs", "Orgs", "orgs"]);
  if (current) {
    const base = `#/org/${current.id}`;
    links.push([`${base}/overview`, "Overview", "overview"], [`${base}/usage`, "Usage", "usage"],
      [`${base}/ledger`, "Ledger", "ledger"], [`${base}/keys`, "Keys & users", "keys"]);
    if (state.who.finance) links.push([`${base}/purchases`, "Purchases", "purchases"]);
  }
  if (state.who.scope === "operator") links.push(["#/prices", "Prices", "prices"]);
  const { parts } = route();
  const page = parts[0] === "org" ? parts[2] : parts[0];
  for (const [href, label, name] of links) {
    nav.append(el("a", { href, class: name === page ? "active" : null, "data-page": name, text: label }));
  }
}

let renderCount = 0;
async function render() {
  const mine = ++renderCount;
  showError("");
  const page = document.getElementById("page");
  const token = sessionStorage.getItem(TOKEN_KEY);
  document.getElementById("sign-in").hidden = !!token;
  document.getElementById("sign-out").hidden = !token;
  if (!token) {
    page.replaceChildren();
    document.getElementById("nav").replaceChildren();
    document.getElementById("who").textContent = "";
    return;
  }
  try {
    if (!state.who) await signedIn();
    const { parts, params } = route();
    let current = null;
    let content;
    if (parts[0] === "org") {
      current = orgById(parts[1]);
      if (!current) {
        content = notFound(parts[1]);
      } else {
        const pages = { overview: overviewPage, usage: usagePage, ledger: ledgerPage, keys: keysPage, purchases: purchasesPage };
        const build = pages[parts[2] || "overview"];
        content = build ? await build(current, params) : notFound(parts[1]);
      }
    } else if (parts[0] === "orgs" && state.who.scope === "operator") {
      content = await orgsPage();
    } else if (parts[0] === "prices") {
      content = await pricesPage();
    } else {
      const home = state.who.scope === "operator" ? "#/orgs" : `#/org/${state.who.org}/overview`;
      go(home);
      return;
    }
    if (mine !== renderCount) return;
    navLinks(current);
    page.replaceChildren(content);
    page.setAttribute("data-ready", String(mine));
  } catch (error) {
    if (mine !== renderCount) return;
    if (error instanceof ApiError && error.status === 401) {
      signOut("That token was not accepted.");
      return;
    }
    page.replaceChildren();
    showError(error.message);
  }
}

function notFound(id) {
  return card("Not found", el("p", { id: "not-found", text: `No organization ${id} is visible to this token.` }));
}

async function signedIn() {
  state.who = await api("/whoami");
  state.orgs = (await api("/orgs")).orgs;
  const who = state.who.scope === "operator" ? "operator" : `org ${state.who.org}${state.who.finance ? " (finance)" : ""}`;
  document.getElementById("who").textContent = `Signed in as ${who}`;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.who = null;
  state.orgs = [];
  state.names = {};
  location.hash = "#/";
  render().then(() => showError(message || ""));
}

// ---------------------------------------------------------------- pages

function poolOf(balances) {
  return balances.find((b) => b.wallet.pool !== undefined);
}

function liteNearEmpty(balances) {
  return balances.filter((b) => b.wallet.lite !== undefined).filter((b) => {
    const granted = addDecimals(b.lots.map((l) => l.granted));
    // Under a tenth of what its live lots granted (exact: compare nanos).
    return toNanos(b.available) * 10n < toNanos(granted) || toNanos(b.available) <= 0n;
  });
}

async function orgsPage() {
  const rows = await Promise.all(state.orgs.map(async (org) => {
    const zone = orgZone(org);
    const [balances, months] = await Promise.all([
      api(`/orgs/${org.id}/balances`), api(`/orgs/${org.id}/usage?group_by=month`)]);
    const [year, month] = localDate(zone);
    const thisMonth = `${year}-${String(month).padStart(2, "0")}`;
    const row = months.rows.find((r) => r.month === thisMonth);
    const pool = poolOf(balances.balances);
    const low = liteNearEmpty(balances.balances);
    return {
      attrs: { "data-org": String(org.id) },
      cells: [el("a", { href: `#/org/${org.id}/overview`, text: org.name }), String(org.id),
        pool ? money(pool.balance) : "—", pool ? money(pool.available) : "—", pool ? money(pool.held) : "—",
        money(row ? row.charged : "0"),
        low.length ? el("span", { class: "tag bad", text: `${low.length} near empty` }) : el("span", { class: "tag good", text: "ok" })],
    };
  }));
  return el("div", {}, el("h1", { text: "Organizations" }), card(null, table([
    { label: "Name" }, { label: "Id", num: true }, { label: "Pool balance", num: true }, { label: "Available", num: true },
    { label: "Held", num: true }, { label: "Spend this month", num: true }, { label: "Lite wallets" }], rows)));
}

async function overviewPage(org) {
  const zone = orgZone(org);
  const [balances, summary, names] = await Promise.all([
    api(`/orgs/${org.id}/balances`), api(`/orgs/${org.id}/summary`), loadNames(org.id)]);
  const pool = poolOf(balances.balances);
  const stats = el("div", { class: "grid" },
    stat("Pool balance", pool ? money(pool.balance) : "—", "pool-balance"),
    stat("Available", pool ? money(pool.available) : "—", "pool-available"),
    stat("Held", pool ? money(pool.held) : "—", "pool-held"),
    stat("Open holds", String(pool ? pool.open_holds : 0), "pool-holds"));
  const year = summary.contract_year;
  let allocation;
  if (year) {
    const share = Number(year.allocated) > 0 ? Math.min(100, (Number(year.consumed) / Number(year.allocated)) * 100) : 0;
    const fill = el("div", { class: share >= 100 ? "full" : share >= 80 ? "high" : null });
    fill.style.width = `${share.toFixed(1)}%`;
    allocation = card("Allocation this contract year",
      el("p", { class: "small" }, money(year.consumed), " consumed of ", money(year.allocated), ` (${share.toFixed(1)}%), `,
        money(year.remaining), " left"),
      el("div", { class: "meter", id: "allocation-meter", role: "meter", "aria-valuenow": share.toFixed(1), "aria-valuemin": "0", "aria-valuemax": "100" }, fill),
      el("p", { class: "small muted" }, "Year ", when(year.start, zone, false), " to ", when(year.end, zone, false), ` (${zone})`));
  } else {
    allocation = card("Allocation this contract year", el("p", { class: "empty", text: "No contract in force." }));
  }
  const lites = balances.balances.filter((b) => b.wallet.lite !== undefined);
  const liteTable = table([{ label: "User" }, { label: "Balance", num: true }, { label: "Available", num: true },
    { label: "Monthly allowance", num: true }, { label: "Resets" }],
  lites.map((b) => {
    const user = names.users.find((u) => u.id === b.wallet.lite);
    return { cells: [walletName(b.wallet, org.id), money(b.balance), money(b.available),
      money(user ? user.lite_monthly_allowance : "0"), when(b.resets_at, zone)] };
  }));
  const counts = summary.refusals.counts;
  const refusals = table([{ label: "Reason" }, { label: "Wallet" }, { label: "Last 24 h", num: true },
    { label: "Since start", num: true }, { label: "Last" }],
  counts.map((c) => ({ attrs: { "data-reason": c.reason }, cells: [c.reason.replace(/_/g, " "), walletName(c.wallet, org.id),
    `${c.last_day}${c.last_day_capped ? "+" : ""}`, String(c.total), when(c.last_at, zone)] })));
  return el("div", {},
    el("h1", { text: `${org.name}` }),
    el("p", { class: "muted small", text: `Organization ${org.id} · times in ${zone}` }),
    stats, allocation,
    card("Credit lots: what expires when", lotTimeline(balances.balances, zone, org.id)),
    card("Lite wallets", liteTable),
    card("Recent 402s by reason", refusals,
      el("p", { class: "small muted" }, "Counted since the gateway started, ", when(summary.refusals.since, zone), ".")));
}

// Each lot as a bar from when it became usable to when it expires, on one
// time axis for all lots, filled by the share still left.
function lotTimeline(balances, zone, orgId) {
  const lots = balances.flatMap((b) => b.lots.map((lot) => Object.assign({ wallet: b.wallet }, lot)));
  if (!lots.length) return el("p", { class: "empty", text: "No live lots." });
  lots.sort((a, b) => a.expires_at.localeCompare(b.expires_at));
  const now = Date.now();
  const start = Math.min(now, ...lots.map((l) => Date.parse(l.effective_at)));
  const end = Math.max(...lots.map((l) => Date.parse(l.expires_at)));
  const at = (t) => ((t - start) / Math.max(1, end - start)) * 100;
  const rows = lots.map((lot) => {
    const share = Number(lot.granted) > 0 ? Math.min(1, Number(lot.remaining) / Number(lot.granted)) : 0;
    const kind = lot.origin.kind;
    const span = el("div", { class: `span lot-${kind}` }, el("div", { class: "fill" }));
    span.style.left = `${at(Date.parse(lot.effective_at)).toFixed(2)}%`;
    span.style.width = `${Math.max(0.5, at(Date.parse(lot.expires_at)) - at(Date.parse(lot.effective_at))).toFixed(2)}%`;
    span.firstChild.style.width = `${(share * 100).toFixed(1)}%`;
    const marker = el("div", { class: "now" });
    marker.style.left = `${at(now).toFixed(2)}%`;
    return el("div", { class: "lot", "data-lot": String(lot.id), title: `${kind} lot ${lot.id}: ${lot.remaining} of ${lot.granted} USD left` },
      el("div", { class: "lot-label" }, el("strong", { text: kind.replace("_", " ") }), ` · ${walletName(lot.wallet, orgId)} · `,
        money(lot.remaining), " of ", money(lot.granted), " left · expires ", when(lot.expires_at, zone, false)),
      el("div", { class: "track" }, span, marker));
  });
  return el("div", { class: "lots", id: "lots" }, rows,
    el("div", { class: "axis small muted" }, when(new Date(start).toISOString(), zone, false),
      el("span", { text: "the dark line is now" }), when(new Date(end).toISOString(), zone, false)));
}

function usageRange(zone, range) {
  const [year, month, day] = localDate(zone);
  if (range === "all") return null;
  if (range === "month") return { from: localMidnight(zone, year, month, 1), days: null, first: [year, month, 1] };
  const first = new Date(Date.UTC(year, month - 1, day - 29));
  const f = [first.getUTCFullYear(), first.getUTCMonth() + 1, first.getUTCDate()];
  return { from: localMidnight(zone, ...f), first: f };
}

// A group's label. No value reads "— none —": an end user's id is ASCII, so
// no client can name one that reads the same.
function dimensionLabel(dim, value, org) {
  if (value === null || value === undefined || value === "") return "\u2014 none \u2014";
  const names = state.names[org];
  if (names && names[dim] && names[dim][value] !== undefined) return `${names[dim][value]} (#${value})`;
  return String(value);
}

async function usagePage(org, params) {
  const zone = orgZone(org);
  const group = DIMENSIONS.includes(params.get("group")) ? params.get("group") : "model";
  const rangeName = ["30d", "month", "all"].includes(params.get("range")) ? params.get("range") : "30d";
  const range = usageRange(zone, rangeName);
  const from = range ? `&from=${encodeURIComponent(range.from.toISOString())}` : "";
  await loadNames(org.id);
  const [daily, totals] = await Promise.all([
    api(`/orgs/${org.id}/usage?group_by=day,${group}${from}`), api(`/orgs/${org.id}/usage?group_by=${group}${from}`)]);
  const groupSelect = el("select", { id: "usage-group", "aria-label": "Group by" },
    DIMENSIONS.map((d) => el("option", { value: d, selected: d === group, text: d.replace("_", " ") })));
  const rangeSelect = el("select", { id: "usage-range", "aria-label": "Range" },
    [["30d", "Last 30 days"], ["month", "This month"], ["all", "All time"]].map(([v, t]) => el("option", { value: v, selected: v === rangeName, text: t })));
  const change = () => go(`#/org/${org.id}/usage?group=${groupSelect.value}&range=${rangeSelect.value}`);
  groupSelect.addEventListener("change", change);
  rangeSelect.addEventListener("change", change);
  const title = group.charAt(0).toUpperCase() + group.slice(1).replace("_", " ");
  const headers = [{ label: title }, { label: "Requests", num: true }, { label: "Input tokens", num: true, cls: "hide-narrow" },
    { label: "Output tokens", num: true, cls: "hide-narrow" }, { label: "Charged", num: true }];
  const rows = totals.rows.map((r) => ({ attrs: { "data-group": String(r[group] ?? "") },
    cells: [el("span", { class: "ident", text: dimensionLabel(group, r[group], org.id) }), String(r.requests), String(r.input_tokens), String(r.output_tokens), money(r.charged)] }));
  const footer = ["Total", String(totals.total.requests), String(totals.total.input_tokens), String(totals.total.output_tokens), el("span", { id: "usage-total" }, money(totals.total.charged))];
  const csv = el("button", { class: "secondary", type: "button", id: "usage-csv", text: "Download CSV" });
  csv.addEventListener("click", () => downloadCsv(`usage-${org.id}-${group}-${rangeName}.csv`, group, totals, org.id));
  return el("div", {},
    el("h1", { text: `Usage · ${org.name}` }),
    el("div", { class: "toolbar" }, el("label", {}, "Group by", groupSelect), el("label", {}, "Range", rangeSelect), csv),
    card(`Spend per day (${zone}), by ${group.replace("_", " ")}`, usageChart(daily.rows, group, range, zone, org.id)),
    card("Totals", table(headers, rows, footer)));
}

function usageChart(rows, group, range, zone, orgId) {
  const days = [];
  if (range) {
    const [y, m, d] = range.first;
    const [ty, tm, td] = localDate(zone);
    const last = isoDay(ty, tm, td);
    for (let i = 0; i < 400; i++) {
      const day = isoDay(y, m, d + i);
      days.push(day);
      if (day >= last) break;
    }
  } else {
    for (const r of rows) if (!days.includes(r.day)) days.push(r.day);
    days.sort();
  }
  if (!rows.length) return el("p", { class: "empty", id: "usage-chart-empty", text: "No spend in this range." });
  // Series: the biggest groups get their own colour, the rest share one.
  // A Map: a client's end-user id may be "__proto__" or "constructor".
  const byGroup = new Map();
  for (const r of rows) {
    const g = String(r[group] ?? "");
    byGroup.set(g, (byGroup.get(g) || 0n) + toNanos(r.charged));
  }
  const order = [...byGroup.keys()].sort((a, b) => (byGroup.get(b) > byGroup.get(a) ? 1 : byGroup.get(b) < byGroup.get(a) ? -1 : 0));
  const colour = (g) => `c${Math.min(order.indexOf(g), 7)}`;
  const perDay = {};
  for (const r of rows) (perDay[r.day] = perDay[r.day] || []).push(r);
  const dayTotal = (day) => addDecimals((perDay[day] || []).map((r) => r.charged));
  const max = Math.max(...days.map((d) => Number(dayTotal(d))), 0) || 1;
  const width = Math.min(900, Math.max(320, window.innerWidth - 70)), height = width < 600 ? 220 : 260, left = 64, bottom = 28, top = 10;
  const plotHeight = height - top - bottom;
  const step = (width - left - 8) / Math.max(1, days.length);
  const barWidth = Math.max(2, Math.min(36, step * 0.7));
  const chart = svg("svg", { class: "chart", id: "usage-chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Spend per day" });
  for (let i = 0; i <= 4; i++) {
    const value = (max * i) / 4;
    const y = top + plotHeight - (plotHeight * i) / 4;
    chart.append(svg("line", { class: "grid-line", x1: left, x2: width, y1: y, y2: y }));
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", text: money(value.toPrecision(3)).textContent }));
  }
  const labelEvery = Math.ceil(days.length / (width < 600 ? 5 : 10));
  days.forEach((day, i) => {
    const x = left + i * step + (step - barWidth) / 2;
    const total = dayTotal(day);
    const bar = svg("g", { class: "bar", "data-day": day, "data-total": total }, svg("title", { text: `${day}: ${total} USD` }));
    let y = top + plotHeight;
    for (const r of (perDay[day] || []).slice().sort((a, b) => order.indexOf(String(a[group] ?? "")) - order.indexOf(String(b[group] ?? "")))) {
      const h = (Number(r.charged) / max) * plotHeight;
      y -= h;
      const g = String(r[group] ?? "");
      bar.append(svg("rect", { class: colour(g), x, y, width: barWidth, height: Math.max(h, 0.5), "data-group": g, "data-amount": r.charged },
        svg("title", { text: `${day} · ${dimensionLabel(group, r[group], orgId)}: ${r.charged} USD` })));
    }
    chart.append(bar);
    if (i % labelEvery === 0) chart.append(svg("text", { x: x + barWidth / 2, y: height - 8, "text-anchor": "middle", text: day.slice(5) }));
  });
  const legend = el("div", { class: "legend" }, order.slice(0, 7).map((g) => el("span", { class: `${colour(g)} ident`, text: dimensionLabel(group, g === "" ? null : g, orgId) })),
    order.length > 7 ? el("span", { class: "c7", text: "\u2014 others \u2014" }) : null);
  return el("div", {}, chart, legend);
}

function csvField(value) {
  let text = value === null || value === undefined ? "" : String(value);
  // A cell a spreadsheet would run as a formula (an end user's id, a name) is
  // defused as the server's CSV does it; a number stays a number.
  if (/^[=+\-@\t\r]/.test(text) && !/^-?\d+(\.\d+)?$/.test(text)) text = "'" + text;
  // Quoted with a `;` too: spreadsheets in some locales split on it.
  return /[",;\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// The table on screen as CSV: the API's own rows and total, unchanged (the
// operator's cost only when the API shows it: to the operator's token).
function downloadCsv(name, group, report, orgId) {
  const withCost = "operator_cost" in report.total;
  const figures = (r) => {
    const cells = [r.requests, r.input_tokens, r.cached_input_tokens, r.output_tokens, r.tool_units, r.charged];
    return withCost ? cells.concat([r.operator_cost]) : cells;
  };
  const head = ["requests", "input_tokens", "cached_input_tokens", "output_tokens", "tool_units", "charged"];
  const lines = [[group, "name"].concat(withCost ? head.concat(["operator_cost"]) : head)];
  for (const r of report.rows) {
    lines.push([r[group], dimensionLabel(group, r[group], orgId)].concat(figures(r)));
  }
  lines.push(["total", ""].concat(figures(report.total)));
  const text = lines.map((line) => line.map(csvField).join(",")).join("\r\n") + "\r\n";
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function ledgerPage(org, params) {
  const zone = orgZone(org);
  const names = await loadNames(org.id);
  const balances = await api(`/orgs/${org.id}/balances`);
  const query = new URLSearchParams();
  for (const name of ["wallet", "kind", "user", "key", "after", "limit"]) if (params.get(name)) query.set(name, params.get(name));
  for (const name of ["from", "to"]) {
    const day = params.get(name);
    if (day && /^\d{4}-\d{2}-\d{2}$/.test(day)) {
      const [y, m, d] = day.split("-").map(Number);
      query.set(name, localMidnight(zone, y, m, name === "to" ? d + 1 : d).toISOString());
    }
  }
  if (!query.has("limit")) query.set("limit", "50");
  const page = await api(`/orgs/${org.id}/ledger?${query}`);
  const select = (id, label, options, current) => el("label", {}, label, el("select", { id, name: id },
    options.map(([value, text]) => el("option", { value, selected: value === (current || ""), text }))));
  const form = el("form", { class: "inline", id: "ledger-filters" },
    select("wallet", "Wallet", [["", "All"], ["pool", "Pool"], ...balances.balances.filter((b) => b.wallet.lite !== undefined)
      .map((b) => [`lite:${b.wallet.lite}`, walletName(b.wallet, org.id)])], params.get("wallet")),
    select("kind", "Kind", [["", "All"], ...["grant", "purchase", "adjustment", "debit", "write_off", "write_off_reversed"].map((k) => [k, k.replaceAll("_", " ")])], params.get("kind")),
    select("user", "User", [["", "All"], ...names.users.map((u) => [String(u.id), u.name])], params.get("user")),
    select("key", "Key", [["", "All"], ...names.keys.map((k) => [String(k.id), `${k.label || "key"} #${k.id}`])], params.get("key")),
    el("label", {}, "From", el("input", { type: "date", name: "from", value: params.get("from") || "" })),
    el("label", {}, "To", el("input", { type: "date", name: "to", value: params.get("to") || "" })),
    el("button", { type: "submit", text: "Filter" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [name, value] of new FormData(form)) if (value) next.set(name, value);
    go(`#/org/${org.id}/ledger?${next}`);
  });
  const rows = page.entries.map((e) => {
    const k = e.kind;
    let detail = "";
    if (k.type === "debit") {
      const d = k.details || {};
      const usage = d.usage ? `${d.usage.input_tokens} in / ${d.usage.output_tokens} out${d.usage.tool_units ? ` / ${d.usage.tool_units} units` : ""}` : "";
      detail = el("div", { class: "small" },
        el("div", {}, `${d.model || d.tool || "?"} · ${usage} · key ${names.key[k.key] || k.key}`),
        el("div", { class: "mono muted", title: "request id" }, k.request_id),
        el("div", { class: "muted" }, `price ${d.price_version || "?"}`),
        toNanos(k.overrun) !== 0n ? el("div", { class: "tag bad" }, "overrun ", money(k.overrun)) : null);
    } else if (k.type === "write_off_reversed") {
      // An expired lot's write-off taken back for a debit settled before the expiry.
      detail = el("span", { class: "small" }, `from expired lot ${k.expired_lot} (${k.origin.kind}) · for request `,
        el("span", { class: "mono", text: k.request_id }));
    } else if (k.origin) {
      detail = el("span", { class: "small" }, `${k.origin.kind}${k.expires_at ? " · expires " : ""}`, k.expires_at ? when(k.expires_at, zone, false) : "");
    } else if (k.reason) {
      detail = el("span", { class: "small", text: typeof k.reason === "string" ? k.reason : JSON.stringify(k.reason) });
    }
    return { attrs: { "data-entry": String(e.id), "data-kind": k.type, "data-key": k.key !== undefined ? String(k.key) : null },
      cells: [when(e.at, zone), walletName(e.wallet, org.id), k.type.replaceAll("_", " "), money(e.amount), money(e.balance_after), detail] };
  });
  const paging = el("div", { class: "toolbar" });
  if (params.get("after")) {
    const first = new URLSearchParams(params); first.delete("after");
    paging.append(el("a", { href: `#/org/${org.id}/ledger?${first}`, text: "First page" }));
  }
  if (page.next_cursor !== null) {
    const next = new URLSearchParams(params); next.set("after", String(page.next_cursor));
    paging.append(el("a", { href: `#/org/${org.id}/ledger?${next}`, id: "ledger-next", text: "Next page →" }));
  }
  return el("div", {}, el("h1", { text: `Ledger · ${org.name}` }), card(null, form,
    table([{ label: "Time" }, { label: "Wallet" }, { label: "Kind" }, { label: "Amount", num: true }, { label: "Balance after", num: true }, { label: "Details" }], rows),
    paging));
}

function limitsText(limits) {
  const set = Object.entries(limits || {}).filter(([, v]) => v !== null);
  return set.length ? set.map(([k, v]) => `${k.replace("_", " ")} $${v}`).join(", ") : "none";
}

function limitInputs(prefix, limits) {
  return ["per_request", "daily", "monthly", "contract_yearly"].map((name) =>
    el("label", {}, name.replace("_", " "), el("input", { type: "text", inputmode: "decimal", name: `${prefix}${name}`, size: "8",
      value: (limits && limits[name]) || "", placeholder: "no limit" })));
}

function readLimits(form, prefix) {
  const limits = {};
  for (const name of ["per_request", "daily", "monthly", "contract_yearly"]) {
    const value = String(new FormData(form).get(`${prefix}${name}`) || "").trim();
    if (value) limits[name] = value;
  }
  return limits;
}

async function keysPage(org) {
  const names = await loadNames(org.id);
  const flash = el("div", { id: "flash" });
  const owners = [...names.users.map((u) => [`user:${u.id}`, `${u.name} (${u.plan})`]), ...names.apps.map((a) => [`app:${a.id}`, `${a.name} (app)`])];
  const create = el("form", { class: "inline", id: "create-key" },
    el("label", {}, "Owner", el("select", { name: "owner", id: "key-owner" }, owners.map(([v, t]) => el("option", { value: v, text: t })))),
    el("label", {}, "Label", el("input", { type: "text", name: "label", id: "key-label", size: "14" })),
    ...limitInputs("", null),
    el("button", { type: "submit", text: "Create key" }));
  create.addEventListener("submit", async (event) => {
    event.preventDefault();
    const [kind, id] = String(new FormData(create).get("owner")).split(":");
    const body = { [kind]: Number(id), label: String(new FormData(create).get("label") || ""), limits: readLimits(create, "") };
    try {
      const key = await api(`/orgs/${org.id}/keys`, { method: "POST", body });
      await rerenderKeys(org, secretBox(key));
    } catch (error) { showError(error.message); }
  });
  const keyRows = names.keys.map((k) => {
    const owner = k.owner.user !== undefined ? `${names.user[k.owner.user] || "user " + k.owner.user}` : `${names.app[k.owner.app] || "app " + k.owner.app} (app)`;
    const revoke = el("button", { class: "danger", type: "button", disabled: k.revoked, "data-revoke": String(k.id), text: "Revoke" });
    revoke.addEventListener("click", async () => {
      // The id only: a label is the tenant's text, inside the operator's prompt.
      if (!confirm(`Revoke key #${k.id}? Requests with it will be refused at once.`)) return;
      try { await api(`/orgs/${org.id}/keys/${k.id}/revoke`, { method: "POST" }); await rerenderKeys(org); } catch (error) { showError(error.message); }
    });
    const edit = el("button", { class: "secondary", type: "button", "data-edit": String(k.id), text: "Limits & scope" });
    edit.addEventListener("click", () => editKey(org, k, edit));
    return { attrs: { "data-key": String(k.id) }, cells: [String(k.id), k.label || "—", owner, limitsText(k.limits),
      (k.scope.routes.length || k.scope.models.length) ? `${k.scope.routes.join(", ") || "all routes"}; ${k.scope.models.join(", ") || "all models"}` : "all",
      k.revoked ? el("span", { class: "tag bad", text: "revoked" }) : el("span", { class: "tag good", text: "active" }),
      el("div", { class: "toolbar" }, edit, revoke)] };
  });
  const userRows = names.users.map((u) => {
    const plan = el("select", { "aria-label": `Plan of ${u.name}`, "data-plan": String(u.id) },
      ["pro", "lite"].map((p) => el("option", { value: p, selected: p === u.plan, text: p })));
    const save = el("button", { class: "secondary", type: "button", text: "Change plan" });
    save.addEventListener("click", async () => {
      try { await api(`/orgs/${org.id}/users/${u.id}`, { method: "PATCH", body: { plan: plan.value } }); await rerenderKeys(org); } catch (error) { showError(error.message); }
    });
    return { cells: [String(u.id), u.name, el("div", { class: "toolbar" }, plan, save), money(u.lite_monthly_allowance), limitsText(u.limits)] };
  });
  return el("div", { id: "keys-page" }, el("h1", { text: `Keys and users · ${org.name}` }), flash,
    card("Create a key", create),
    card("Keys", table([{ label: "Id" }, { label: "Label" }, { label: "Owner" }, { label: "Limits" }, { label: "Scope" }, { label: "State" }, { label: "" }], keyRows)),
    card("Users", table([{ label: "Id" }, { label: "Name" }, { label: "Plan" }, { label: "Lite allowance", num: true }, { label: "Limits" }], userRows)));
}

function secretBox(key) {
  const code = el("code", { class: "mono", id: "new-secret", text: key.secret });
  const copy = el("button", { type: "button", id: "copy-secret", text: "Copy" });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(key.secret);
      copy.textContent = "Copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents(code);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      copy.textContent = "Selected: press Ctrl+C";
    }
  });
  return el("div", { class: "secret", "data-key": String(key.id) },
    el("strong", { text: `Key ${key.id} created. Its secret is shown once:` }), code, copy);
}

async function rerenderKeys(org, flash) {
  const content = await keysPage(org);
  const page = document.getElementById("page");
  page.replaceChildren(content);
  if (flash) document.getElementById("flash").replaceChildren(flash);
}

function editKey(org, key, button) {
  const row = button.closest("tr");
  if (row.nextElementSibling && row.nextElementSibling.classList.contains("edit-row")) {
    row.nextElementSibling.remove();
    return;
  }
  const form = el("form", { class: "inline" }, ...limitInputs("", key.limits),
    el("label", {}, "Routes (comma separated)", el("input", { type: "text", name: "routes", value: key.scope.routes.join(", ") })),
    el("label", {}, "Models (comma separated)", el("input", { type: "text", name: "models", value: key.scope.models.join(", ") })),
    el("button", { type: "submit", text: "Save" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const list = (name) => String(new FormData(form).get(name) || "").split(",").map((s) => s.trim()).filter(Boolean);
    try {
      await api(`/orgs/${org.id}/keys/${key.id}/limits`, { method: "PUT", body: readLimits(form, "") });
      await api(`/orgs/${org.id}/keys/${key.id}/scope`, { method: "PUT", body: { routes: list("routes"), models: list("models") } });
      await rerenderKeys(org);
    } catch (error) { showError(error.message); }
  });
  row.after(el("tr", { class: "edit-row" }, el("td", { colspan: "7" }, form)));
}

async function purchasesPage(org) {
  const zone = orgZone(org);
  const balances = await api(`/orgs/${org.id}/balances`);
  const pool = poolOf(balances.balances);
  const result = el("div", { id: "purchase-result" });
  // One idempotency key per purchase attempt: a retry after an unclear
  // failure resends the same key, so it can never buy twice.
  let idempotencyKey = crypto.randomUUID();
  const form = el("form", { class: "inline", id: "purchase-form" },
    el("label", {}, "Amount (USD)", el("input", { type: "text", inputmode: "decimal", name: "amount", id: "purchase-amount", required: true, pattern: "^[0-9]{1,13}(\\.[0-9]{1,9})?$", placeholder: "100.00" })),
    el("label", {}, "Reference", el("input", { type: "text", name: "reference", id: "purchase-reference", placeholder: "PO number" })),
    el("button", { type: "submit", id: "purchase-submit", text: "Buy credits" }));
  form.addEventListener("input", () => { idempotencyKey = crypto.randomUUID(); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = { amount: String(data.get("amount")).trim() };
    if (String(data.get("reference") || "").trim()) body.reference = String(data.get("reference")).trim();
    const button = document.getElementById("purchase-submit");
    button.disabled = true;
    try {
      const receipt = await api(`/orgs/${org.id}/purchases`, { method: "POST", body, headers: { "idempotency-key": idempotencyKey } });
      const after = poolOf((await api(`/orgs/${org.id}/balances`)).balances);
      result.replaceChildren(card("Receipt", facts([
        ["Entry", String(receipt.entry)], ["Lot", String(receipt.lot)], ["Amount", money(receipt.amount)],
        ["Expires", when(receipt.expires_at, zone)], ["Balance after", money(receipt.balance_after)],
        ["Pool balance now", el("span", { id: "new-balance" }, money(after.balance))],
        ["Idempotency key", el("span", { class: "mono", text: idempotencyKey })]])));
      form.reset();
      idempotencyKey = crypto.randomUUID();
    } catch (error) {
      showError(`${error.message}${error.status === 503 ? " — retry: the same Idempotency-Key is sent again" : ""}`);
    } finally {
      button.disabled = false;
    }
  });
  return el("div", {}, el("h1", { text: `Purchases · ${org.name}` }),
    el("div", { class: "grid" }, stat("Pool balance", pool ? money(pool.balance) : "—", "purchase-balance")),
    card("Buy credits for the pool", form, el("p", { class: "small muted", text: "Credits bought expire at the end of the contract term." })),
    result);
}

async function pricesPage() {
  if (state.who.scope !== "operator") {
    return card("Prices", el("p", { class: "empty", text: "The price table is shown to the operator token." }));
  }
  const [status, entries] = await Promise.all([api("/prices"), api("/prices/table")]);
  const info = facts([
    ["Version", el("span", { id: "price-version", class: "mono", text: status.version })],
    ["As of", `${status.as_of || "—"}${status.age_days !== null && status.age_days !== undefined ? ` (${status.age_days} days old)` : ""}`],
    ["Markup", `${status.markup_percent}%`], ["Loaded", when(status.loaded_at, "UTC")],
    ["Last reload error", status.last_reload_error ? el("span", { class: "tag bad", text: status.last_reload_error }) : "none"]]);
  const models = table([{ label: "Model" }, { label: "Input / 1M", num: true }, { label: "Cached input / 1M", num: true, cls: "hide-narrow" },
    { label: "Output / 1M", num: true }, { label: "Per request", num: true, cls: "hide-narrow" }],
  entries.models.map((m) => ({ cells: [m.name, money(m.input_per_mtok), money(m.cached_input_per_mtok), money(m.output_per_mtok), money(m.per_request)] })));
  const tools = table([{ label: "Tool" }, { label: "Per call", num: true }, { label: "Per unit", num: true }, { label: "Unit" }],
    entries.tools.map((t) => ({ cells: [t.name, money(t.per_call), money(t.per_unit), t.unit || "—"] })));
  return el("div", {}, el("h1", { text: "Prices" }), card("Table in force", info), card("Models", models), card("Tools", tools));
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    state.who = null;
    render();
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", render);
  render();
});
