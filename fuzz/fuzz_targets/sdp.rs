//! Fuzz target `sdp`: see [`sip_core_fuzz::sdp`] for what it feeds and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sip_core_fuzz::sdp::check(data));
