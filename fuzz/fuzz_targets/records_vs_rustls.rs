//! The userspace record layer against rustls, byte for byte.
//!
//! A real rustls handshake in memory, then a stream of records the input
//! describes, sealed with the client's real traffic keys (so most get past
//! the MAC) and then mutated, goes to a rustls server (the oracle) and to
//! the gateway's record layer with the same keys. They must agree on every
//! accept, every refusal and every plaintext byte; the gateway may only be
//! stricter in the cases it documents. And what the gateway seals, rustls
//! must open to exactly what went in.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_fuzz::records::check(data);
});
