//! An origin's bytes: response head, framing decision, then the body as framed.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use _engine::engine::http1::{response_body_kind, BufStream};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the request method the response answers.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let method = ["GET", "HEAD", "POST", "CONNECT"][pick as usize % 4];
    common::block_on(async {
        let mut src = BufStream::new(rest);
        if let Ok(head) = src.read_response_head(64 * 1024).await {
            let _ = head.encode();
            if let Ok(kind) = response_body_kind(method, &head) {
                common::drain_body(&mut src, kind, rest.len()).await;
            }
        }
    });
});
