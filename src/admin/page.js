// toolgate approver page. Every value shown comes from agents (attacker-
// controlled), so the DOM is built with textContent only: no innerHTML.
// The token lives in sessionStorage (this tab only), never in a URL, and is
// sent in the Authorization header, so cross-site requests cannot use it.
"use strict";
const KEY = "toolgate.token";
const $ = (id) => document.getElementById(id);
let timer = null;

function token() { return sessionStorage.getItem(KEY); }

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  let data = null;
  try { data = await res.json(); } catch (_) { data = null; }
  if (res.status === 401) { signOut("Your token was refused (expired or not an approver token)."); throw new Error("unauthorized"); }
  if (!res.ok) { throw new Error((data && data.error) || ("HTTP " + res.status)); }
  return data;
}

function ago(iso) {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.round(s / 60) + "m ago";
  return Math.round(s / 3600) + "h ago";
}

function left(iso) {
  const s = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (s <= 0) return "expired";
  if (s < 60) return s + "s left";
  if (s < 3600) return Math.round(s / 60) + "m left";
  return Math.round(s / 3600) + "h left";
}

function text(el, value) { el.textContent = value == null ? "" : String(value); }

function card(h) {
  const node = $("hold-card").content.firstElementChild.cloneNode(true);
  node.dataset.holdId = h.id;
  const q = (sel) => node.querySelector(sel);
  text(q(".agent"), h.agent);
  text(q(".tool"), h.tool);
  text(q(".upstream"), h.upstream ? "(" + h.upstream + ")" : "");
  text(q(".rule"), h.rule);
  text(q(".reason"), h.reason);
  text(q(".args"), JSON.stringify(h.arguments, null, 2));
  text(q(".age"), "held " + ago(h.created_at));
  text(q(".left"), left(h.expires_at));
  text(q(".approvals"), h.approvals.length + " of " + h.approvals_needed + " approval(s)" +
    (h.approvals.length ? " (" + h.approvals.map((a) => a.approver).join(", ") + ")" : ""));
  const decide = async (action) => {
    const reason = q(".decision-reason").value;
    const body = { reason: reason || null };
    if (action === "approve" && q(".window").value) body.for = q(".window").value;
    q(".approve").disabled = q(".deny").disabled = true;
    try {
      await api("POST", "/v1/holds/" + encodeURIComponent(h.id) + "/" + action, body);
      text(q(".error"), "");
      refresh();
    } catch (e) {
      text(q(".error"), e.message);
      q(".approve").disabled = q(".deny").disabled = false;
    }
  };
  q(".approve").addEventListener("click", () => decide("approve"));
  q(".deny").addEventListener("click", () => decide("deny"));
  return node;
}

async function refresh() {
  try {
    const pending = (await api("GET", "/v1/holds?status=pending&limit=200")).holds;
    const all = (await api("GET", "/v1/holds?status=all&limit=50")).holds;
    const box = $("pending");
    // Keep cards being edited; replace the rest.
    const keep = new Map();
    for (const el of box.children) {
      if (el.contains(document.activeElement)) keep.set(el.dataset.holdId, el);
    }
    box.replaceChildren(...pending.map((h) => keep.get(h.id) || card(h)));
    text($("pending-count"), pending.length);
    if (!pending.length) {
      const p = document.createElement("p");
      p.className = "muted";
      text(p, "Nothing is waiting for a decision.");
      box.appendChild(p);
    }
    const body = $("recent").querySelector("tbody");
    body.replaceChildren(...all.filter((h) => h.status !== "pending").map((h) => {
      const tr = document.createElement("tr");
      tr.dataset.holdId = h.id;
      for (const v of [h.status, h.agent, h.tool, h.approvals.map((a) => a.approver).join(", "),
                       h.decided_at ? ago(h.decided_at) : "", h.deny_reason || (h.approvals[0] && h.approvals[0].reason) || ""]) {
        const td = document.createElement("td");
        text(td, v);
        tr.appendChild(td);
      }
      return tr;
    }));
    text($("status"), "Updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e.message !== "unauthorized") text($("status"), "Cannot refresh: " + e.message);
  }
}

function signedIn() {
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  try {
    const claims = JSON.parse(atob(token().split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    text($("who"), "signed in as " + (claims.sub || "?"));
  } catch (_) { text($("who"), ""); }
  refresh();
  timer = setInterval(refresh, 2000);
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (timer) clearInterval(timer);
  $("signin").hidden = false;
  $("app").hidden = true;
  $("signout").hidden = true;
  text($("who"), "");
  text($("signin-error"), message || "");
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    try {
      await api("GET", "/v1/holds?status=pending&limit=1");
      text($("signin-error"), "");
      signedIn();
    } catch (e) {
      if (e.message !== "unauthorized") { sessionStorage.removeItem(KEY); text($("signin-error"), e.message); }
    }
  });
  $("signout").addEventListener("click", () => signOut());
  if (token()) signedIn();
});
