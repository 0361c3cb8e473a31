//! The PROXY v2 encoder against the `proxy-header` crate's parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_fuzz::proxy_header::check(data);
});
