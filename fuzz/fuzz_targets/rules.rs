//! Rules files: parse, list, and decide a few requests with what parsed.
#![no_main]
use libfuzzer_sys::fuzz_target;

use _engine::engine::rules::{RuleSet, Scheme};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rules) = RuleSet::parse(text, "fuzz.rules") {
        for (method, scheme, host, port, path) in [
            ("GET", Scheme::Http, "example.test", 80, "/"),
            ("CONNECT", Scheme::Https, "a.b.example.test", 443, ""),
            ("POST", Scheme::Http, "[::1]", 8080, "/api/x"),
            ("GET", Scheme::Http, "EXAMPLE.TEST.", 0, "/a?b"),
        ] {
            let decision = rules.decide(method, scheme, host, port, path);
            let _ = decision.policy.describe();
        }
    }
});
