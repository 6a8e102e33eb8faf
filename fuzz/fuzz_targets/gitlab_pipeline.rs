//! A GitLab pipeline hook delivery: headers, an empty line, the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| greenlight_fuzz::webhook(data, "Pipeline Hook"));
