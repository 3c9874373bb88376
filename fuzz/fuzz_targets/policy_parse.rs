//! Any text as a manifest and as a config: problems are reported, never a
//! panic; a manifest that compiles answers its lookups without panicking.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use toolgate::config::Config;
use toolgate::manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut problems = Vec::new();
    if let Some(m) = manifest::compile(
        Path::new("/fuzz/tool-manifests/agent.yaml"),
        text,
        &mut problems,
    ) {
        for name in ["billing__get_invoice", "", "*", "a__b"] {
            let _ = m.tool_rule(name);
            let _ = m.deny_rule(name);
            let _ = m.prompt_rule(name);
        }
        let _ = m.resource_rule("billing://invoices/1");
    } else {
        assert!(!problems.is_empty(), "a refused manifest says why");
    }
    let _ = Config::from_yaml(Path::new("/fuzz/toolgate.yaml"), text);
});
