//! The policy matcher against a plain reference (fuzz/src/policy.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_fuzz::policy::policy(data);
});
