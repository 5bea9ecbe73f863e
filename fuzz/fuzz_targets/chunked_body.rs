//! The chunked decoder alone: sizes, extensions, trailers, truncation.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use _engine::engine::http1::{BodyKind, BufStream};

fuzz_target!(|data: &[u8]| {
    common::block_on(async {
        let mut src = BufStream::new(data);
        common::drain_body(&mut src, BodyKind::Chunked, data.len()).await;
    });
});
