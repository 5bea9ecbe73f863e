//! Shared by the fuzz targets: run the engine's async readers over a byte slice.

use std::future::Future;

use _engine::engine::http1::{BodyKind, BodyReader, BufStream};

/// Runs a future to completion on a current-thread runtime (made once per process).
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// Reads a body of `kind` from `src` to its end or first error, checking that no more bytes
/// come out than went in (the decoder never invents bytes).
pub async fn drain_body(src: &mut BufStream<&[u8]>, kind: BodyKind, input_len: usize) {
    let mut reader = BodyReader::new(kind);
    let mut total = 0usize;
    while let Ok(Some(piece)) = reader.next(src).await {
        assert!(!piece.is_empty(), "an empty body piece");
        total += piece.len();
        assert!(total <= input_len, "more body bytes than input bytes");
    }
}
