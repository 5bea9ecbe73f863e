//! A client's bytes: request head, framing decision, then the body as framed.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use _engine::engine::http1::{request_body_kind, BufStream};

fuzz_target!(|data: &[u8]| {
    common::block_on(async {
        let mut src = BufStream::new(data);
        if let Ok(head) = src.read_request_head(64 * 1024).await {
            assert!(!head.method.is_empty());
            let _ = head.encode();
            if let Ok(kind) = request_body_kind(&head) {
                common::drain_body(&mut src, kind, data.len()).await;
            }
        }
    });
});
