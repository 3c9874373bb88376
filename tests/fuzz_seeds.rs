//! The fuzz seeds as regression tests: every file of `fuzz/seeds/<target>/`
//! goes through the same property the cargo-fuzz target checks
//! (`fuzz/properties.rs`), under `cargo test`, so a finding copied there
//! stays fixed without a fuzz run. Seeds named below must also still come
//! to what they were written for.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

#[path = "../fuzz/properties.rs"]
mod properties;

use std::path::PathBuf;

/// Every seed of `target`, by file name, in name order.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Runs `property` on every seed of `target`, naming the seed that fails;
/// returns each seed's outcome.
fn replay<T>(target: &str, property: fn(&[u8]) -> T) -> Vec<(String, T)> {
    seeds(target)
        .into_iter()
        .map(
            |(name, bytes)| match std::panic::catch_unwind(|| property(&bytes)) {
                Ok(out) => (name, out),
                Err(e) => {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    panic!("fuzz/seeds/{target}/{name} breaks the property: {why}")
                }
            },
        )
        .collect()
}

/// Each named seed came to `want`, and every name is still there.
fn expect<T: PartialEq + std::fmt::Debug>(got: &[(String, T)], want: &[(&str, T)]) {
    for (name, w) in want {
        let (_, g) = got
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("seed {name} is gone"));
        assert_eq!(g, w, "seed {name}");
    }
}

#[test]
fn mcp_parse_seeds_hold_the_parser_property() {
    let got = replay("mcp_parse", properties::mcp_parse);
    expect(
        &got,
        &[
            ("batch.json", "refused"),
            ("duplicate_name.json", "refused"),
            ("initialize.json", "request"),
            ("response.json", "response"),
            ("tools_call.json", "tools/call"),
            ("big_integers.json", "tools/call"),
        ],
    );
}

#[test]
fn policy_parse_seeds_hold_the_parser_property() {
    let got = replay("policy_parse", properties::policy_parse);
    expect(
        &got,
        &[
            ("billing-bot.yaml", (true, false)),
            ("ops-bot.yaml", (true, false)),
            ("duplicate_key.yaml", (false, false)),
        ],
    );
}

#[test]
fn decide_seeds_never_allow_what_the_manifest_does_not() {
    let got = replay("decide", properties::decide);
    let hold = Some("hold");
    expect(
        &got,
        &[
            ("allowed.txt", Some("allow")),
            ("glob.txt", Some("allow")),
            ("approval.txt", hold),
            ("denied.txt", Some("deny")),
            ("escalation.txt", Some("deny")),
            ("held_role.txt", hold),
            ("schema_refused.txt", Some("invalid")),
            ("self_grant.txt", hold),
            ("self_grant_folded.txt", hold),
            ("self_grant_homoglyph.txt", hold),
            ("policy_path_encoded.txt", hold),
        ],
    );
}
