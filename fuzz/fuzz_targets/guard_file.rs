//! `gateway guard` file (guard.toml) parsing and checking with arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_fuzz::config::guard(data);
});
