//! The server's configuration file, parsed and validated.
#![no_main]

use greenlight_server::config::{Config, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_yaml(text, &Overrides::default());
    }
});
