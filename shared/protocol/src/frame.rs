//! Length-prefixed frames: `MAGIC` (4 bytes), protocol version (u16 LE), reserved (u16, zero), payload length
//! (u32 LE), then the bincode payload. Every length is checked against a limit before anything is allocated.

use super::{Message, ProtocolError, PROTOCOL_VERSION};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"OFST";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 12;

/// Size limits for what one side accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes.
    pub max_frame: u32,
}

impl Limits {
    /// What a server accepts from clients: updates of up to `max_update` bytes.
    pub fn server(max_update: u32) -> Self {
        Limits { max_frame: max_update }
    }
}

impl Default for Limits {
    /// 512 MiB: a full-layer adapter of a 1B-class model in f32.
    fn default() -> Self {
        Limits { max_frame: 512 << 20 }
    }
}

fn config() -> bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Fixint> {
    bincode::config::standard().with_fixed_int_encoding()
}

/// Decodes a payload with an allocation limit sized to it: bincode may claim at most a few times the payload's own
/// length (decoded types take more room than their bytes on the wire), so a 64 KiB hello declaring a 1 GiB string
/// is refused before anything is allocated.
fn decode_payload(payload: &[u8]) -> Result<(Message, usize), bincode::error::DecodeError> {
    let c = config();
    match payload.len() {
        n if n <= 64 << 10 => bincode::decode_from_slice(payload, c.with_limit::<{ 256 << 10 }>()),
        n if n <= 16 << 20 => bincode::decode_from_slice(payload, c.with_limit::<{ 64 << 20 }>()),
        n if n <= 256 << 20 => bincode::decode_from_slice(payload, c.with_limit::<{ 1 << 30 }>()),
        _ => bincode::decode_from_slice(payload, c.with_limit::<{ u32::MAX as usize * 4 }>()),
    }
}

/// Encodes one message as a frame.
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    let payload = bincode::encode_to_vec(msg, config()).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reassembles frames from a byte stream delivered in arbitrary pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received bytes; those before `start` are decoded already.
    buf: Vec<u8>,
    /// Where the unread bytes begin: consumed frames are skipped, not shifted out one by one (a read full of small
    /// frames would shift the rest of the buffer once per frame), and dropped at the next `push`.
    start: usize,
    limits: Limits,
}

impl FrameDecoder {
    /// A decoder accepting frames within `limits`.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            limits,
        }
    }

    /// Changes the largest payload accepted from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `None` when more bytes are needed. A bad header is reported as soon as its 12
    /// bytes are in, before the payload arrives.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        let buf = &self.buf[self.start..];
        if buf.len() < HEADER_LEN {
            if buf.len() >= 4 && buf[..4] != MAGIC {
                return Err(ProtocolError::BadMagic(buf[..4].try_into().unwrap_or_default()));
            }
            return Ok(None);
        }
        let magic: [u8; 4] = [buf[0], buf[1], buf[2], buf[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { got: version });
        }
        let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len > self.limits.max_frame {
            return Err(ProtocolError::Oversized {
                len: len as u64,
                limit: self.limits.max_frame as u64,
            });
        }
        let end = HEADER_LEN + len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let decoded = decode_payload(&buf[HEADER_LEN..end]);
        self.start += end;
        match decoded {
            Ok((msg, used)) if used == len as usize => Ok(Some(msg)),
            Ok((_, used)) => Err(ProtocolError::Malformed(format!(
                "{} trailing bytes after the message",
                len as usize - used
            ))),
            Err(e) => Err(ProtocolError::Malformed(e.to_string())),
        }
    }

    /// The payload length of a frame whose header is in but whose payload is not yet complete, so the caller can
    /// make room for it (or wait) before reading its body.
    pub fn incoming_len(&self) -> Option<u32> {
        let buf = &self.buf[self.start..];
        let len = u32::from_le_bytes(buf.get(8..HEADER_LEN)?.try_into().ok()?);
        (buf.len() < HEADER_LEN + len as usize).then_some(len)
    }

    /// Called when the stream ends: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        let buf = &self.buf[self.start..];
        if buf.is_empty() {
            return Ok(());
        }
        let expected = if buf.len() >= HEADER_LEN {
            HEADER_LEN + u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize
        } else {
            HEADER_LEN
        };
        Err(ProtocolError::Truncated {
            got: buf.len(),
            expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Goodbye { reason: "done".into() }
    }

    /// A frame around a hand-made payload.
    fn frame_of(payload: &[u8]) -> Vec<u8> {
        let mut frame = MAGIC.to_vec();
        frame.extend(PROTOCOL_VERSION.to_le_bytes());
        frame.extend(0u16.to_le_bytes());
        frame.extend((payload.len() as u32).to_le_bytes());
        frame.extend(payload);
        frame
    }

    #[test]
    fn a_small_frame_declaring_a_huge_string_is_refused_without_allocating_it() {
        // A hello (variant 0) whose client name claims 1 GiB, in a 20-byte payload.
        let mut payload = 0u32.to_le_bytes().to_vec();
        payload.extend((1u64 << 30).to_le_bytes());
        payload.extend(b"aaaaaaaa");
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&frame_of(&payload));
        let e = d.next_message().unwrap_err().to_string();
        assert!(e.contains("LimitExceeded"), "{e}");
    }

    #[test]
    fn a_frame_under_way_tells_its_length_from_its_header_on() {
        let first = encode_frame(&hello());
        let payload = (first.len() - HEADER_LEN) as u32;
        let mut bytes = first.clone();
        bytes.extend(encode_frame(&Message::Ready));
        for cut in 0..=first.len() {
            let mut d = FrameDecoder::new(Limits::default());
            d.push(&bytes[..cut]);
            let want = (HEADER_LEN..first.len()).contains(&cut).then_some(payload);
            assert_eq!(d.incoming_len(), want, "cut at {cut}");
        }
        // Once the first frame is read, the second (complete) one is not under way.
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&bytes);
        d.next_message().unwrap();
        assert_eq!(d.incoming_len(), None);
    }

    #[test]
    fn frames_split_anywhere_decode_in_order() {
        let mut bytes = encode_frame(&hello());
        bytes.extend(encode_frame(&Message::Ready));
        for cut in 0..bytes.len() {
            let mut d = FrameDecoder::new(Limits::default());
            let mut got = Vec::new();
            for piece in [&bytes[..cut], &bytes[cut..]] {
                d.push(piece);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![hello(), Message::Ready], "cut at {cut}");
            d.finish().unwrap();
        }
    }

    #[test]
    fn a_read_full_of_small_frames_decodes_every_one_and_keeps_only_the_tail() {
        let frame = encode_frame(&Message::Ready);
        let mut bytes: Vec<u8> = frame.repeat(10_000);
        bytes.extend(&frame[..5]);
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&bytes);
        let mut n = 0;
        while let Some(m) = d.next_message().unwrap() {
            assert_eq!(m, Message::Ready);
            n += 1;
        }
        assert_eq!(n, 10_000);
        assert!(d.finish().is_err(), "five bytes of a frame are left");
        d.push(&frame[5..]);
        assert_eq!(d.buf.len(), frame.len(), "consumed frames are dropped at the next push");
        assert_eq!(d.next_message().unwrap(), Some(Message::Ready));
        d.finish().unwrap();
    }

    #[test]
    fn truncated_oversized_garbage_and_wrong_version_are_errors() {
        let bytes = encode_frame(&hello());
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_message().unwrap(), None);
        assert!(matches!(d.finish(), Err(ProtocolError::Truncated { .. })));

        let mut d = FrameDecoder::new(Limits { max_frame: 4 });
        d.push(&bytes);
        assert!(matches!(
            d.next_message(),
            Err(ProtocolError::Oversized { limit: 4, .. })
        ));

        let mut d = FrameDecoder::new(Limits::default());
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_message(), Err(ProtocolError::BadMagic(_))));

        let mut wrong = bytes.clone();
        wrong[4] = 9;
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&wrong);
        assert_eq!(d.next_message(), Err(ProtocolError::Version { got: 9 }));

        // A valid header around a payload that is not a message.
        let mut junk = bytes[..HEADER_LEN].to_vec();
        junk[8..12].copy_from_slice(&5u32.to_le_bytes());
        junk.extend_from_slice(&[0xff; 5]);
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&junk);
        assert!(matches!(d.next_message(), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn a_huge_declared_vector_length_is_refused_without_allocating() {
        // Goodbye's string length claims 2^62 bytes inside a 16-byte payload.
        let mut payload = Vec::new();
        let tag = bincode::encode_to_vec(hello(), config()).unwrap()[..4].to_vec();
        payload.extend_from_slice(&tag);
        payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
        payload.extend_from_slice(&[b'x'; 4]);
        let mut d = FrameDecoder::new(Limits::default());
        d.push(&frame_of(&payload));
        assert!(matches!(d.next_message(), Err(ProtocolError::Malformed(_))));
    }
}
