//! Fuzz target `digest`: see [`sip_core_fuzz::digest`] for what it feeds and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sip_core_fuzz::digest::check(data));
