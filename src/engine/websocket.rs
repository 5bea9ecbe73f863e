//! WebSocket messages (RFC 6455) on an upgraded connection, for handlers with the message
//! hook: frames are read both ways, data frames reassembled into messages (inflated where
//! permessage-deflate, RFC 7692, was negotiated), each message shown to the hook and then sent
//! on as it came, changed, or not at all. Control frames (ping, pong, close) go on at once,
//! also in the middle of a fragmented message. Handlers without the hook never get here: their
//! upgrades stay a byte relay.
//!
//! permessage-deflate: each direction inflates compressed messages with a context that follows
//! the sender's (kept from message to message unless that side's `*_no_context_takeover` was
//! negotiated). A message the hook leaves alone goes on in its original frames, still
//! compressed. A changed or injected message goes on uncompressed (RSV1 clear, which a
//! receiver always accepts and which leaves its context alone). Changing or dropping a
//! compressed message where the context is taken over leaves the receiver's context without
//! that message's bytes, which later messages of the sender may refer to: from then on that
//! direction's compressed messages are sent on inflated, so the receiver never inflates with
//! a context the sender did not mean.

use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::flow::{WebSocketMessageEvent, MAX_CHUNKS_PER_FLOW};
use super::flow_error::await_hook;
use super::hooks::{
    ConnectionHandler, HookWaits, InjectedMessage, MessageVerdict, WebSocketMessage,
};
use super::segment::Segmented;
use super::tunnel::IdleClock;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;

/// Largest message (after inflating) the relay reassembles; a larger one ends the connection.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Read buffer of each direction.
const READ_BUFFER: usize = 16 * 1024;

/// One frame as read from the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: the first frame of a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    /// The payload, unmasked.
    pub payload: Bytes,
    /// The frame's bytes as they came (masked, if they were).
    pub raw: Bytes,
}

/// Parses one frame from the front of `buf` and removes it; None while more bytes are
/// needed. `from_client`: frames must be masked (client to server) or must not be.
/// `deflate`: permessage-deflate was negotiated (RSV1 may mark a message's first frame).
/// A frame whose payload exceeds `max_payload` is an error, before its payload arrives.
pub fn parse_frame(
    buf: &mut BytesMut,
    from_client: bool,
    deflate: bool,
    max_payload: usize,
) -> Result<Option<Frame>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    let opcode = b0 & 0x0f;
    if b0 & 0x30 != 0 {
        return Err("RSV2/RSV3 set, but no extension that defines them was negotiated".into());
    }
    let control = opcode & 0x8 != 0;
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(format!("reserved opcode {opcode:#x}"));
    }
    if rsv1 && !deflate {
        return Err("RSV1 set, but permessage-deflate was not negotiated".into());
    }
    if rsv1 && (control || opcode == OP_CONTINUATION) {
        return Err("RSV1 set on a control or continuation frame".into());
    }
    let masked = b1 & 0x80 != 0;
    if masked != from_client {
        return Err(if from_client {
            "a frame from the client is not masked".into()
        } else {
            "a frame from the server is masked".into()
        });
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(n);
            if n >> 63 != 0 {
                return Err("frame length has its most significant bit set".into());
            }
            (n, 10)
        }
        n => (u64::from(n), 2),
    };
    if control && (!fin || len > 125) {
        return Err("control frame fragmented or longer than 125 bytes".into());
    }
    if len > max_payload as u64 {
        return Err(format!(
            "frame of {len} bytes exceeds the relay's limit of {max_payload} bytes"
        ));
    }
    let len = len as usize;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let key = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(key)
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    let raw = buf.split_to(at + len).freeze();
    let payload = match mask {
        Some(key) => {
            let mut p = raw[at..].to_vec();
            apply_mask(&mut p, key);
            Bytes::from(p)
        }
        None => raw.slice(at..),
    };
    Ok(Some(Frame {
        fin,
        rsv1,
        opcode,
        payload,
        raw,
    }))
}

fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// One unfragmented, uncompressed frame; masked with a fresh random key when it goes to the
/// server.
pub fn encode_frame(opcode: u8, payload: &[u8], to_server: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let mask_bit = if to_server { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if to_server {
        let mut key = [0u8; 4];
        // Masking keys must be unpredictable (RFC 6455, 5.3); a failing system generator
        // leaves the key zero, which is still a well-formed frame.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key);
        out.extend_from_slice(&key);
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], key);
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// What the 101 answer negotiated of permessage-deflate: whether each sender keeps its
/// compression context from one message to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deflate {
    pub client_context_takeover: bool,
    pub server_context_takeover: bool,
}

/// Reads the 101's `Sec-WebSocket-Extensions` values: Ok(None) without extensions,
/// Ok(Some(..)) for permessage-deflate alone, Err for extensions this relay cannot read
/// (their upgrade is then relayed as bytes).
pub fn negotiated_extensions<'a>(
    values: impl Iterator<Item = &'a str>,
) -> Result<Option<Deflate>, String> {
    let mut deflate = None;
    for extension in values.flat_map(|v| v.split(',')) {
        let mut params = extension.split(';').map(str::trim);
        let name = params.next().unwrap_or_default();
        if name.is_empty() {
            continue;
        }
        if !name.eq_ignore_ascii_case("permessage-deflate") || deflate.is_some() {
            return Err(format!("WebSocket extension {name:?} is not supported"));
        }
        let mut d = Deflate {
            client_context_takeover: true,
            server_context_takeover: true,
        };
        for param in params {
            let key = param.split('=').next().unwrap_or_default().trim();
            if key.eq_ignore_ascii_case("client_no_context_takeover") {
                d.client_context_takeover = false;
            } else if key.eq_ignore_ascii_case("server_no_context_takeover") {
                d.server_context_takeover = false;
            }
            // Window sizes need nothing: inflating with the largest window reads them all.
        }
        deflate = Some(d);
    }
    Ok(deflate)
}

/// Inflates one direction's compressed messages (raw deflate, RFC 7692), with the context
/// kept across messages when the sender keeps its own.
pub struct Inflater {
    state: Decompress,
    takeover: bool,
}

impl Inflater {
    pub fn new(takeover: bool) -> Self {
        Inflater {
            state: Decompress::new(false),
            takeover,
        }
    }

    /// The message's content from its compressed payload; more than `limit` bytes is an error.
    pub fn inflate(&mut self, compressed: &[u8], limit: usize) -> Result<Vec<u8>, String> {
        let mut input = Vec::with_capacity(compressed.len() + 4);
        input.extend_from_slice(compressed);
        // The sender removed the end of its sync flush; put it back.
        input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        let mut out = Vec::with_capacity((compressed.len() * 4).clamp(64, 1 << 20));
        let mut used = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.len());
            }
            let (in_before, out_before) = (self.state.total_in(), out.len());
            let status = self
                .state
                .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                .map_err(|e| format!("a compressed message does not inflate: {e}"))?;
            used += (self.state.total_in() - in_before) as usize;
            if out.len() > limit {
                return Err(format!(
                    "a compressed message inflates to more than {limit} bytes"
                ));
            }
            if status == Status::StreamEnd {
                // A final block: the sender's next message starts a new stream.
                self.state.reset(false);
                break;
            }
            let progressed = self.state.total_in() != in_before || out.len() != out_before;
            if used >= input.len() && out.len() < out.capacity() || !progressed {
                break;
            }
        }
        if !self.takeover {
            self.state.reset(false);
        }
        Ok(out)
    }
}

/// How the relay reaches the handler's message hook.
pub struct MessageHook<'a> {
    pub handler: &'a dyn ConnectionHandler,
    pub waits: &'a HookWaits,
    pub timeout: Duration,
    /// The flow records' clock: message times are seconds since it.
    pub epoch: Instant,
    /// Whether each message is listed (some sink records flows); they are counted anyway.
    pub list_messages: bool,
}

/// Most messages listed per direction; later ones are counted only.
const MAX_LISTED: usize = MAX_CHUNKS_PER_FLOW / 2;

/// What a message relay did, each way.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Bytes written toward the server and toward the client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Messages sent on (changed or not) and injected, in time order, when listed.
    pub messages: Vec<WebSocketMessageEvent>,
    /// How many messages went toward the server and toward the client.
    pub messages_up: u64,
    pub messages_down: u64,
    /// The first failure: a protocol error, a hook that failed or did not answer, a socket.
    pub error: Option<Failure>,
}

/// Why a message relay stopped early.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    /// The hook failed (the handler knows) rather than a peer or a socket.
    pub from_hook: bool,
}

/// Relays WebSocket messages between the client and the origin until both directions ended,
/// one failed, or nothing moved for `idle`. `injected` are the queues of messages the handler
/// adds toward the client and toward the server.
pub async fn relay<CR, CW, OR, OW>(
    (client_read, client_write): (CR, Segmented<CW>),
    (origin_read, origin_write): (OR, Segmented<OW>),
    deflate: Option<Deflate>,
    hook: &MessageHook<'_>,
    injected: (
        mpsc::UnboundedReceiver<InjectedMessage>,
        mpsc::UnboundedReceiver<InjectedMessage>,
    ),
    idle: Duration,
) -> Relayed
where
    CR: AsyncRead + Unpin,
    OR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    OW: AsyncWrite + Unpin,
{
    let clock = IdleClock::new(idle);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (to_client, to_server) = injected;
    let up = Direction {
        from_client: true,
        inflater: deflate.map(|d| Inflater::new(d.client_context_takeover)),
        hook,
        clock: &clock,
        stop_tx: &stop_tx,
    };
    let down = Direction {
        from_client: false,
        inflater: deflate.map(|d| Inflater::new(d.server_context_takeover)),
        hook,
        clock: &clock,
        stop_tx: &stop_tx,
    };
    let (up, down) = tokio::join!(
        up.run(client_read, origin_write, to_server, stop_rx.clone()),
        down.run(origin_read, client_write, to_client, stop_rx)
    );
    let mut messages = up.messages;
    messages.extend(down.messages);
    messages.sort_by(|a, b| a.t.total_cmp(&b.t));
    Relayed {
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        messages,
        messages_up: up.count,
        messages_down: down.count,
        error: up.error.or(down.error),
    }
}

struct Direction<'a, 'h> {
    from_client: bool,
    inflater: Option<Inflater>,
    hook: &'a MessageHook<'h>,
    clock: &'a IdleClock,
    stop_tx: &'a watch::Sender<bool>,
}

#[derive(Default)]
struct OneWay {
    bytes: u64,
    count: u64,
    messages: Vec<WebSocketMessageEvent>,
    error: Option<Failure>,
}

/// A data message being reassembled from its frames.
struct Partial {
    opcode: u8,
    compressed: bool,
    payload: Vec<u8>,
    raw: Vec<u8>,
}

impl Direction<'_, '_> {
    fn name(&self) -> &'static str {
        if self.from_client {
            "up"
        } else {
            "down"
        }
    }

    fn peer(&self) -> &'static str {
        if self.from_client {
            "client"
        } else {
            "server"
        }
    }

    async fn run<R, W>(
        mut self,
        mut reader: R,
        mut writer: Segmented<W>,
        mut injected: mpsc::UnboundedReceiver<InjectedMessage>,
        mut stop_rx: watch::Receiver<bool>,
    ) -> OneWay
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = OneWay::default();
        let mut buf = BytesMut::new();
        let mut partial: Option<Partial> = None;
        // A changed or dropped compressed message left the receiver's context behind.
        let mut diverged = false;
        // A close frame went on: nothing may follow it this way.
        let mut closed = false;
        let failure = 'relay: loop {
            loop {
                let deflate = self.inflater.is_some();
                let frame =
                    match parse_frame(&mut buf, self.from_client, deflate, MAX_MESSAGE_BYTES) {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(e) => break 'relay Some(self.protocol_error(e)),
                    };
                let step = self
                    .frame(
                        frame,
                        &mut partial,
                        &mut diverged,
                        &mut closed,
                        &mut writer,
                        &mut out,
                    )
                    .await;
                if let Err(failure) = step {
                    break 'relay Some(failure);
                }
            }
            buf.reserve(READ_BUFFER);
            tokio::select! {
                biased;
                _ = async { drop(stop_rx.wait_for(|s| *s).await) } => break None,
                Some(message) = injected.recv() => {
                    if closed {
                        continue;
                    }
                    let opcode = if message.is_text { OP_TEXT } else { OP_BINARY };
                    let frame = encode_frame(opcode, &message.content, self.from_client);
                    if let Err(e) = self.send(&mut writer, &frame, &mut out).await {
                        break Some(e);
                    }
                    self.record(&mut out, message.content.len(), message.is_text);
                }
                read = tokio::time::timeout(self.clock.idle, reader.read_buf(&mut buf)) => match read {
                    Err(_) => {
                        if self.clock.expired() {
                            break Some(Failure { message: self.clock.error().to_string(), from_hook: false });
                        }
                    }
                    Ok(Ok(0)) => {
                        // Half-close: pass the end of stream on, the other way carries on.
                        let _ = writer.shutdown().await;
                        break None;
                    }
                    Ok(Ok(_)) => self.clock.touch(),
                    Ok(Err(e)) => {
                        let _ = writer.shutdown().await;
                        break Some(Failure { message: format!("reading from the {}: {e}", self.peer()), from_hook: false });
                    }
                },
            }
        };
        if failure.is_some() {
            let _ = self.stop_tx.send(true);
        }
        out.error = failure;
        out
    }

    fn protocol_error(&self, e: String) -> Failure {
        Failure {
            message: format!("WebSocket protocol error from the {}: {e}", self.peer()),
            from_hook: false,
        }
    }

    /// One frame: a control frame goes on at once; data frames gather into a message, which
    /// goes through the hook when its last frame arrives.
    async fn frame<W: AsyncWrite + Unpin>(
        &mut self,
        frame: Frame,
        partial: &mut Option<Partial>,
        diverged: &mut bool,
        closed: &mut bool,
        writer: &mut Segmented<W>,
        out: &mut OneWay,
    ) -> Result<(), Failure> {
        if frame.opcode & 0x8 != 0 {
            if *closed {
                return Ok(());
            }
            self.send(writer, &frame.raw, out).await?;
            *closed = frame.opcode == OP_CLOSE;
            return Ok(());
        }
        match (frame.opcode, partial.as_mut()) {
            (OP_CONTINUATION, None) => {
                return Err(self.protocol_error("a continuation frame outside a message".into()))
            }
            (OP_CONTINUATION, Some(p)) => {
                if p.payload.len() + frame.payload.len() > MAX_MESSAGE_BYTES {
                    return Err(self.protocol_error(format!(
                        "a message longer than the relay's limit of {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                p.payload.extend_from_slice(&frame.payload);
                p.raw.extend_from_slice(&frame.raw);
            }
            (_, Some(_)) => {
                return Err(self.protocol_error("a new message began inside another".into()))
            }
            (opcode, None) => {
                *partial = Some(Partial {
                    opcode,
                    compressed: frame.rsv1,
                    payload: frame.payload.to_vec(),
                    raw: frame.raw.to_vec(),
                })
            }
        }
        if !frame.fin {
            return Ok(());
        }
        let Some(message) = partial.take() else {
            return Ok(());
        };
        self.message(message, diverged, *closed, writer, out).await
    }

    /// A whole message: shown to the hook, then sent on as it came, changed, or not at all.
    async fn message<W: AsyncWrite + Unpin>(
        &mut self,
        message: Partial,
        diverged: &mut bool,
        closed: bool,
        writer: &mut Segmented<W>,
        out: &mut OneWay,
    ) -> Result<(), Failure> {
        let content = match (&mut self.inflater, message.compressed) {
            (Some(inflater), true) => inflater
                .inflate(&message.payload, MAX_MESSAGE_BYTES)
                .map_err(|e| self.protocol_error(e))?,
            _ => message.payload,
        };
        let content = Bytes::from(content);
        let is_text = message.opcode == OP_TEXT;
        let reply = self.hook.handler.websocket_message(WebSocketMessage {
            from_client: self.from_client,
            is_text,
            content: content.clone(),
        });
        let verdict = await_hook(
            self.hook.waits,
            self.hook.timeout,
            reply,
            "on_websocket_message",
        )
        .await
        .map_err(|e| Failure {
            message: e.message,
            from_hook: e.handler_knows,
        })?;
        self.clock.touch();
        let takes_over = self.inflater.as_ref().is_some_and(|i| i.takeover);
        let sent = match verdict {
            MessageVerdict::Keep if message.compressed && *diverged => Some((
                encode_frame(message.opcode, &content, self.from_client),
                content.len(),
            )),
            MessageVerdict::Keep => Some((message.raw, content.len())),
            MessageVerdict::Replace(new) => {
                *diverged |= message.compressed && takes_over;
                Some((
                    encode_frame(message.opcode, &new, self.from_client),
                    new.len(),
                ))
            }
            MessageVerdict::Drop => {
                *diverged |= message.compressed && takes_over;
                None
            }
        };
        if let Some((bytes, size)) = sent {
            if closed {
                return Ok(());
            }
            self.send(writer, &bytes, out).await?;
            self.record(out, size, is_text);
        }
        Ok(())
    }

    async fn send<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut Segmented<W>,
        bytes: &[u8],
        out: &mut OneWay,
    ) -> Result<(), Failure> {
        let written = async {
            writer.write_all(bytes).await?;
            writer.flush().await
        };
        written.await.map_err(|e: io::Error| Failure {
            message: format!(
                "writing to the {}: {e}",
                if self.from_client { "server" } else { "client" }
            ),
            from_hook: false,
        })?;
        out.bytes += bytes.len() as u64;
        self.clock.touch();
        Ok(())
    }

    fn record(&self, out: &mut OneWay, size: usize, is_text: bool) {
        out.count += 1;
        if !self.hook.list_messages || out.messages.len() >= MAX_LISTED {
            return;
        }
        out.messages.push(WebSocketMessageEvent {
            direction: self.name(),
            size,
            t: self.hook.epoch.elapsed().as_secs_f64(),
            is_text,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hooks::{
        ConnectDecision, HandlerCommand, Reply, RequestParts, ResponseParts,
    };
    use crate::engine::segment::SegmentPolicy;
    use flate2::{Compress, Compression, FlushCompress};

    fn masked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1, 2, 3, 4];
        let mut out = vec![b0];
        assert!(payload.len() < 126);
        out.push(0x80 | payload.len() as u8);
        out.extend_from_slice(&key);
        let mut p = payload.to_vec();
        apply_mask(&mut p, key);
        out.extend(p);
        out
    }

    fn parse(bytes: &[u8], from_client: bool) -> Result<Option<Frame>, String> {
        parse_frame(&mut BytesMut::from(bytes), from_client, true, 1 << 20)
    }

    #[test]
    fn frames_are_parsed_unmasked_and_kept_raw() {
        let raw = masked_frame(0x81, b"hello");
        let mut buf = BytesMut::from(&raw[..]);
        buf.extend_from_slice(&[0x89]); // the start of the next frame stays in the buffer
        let frame = parse_frame(&mut buf, true, false, 100).unwrap().unwrap();
        assert_eq!(
            (frame.fin, frame.rsv1, frame.opcode),
            (true, false, OP_TEXT)
        );
        assert_eq!(&frame.payload[..], b"hello");
        assert_eq!(&frame.raw[..], &raw[..]);
        assert_eq!(&buf[..], &[0x89]);
        // Encoded frames read back the same, masked toward the server and not toward the client.
        for to_server in [true, false] {
            for len in [0usize, 125, 126, 65535, 65536] {
                let payload = vec![7u8; len];
                let bytes = encode_frame(OP_BINARY, &payload, to_server);
                let f = parse(&bytes, to_server).unwrap().unwrap();
                assert_eq!((f.opcode, f.fin, f.payload.len()), (OP_BINARY, true, len));
                assert!(f.payload.iter().all(|&b| b == 7));
            }
        }
    }

    #[test]
    fn incomplete_frames_wait_for_more_bytes() {
        let raw = encode_frame(OP_BINARY, &[9u8; 300], true);
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw[..cut], true), Ok(None), "cut at {cut}");
        }
        assert!(parse(&raw, true).unwrap().is_some());
    }

    #[test]
    fn malformed_frames_are_refused() {
        let cases: &[(&[u8], bool, &str)] = &[
            (&[0x83, 0x00], false, "reserved opcode"),
            (&[0x8B, 0x00], false, "reserved opcode"),
            (&[0xA1, 0x00], false, "RSV2/RSV3"),
            (&[0x91, 0x00], false, "RSV2/RSV3"),
            (&[0xC9, 0x00], false, "RSV1 set on a control"),
            (
                &[0x40, 0x00],
                false,
                "RSV1 set on a control or continuation",
            ),
            (&[0x09, 0x00], false, "control frame fragmented"),
            (&[0x89, 0x7E, 0x00, 0x7E], false, "longer than 125"),
            (&[0x81, 0x00], true, "not masked"),
            (&[0x81, 0x80, 0, 0, 0, 0], false, "is masked"),
            (
                &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 1],
                false,
                "most significant bit",
            ),
            (
                &[0x82, 0x7F, 0, 0, 0, 1, 0, 0, 0, 0],
                false,
                "exceeds the relay's limit",
            ),
        ];
        for (bytes, from_client, why) in cases {
            let err = parse(bytes, *from_client).unwrap_err();
            assert!(err.contains(why), "{bytes:?}: {err}");
        }
        // RSV1 without permessage-deflate.
        let err = parse_frame(&mut BytesMut::from(&[0xC1u8, 0x00][..]), false, false, 10);
        assert!(err.unwrap_err().contains("not negotiated"));
    }

    #[test]
    fn extensions_of_the_answer() {
        assert_eq!(negotiated_extensions(std::iter::empty()), Ok(None));
        assert_eq!(
            negotiated_extensions(
                ["permessage-deflate; server_max_window_bits=12; client_no_context_takeover"]
                    .into_iter()
            ),
            Ok(Some(Deflate {
                client_context_takeover: false,
                server_context_takeover: true
            }))
        );
        assert!(negotiated_extensions(["x-webkit-deflate-frame"].into_iter()).is_err());
        assert!(negotiated_extensions(
            [
                "permessage-deflate",
                "permessage-deflate; server_no_context_takeover"
            ]
            .into_iter()
        )
        .is_err());
    }

    /// A handler that keeps what it sees: drops messages starting with "drop", upper-cases
    /// those starting with "upper", keeps the rest.
    struct Judging {
        seen: std::sync::Mutex<Vec<WebSocketMessage>>,
    }

    fn answered<T>(value: T) -> Reply<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Ok(value));
        rx
    }

    impl ConnectionHandler for Judging {
        fn request(&self, _: RequestParts) -> mpsc::UnboundedReceiver<HandlerCommand> {
            mpsc::unbounded_channel().1
        }
        fn response(&self, r: ResponseParts) -> Reply<ResponseParts> {
            answered(r)
        }
        fn response_chunk(&self, c: Bytes) -> Reply<Option<Bytes>> {
            answered(Some(c))
        }
        fn response_complete(&self) -> Reply<()> {
            answered(())
        }
        fn error(&self, _: String) {}
        fn connect(&self, _: String, _: u16) -> Reply<ConnectDecision> {
            answered(ConnectDecision::Default)
        }
        fn tunnel_opened(&self, _: String, _: u16) {}
        fn tunnel_closed(&self, _: String, _: u16, _: u64, _: u64) {}
        fn closed(&self) {}
        fn websocket_message(&self, message: WebSocketMessage) -> Reply<MessageVerdict> {
            let verdict = if message.content.starts_with(b"drop") {
                MessageVerdict::Drop
            } else if message.content.starts_with(b"upper") {
                MessageVerdict::Replace(message.content.to_ascii_uppercase().into())
            } else {
                MessageVerdict::Keep
            };
            self.seen.lock().unwrap().push(message);
            answered(verdict)
        }
    }

    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Reads frames from `sock` until `n` arrived.
    async fn read_frames(
        sock: &mut tokio::net::TcpStream,
        buf: &mut BytesMut,
        from_client: bool,
        n: usize,
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        while frames.len() < n {
            match parse_frame(buf, from_client, true, 1 << 20).unwrap() {
                Some(f) => frames.push(f),
                None => {
                    let read = tokio::time::timeout(Duration::from_secs(10), sock.read_buf(buf));
                    assert!(read.await.unwrap().unwrap() > 0, "closed early");
                }
            }
        }
        frames
    }

    /// The relay over real sockets: fragments with a ping between them, a drop, a change,
    /// an injection, and compressed messages with context takeover before and after a drop.
    #[tokio::test]
    async fn messages_are_judged_and_compressed_ones_stay_readable() {
        let (mut client, proxy_client) = tcp_pair().await;
        let (proxy_origin, mut origin) = tcp_pair().await;
        let handler = Judging {
            seen: Default::default(),
        };
        let (to_client, to_client_queue) = mpsc::unbounded_channel();
        let (_to_server, to_server_queue) = mpsc::unbounded_channel();
        let waits = HookWaits::default();
        let hook = MessageHook {
            handler: &handler,
            waits: &waits,
            timeout: Duration::from_secs(10),
            epoch: Instant::now(),
            list_messages: true,
        };
        let (cr, cw) = proxy_client.into_split();
        let (or, ow) = proxy_origin.into_split();
        let none = || SegmentPolicy::none();
        let relay = relay(
            (cr, Segmented::new(cw, none(), None)),
            (or, Segmented::new(ow, none(), None)),
            Some(Deflate {
                client_context_takeover: true,
                server_context_takeover: true,
            }),
            &hook,
            (to_client_queue, to_server_queue),
            Duration::from_secs(30),
        );
        let phrase: &[u8] = b"words that repeat, words that repeat, words that repeat";
        let peers = async {
            // Client -> server: "hel" + ping + "lo" (fragments), then a drop and a change.
            let mut up = masked_frame(0x01, b"hel");
            let ping = masked_frame(0x89, b"p");
            up.extend(&ping);
            let last = masked_frame(0x80, b"lo");
            up.extend(&last);
            up.extend(masked_frame(0x81, b"drop this"));
            up.extend(masked_frame(0x81, b"upper me"));
            client.write_all(&up).await.unwrap();
            let mut buf = BytesMut::new();
            let got = read_frames(&mut origin, &mut buf, true, 4).await;
            // The ping went on before the message's frames, which went on as they came.
            assert_eq!(&got[0].raw[..], &ping[..]);
            assert_eq!(&got[1].raw[..], &masked_frame(0x01, b"hel")[..]);
            assert_eq!(&got[2].raw[..], &last[..]);
            assert_eq!((&got[3].payload[..], got[3].fin), (&b"UPPER ME"[..], true));

            // Server -> client, compressed with the context kept: a kept message goes on
            // compressed; after a dropped one, later ones go on inflated.
            let mut messages = [phrase.to_vec(), b"drop ".to_vec(), phrase.to_vec()];
            messages[1].extend_from_slice(phrase);
            let refs: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
            let compressed = compress_messages(&refs, true);
            let mut down = Vec::new();
            for c in &compressed {
                down.push(0xC1);
                down.push(c.len() as u8);
                down.extend_from_slice(c);
            }
            origin.write_all(&down).await.unwrap();
            to_client
                .send(InjectedMessage {
                    content: Bytes::from_static(b"injected"),
                    is_text: true,
                })
                .unwrap();
            let mut buf = BytesMut::new();
            let got = read_frames(&mut client, &mut buf, false, 3).await;
            let mut payloads: Vec<(bool, Vec<u8>)> =
                got.iter().map(|f| (f.rsv1, f.payload.to_vec())).collect();
            payloads.sort();
            let mut want = vec![
                (true, compressed[0].clone()),
                (false, phrase.to_vec()),
                (false, b"injected".to_vec()),
            ];
            want.sort();
            assert_eq!(payloads, want);
            drop(client);
            drop(origin);
        };
        let (relayed, ()) = tokio::join!(relay, peers);
        assert!(relayed.error.is_none(), "{:?}", relayed.error);
        let ups = relayed.messages.iter().filter(|m| m.direction == "up");
        assert_eq!(ups.map(|m| m.size).collect::<Vec<_>>(), vec![5, 8]);
        assert_eq!(relayed.messages.len(), 5);
        assert_eq!((relayed.messages_up, relayed.messages_down), (2, 3));
        let seen = handler.seen.lock().unwrap();
        assert_eq!(&seen[0].content[..], b"hello");
        assert!(seen
            .iter()
            .filter(|m| !m.from_client)
            .all(|m| m.content.ends_with(phrase)));
    }

    /// Messages compressed as a sender does (sync flush, tail removed), context kept.
    fn compress_messages(messages: &[&[u8]], takeover: bool) -> Vec<Vec<u8>> {
        let mut c = Compress::new(Compression::default(), false);
        messages
            .iter()
            .map(|m| {
                if !takeover {
                    c.reset();
                }
                let mut out = Vec::with_capacity(m.len() + 64);
                c.compress_vec(m, &mut out, FlushCompress::Sync).unwrap();
                assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
                out.truncate(out.len() - 4);
                out
            })
            .collect()
    }

    #[test]
    fn inflating_follows_the_senders_context() {
        let text: &[u8] = b"the same words again and again, the same words again and again";
        for takeover in [true, false] {
            let compressed = compress_messages(&[text, text, b"", text], takeover);
            let mut inflater = Inflater::new(takeover);
            for (c, want) in compressed.iter().zip([text, text, b"", text]) {
                assert_eq!(inflater.inflate(c, 1 << 20).unwrap(), want);
            }
            if takeover {
                // The second message refers to the first: a fresh context cannot read it.
                assert!(compressed[1].len() < compressed[0].len());
                let fresh = Inflater::new(true).inflate(&compressed[1], 1 << 20);
                assert_ne!(fresh.ok().as_deref(), Some(text));
            }
        }
        // A large message inflates whole; over the limit it is refused.
        let big = vec![b'a'; 3 << 20];
        let compressed = compress_messages(&[&big], false);
        assert_eq!(
            Inflater::new(false)
                .inflate(&compressed[0], 4 << 20)
                .unwrap(),
            big
        );
        assert!(Inflater::new(false)
            .inflate(&compressed[0], 1 << 20)
            .is_err());
        assert!(Inflater::new(false)
            .inflate(&[0xff, 0xff, 0xff], 100)
            .is_err());
    }
}
