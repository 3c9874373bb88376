//! See `properties::policy_parse`: the property lives there, shared with the seed
//! replay of `tests/fuzz_seeds.rs`.
#![no_main]

// Each target uses one of the shared properties.
#[allow(dead_code)]
#[path = "../properties.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = properties::policy_parse(data);
});
