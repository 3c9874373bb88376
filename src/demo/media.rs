//! The demo's `media` tool: one call whose result holds every content kind
//! MCP defines (text with annotations, image, audio, an embedded text and
//! blob resource, a resource link), `structuredContent` and a result-level
//! `_meta`, and whose definition uses the schema features proxies tend to
//! mangle (`$schema`, `$defs` with `$ref`, `additionalProperties: false`,
//! `outputSchema`, `annotations`, a tool-level `_meta`). toolgate's tests
//! compare both, through toolgate and direct, to prove it relays them
//! unchanged.

use serde_json::{json, Value};

/// A 1x1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
/// Eight samples of 8 kHz mono 8-bit PCM, as a WAV file.
const WAV: &str = "UklGRiwAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQgAAACAoMCggGBAYA==";
/// A few bytes standing in for a PDF.
const PDF: &str = "JVBERi0xLjQgaW52b2ljZQ==";

/// The tool's definition.
pub fn definition() -> Value {
    json!({
        "name": "media",
        "title": "Invoice media",
        "description": "An invoice as every content kind: text, image, audio, embedded resources, a resource link, and structured content.",
        "inputSchema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "$defs": {
                "invoiceId": {"type": "string", "pattern": "^INV-[0-9]{6}$"},
                "kind": {"enum": ["text", "image", "audio", "resource", "resource_link"]}
            },
            "properties": {
                "invoice_id": {"$ref": "#/$defs/invoiceId"},
                "kinds": {"type": "array", "items": {"$ref": "#/$defs/kind"}, "uniqueItems": true}
            },
            "required": ["invoice_id"],
            "additionalProperties": false
        },
        "outputSchema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "invoice_id": {"type": "string"},
                "kinds": {"type": "array", "items": {"type": "string"}},
                "audio_bytes": {"type": "integer", "minimum": 0}
            },
            "required": ["invoice_id", "kinds"],
            "additionalProperties": false
        },
        "annotations": {
            "title": "Invoice media",
            "readOnlyHint": true,
            "destructiveHint": false,
            "idempotentHint": true,
            "openWorldHint": false
        },
        "_meta": {"com.example/owner": "billing"}
    })
}

/// The tool's result for `args`.
pub fn call(args: &Value) -> Value {
    let id = args
        .get("invoice_id")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let uri = format!("billing://invoices/{id}");
    json!({
        "content": [
            {"type": "text", "text": format!("Invoice {id}: 120.00 EUR, paid"),
             "annotations": {"audience": ["user", "assistant"], "priority": 0.8}},
            {"type": "image", "data": PNG, "mimeType": "image/png"},
            {"type": "audio", "data": WAV, "mimeType": "audio/wav",
             "annotations": {"audience": ["user"]}},
            {"type": "resource", "resource": {"uri": uri, "mimeType": "application/json",
             "text": json!({"invoice_id": id, "amount": 120.0, "currency": "EUR"}).to_string()}},
            {"type": "resource", "resource": {"uri": format!("{uri}.pdf"), "mimeType": "application/pdf",
             "blob": PDF, "_meta": {"com.example/pages": 1}}},
            {"type": "resource_link", "uri": uri, "name": format!("Invoice {id}"),
             "description": "The invoice itself", "mimeType": "application/json", "size": 64}
        ],
        "structuredContent": {
            "invoice_id": id,
            "kinds": ["text", "image", "audio", "resource", "resource", "resource_link"],
            "audio_bytes": 52
        },
        "isError": false,
        "_meta": {"com.example/served-by": "toolgate-demo", "com.example/cache": {"hit": false, "age": 0}}
    })
}
