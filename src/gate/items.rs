//! `resources/*` and `prompts/*`: what an agent may list, read and get is
//! what its manifest's `resources` (URI globs) and `prompts` (exposed names)
//! allow, none by default. Reads and gets take the same path as a tool call:
//! decided by the pure policy, rate-limited per agent, audited before being
//! forwarded (and not forwarded when the record cannot be written).
//!
//! Resources keep their URIs (they are global names); prompts are exposed
//! under their upstream's prefix, like tools. A read goes to the upstream
//! that lists the URI, else to the one whose resource template's fixed
//! start it carries, else, with a single upstream, to that one.

use super::*;
use crate::policy::{Item, ItemDecision};

/// Pages and entries read from one upstream's list.
const MAX_PAGES: usize = 20;
const MAX_ENTRIES: usize = 10_000;

impl Gate {
    /// Every entry of `method`'s `key` array from each upstream, with the
    /// upstream's index. Upstreams that fail or lack the method are skipped.
    async fn list_all(&self, who: &Who, method: &str, key: &str) -> Vec<(usize, Value)> {
        let mut out = Vec::new();
        for (i, u) in self.0.upstreams.iter().enumerate() {
            let mut cursor: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let params = match &cursor {
                    Some(c) => json!({ "cursor": c }),
                    None => json!({}),
                };
                let result = match u.request(who, method, params).await {
                    Ok(Answer::Result(r)) => r.value(),
                    Ok(Answer::Error(_)) => break,
                    Err(e) => {
                        tracing::warn!(upstream.name = %u.name, error = %e, method, "cannot list");
                        break;
                    }
                };
                if let Some(Value::Array(items)) = result.get(key) {
                    for it in items.iter().filter(|it| it.is_object()) {
                        if out.len() < MAX_ENTRIES {
                            out.push((i, it.clone()));
                        }
                    }
                }
                cursor = result
                    .get("nextCursor")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
        }
        out
    }

    fn decide_item(&self, agent: &str, item: Item<'_>) -> ItemDecision {
        let snap = self.0.snapshot.load();
        policy::decide_item(&self.0.guard, snap.policy.get(agent).map(|m| &**m), item)
    }

    /// `resources/list`, `resources/templates/list`, `prompts/list`,
    /// filtered by the agent's manifest.
    pub(super) async fn list_items(&self, method: &str, who: &Who) -> Value {
        let agent = &who.agent;
        match method {
            "resources/list" => {
                let mut seen = std::collections::HashSet::new();
                let items: Vec<Value> = self
                    .list_all(who, method, "resources")
                    .await
                    .into_iter()
                    .filter_map(|(_, r)| {
                        let uri = r.get("uri")?.as_str()?;
                        let ok = seen.insert(uri.to_owned())
                            && self.decide_item(agent, Item::Resource(uri)).allow;
                        ok.then_some(r)
                    })
                    .collect();
                json!({ "resources": items })
            }
            "resources/templates/list" => {
                let items: Vec<Value> = self
                    .list_all(who, method, "resourceTemplates")
                    .await
                    .into_iter()
                    .filter_map(|(_, t)| {
                        let tpl = t.get("uriTemplate")?.as_str()?;
                        self.decide_item(agent, Item::Resource(tpl))
                            .allow
                            .then_some(t)
                    })
                    .collect();
                json!({ "resourceTemplates": items })
            }
            _ => {
                let items: Vec<Value> = self
                    .list_all(who, "prompts/list", "prompts")
                    .await
                    .into_iter()
                    .filter_map(|(i, mut p)| {
                        let name = p.get("name")?.as_str()?;
                        let exposed = format!("{}{}", self.0.upstreams[i].prefix, name);
                        if !self.decide_item(agent, Item::Prompt(&exposed)).allow {
                            return None;
                        }
                        p["name"] = Value::String(exposed);
                        Some(p)
                    })
                    .collect();
                json!({ "prompts": items })
            }
        }
    }

    /// Where `resources/read` of `uri` goes.
    async fn resource_route(&self, who: &Who, uri: &str) -> Option<usize> {
        if self.0.upstreams.len() == 1 {
            return Some(0);
        }
        let listed = self.list_all(who, "resources/list", "resources").await;
        if let Some((i, _)) = listed
            .iter()
            .find(|(_, r)| r.get("uri").and_then(Value::as_str) == Some(uri))
        {
            return Some(*i);
        }
        let templates = self
            .list_all(who, "resources/templates/list", "resourceTemplates")
            .await;
        templates
            .iter()
            .filter_map(|(i, t)| {
                let tpl = t.get("uriTemplate")?.as_str()?;
                let fixed = &tpl[..tpl.find('{').unwrap_or(tpl.len())];
                (!fixed.is_empty() && uri.starts_with(fixed)).then_some((fixed.len(), *i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// `prompts/get` of the exposed `name`: the upstream and its own name.
    async fn prompt_route(&self, who: &Who, name: &str) -> Option<(usize, String)> {
        self.list_all(who, "prompts/list", "prompts")
            .await
            .into_iter()
            .find_map(|(i, p)| {
                let own = p.get("name")?.as_str()?;
                let prefix = &self.0.upstreams[i].prefix;
                (name.strip_prefix(prefix.as_str()) == Some(own)).then(|| (i, own.to_owned()))
            })
    }

    /// `resources/read`, `resources/subscribe`, `resources/unsubscribe`
    /// and `prompts/get`: decide, rate-limit, audit, forward.
    pub(super) async fn get_item(
        &self,
        req: mcp::Request,
        id: Id,
        version: &'static str,
        caller: &Caller,
        ctx: &Ctx,
    ) -> Outcome {
        let resource = req.method.starts_with("resources/");
        let key = if resource { "uri" } else { "name" };
        let refuse = |code: i64, msg: &str, data: Value, record: Option<Record>| Outcome {
            reply: Reply::Rpc(
                StatusCode::OK,
                mcp::error_response(Some(&id), code, msg, Some(data)),
            ),
            session_id: None,
            record,
        };
        let Some(target) = req.params.get(key).and_then(Value::as_str) else {
            let msg = format!("{} needs a string {key}", req.method);
            return refuse(
                code::INVALID_PARAMS,
                &msg,
                json!({"decision": "deny", "request_id": ctx.request_id}),
                None,
            );
        };
        let target = target.to_owned();
        let arguments = req.params.get("arguments").cloned();
        if arguments.as_ref().is_some_and(|a| !a.is_object()) {
            let msg = "prompts/get arguments must be an object";
            return refuse(
                code::INVALID_PARAMS,
                msg,
                json!({"decision": "deny", "request_id": ctx.request_id}),
                None,
            );
        }
        let item = if resource {
            Item::Resource(&target)
        } else {
            Item::Prompt(&target)
        };
        let decision = self.decide_item(&caller.agent, item);
        let mut record = Record {
            event: if resource { "resource" } else { "prompt" },
            agent: Some(caller.agent.clone()),
            tool: Some(target.clone()),
            rule: Some(decision.rule.clone()),
            reason: Some(decision.reason.clone()),
            detail: Some(json!({ "method": req.method })),
            ..Record::default()
        };
        if let Some(a) = &arguments {
            record.args_sha256 = Some(audit::args_sha256(a));
            record.args = Some(audit::redact(a));
        }
        let data = |decision: &str, rule: &str| super::error_data(decision, &ctx.request_id, rule);
        if !decision.allow {
            record.decision = Some("deny");
            let d = data("deny", &decision.rule);
            return refuse(
                code::DENIED,
                &format!("denied: {}", decision.reason),
                d,
                Some(record),
            );
        }
        // Rate limits: the agent's own budget.
        let snap = self.0.snapshot.load();
        if let Some(m) = snap.policy.get(&caller.agent) {
            if let Err(limited) = snap.limiters.check(m, None) {
                let ms = limited.retry_after.as_millis().max(1) as u64;
                record.decision = Some("rate_limited");
                record.rule = Some("rate_limit.agent".into());
                record.reason = Some(format!("over the agent's rate limit; retry after {ms} ms"));
                let mut d = data("rate_limited", "rate_limit.agent");
                d["retry_after_ms"] = Value::from(ms);
                return refuse(code::RATE_LIMITED, "rate limited", d, Some(record));
            }
        }
        drop(snap);
        let route = if resource {
            self.resource_route(&ctx.who(caller), &target)
                .await
                .map(|i| (i, target.clone()))
        } else {
            self.prompt_route(&ctx.who(caller), &target).await
        };
        let Some((upstream, own)) = route else {
            let msg = format!("no upstream offers {target:?}");
            record.decision = Some("deny");
            record.rule = Some("catalog".into());
            record.reason = Some(msg.clone());
            return refuse(
                code::INVALID_PARAMS,
                &msg,
                data("deny", "catalog"),
                Some(record),
            );
        };
        let upstream = self.0.upstreams[upstream].clone();
        record.decision = Some("allow");
        record.request_id = Some(ctx.request_id.clone());
        record.detail = Some(json!({"method": req.method, "upstream": upstream.name}));
        let d = data("deny", &decision.rule);
        if self.0.audit_submit(record).is_err() {
            return refuse(
                code::AUDIT_UNAVAILABLE,
                "the audit log cannot be written; nothing was forwarded",
                d,
                None,
            );
        }
        let mut params = Map::new();
        params.insert(key.into(), Value::String(own));
        if let Some(a) = arguments {
            params.insert("arguments".into(), a);
        }
        let sent = Instant::now();
        let answer = upstream
            .request(&ctx.who(caller), &req.method, Value::Object(params))
            .await;
        self.settle(
            answer,
            Settle {
                upstream,
                sent,
                id,
                version,
                agent: Some(caller.agent.clone()),
                tool: target,
                request_id: ctx.request_id.clone(),
                rule: decision.rule.clone(),
                grant: None,
            },
        )
    }
}
