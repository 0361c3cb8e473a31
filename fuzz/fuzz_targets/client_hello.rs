//! The listener's ClientHello path with arbitrary bytes in arbitrary reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_fuzz::client_hello::check(data);
});
