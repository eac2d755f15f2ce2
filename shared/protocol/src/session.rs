//! Per-connection state machines for both ends. They take received bytes and the current time, return what the
//! caller must act on, and produce the bytes to send; they refuse to send what the state forbids (no emulator byte
//! before a client is authenticated).

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::frame::{encode_frame, FrameDecoder, Limits, HEADER_LEN};
use super::messages::{Chunk, EmulatorOffer, Hello, Message, Task, Update, UpdateAck, Welcome};
use super::secagg::SecAggMessage;
use super::ProtocolError;

/// What a server connection hands to its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerInput {
    /// The client introduced itself: check the token, then [`ServerConn::accept`] or [`ServerConn::reject`].
    Hello(Hello),
    /// Send the emulator from this chunk on.
    FetchEmulator {
        /// First chunk wanted.
        from_chunk: u32,
    },
    /// The client holds the emulator and takes tasks.
    Ready,
    /// A task's result.
    Update(Update),
    /// A secure-aggregation stage message (only the kinds a client sends).
    SecAgg(SecAggMessage),
    /// The client is leaving.
    Goodbye(String),
}

#[derive(Debug, Clone, PartialEq)]
enum ServerState {
    AwaitHello { deadline: Instant },
    Verifying,
    Authenticated { offer: EmulatorOffer },
    Ready,
    Closed,
}

impl ServerState {
    fn describe(&self) -> &'static str {
        match self {
            ServerState::AwaitHello { .. } => "awaiting hello",
            ServerState::Verifying => "verifying the token",
            ServerState::Authenticated { .. } => "authenticated, before ready",
            ServerState::Ready => "ready",
            ServerState::Closed => "closed",
        }
    }
}

/// Largest frame accepted from a peer that has not authenticated (a hello is a few hundred bytes).
pub const UNAUTHENTICATED_LIMIT: u32 = 64 * 1024;

/// The server's end of one client connection.
#[derive(Debug)]
pub struct ServerConn {
    decoder: FrameDecoder,
    limits: Limits,
    state: ServerState,
    hello_timeout: Duration,
}

impl ServerConn {
    /// A connection opened at `now`; the client must say hello within `hello_timeout`. Until it is authenticated
    /// its frames may not exceed [`UNAUTHENTICATED_LIMIT`]; then `limits` apply.
    pub fn new(limits: Limits, now: Instant, hello_timeout: Duration) -> Self {
        ServerConn {
            decoder: FrameDecoder::new(Limits {
                max_frame: UNAUTHENTICATED_LIMIT.min(limits.max_frame),
            }),
            limits,
            state: ServerState::AwaitHello {
                deadline: now + hello_timeout,
            },
            hello_timeout,
        }
    }

    /// Whether the client has been authenticated.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, ServerState::Authenticated { .. } | ServerState::Ready)
    }

    /// The declared payload length of a frame under way (header in, payload not complete): an update's size is
    /// known before its body is read, so the caller can wait for room to hold it first.
    pub fn incoming_len(&self) -> Option<u32> {
        self.decoder.incoming_len()
    }

    /// Feeds received bytes; returns the messages the caller must act on, or the protocol error that ends the
    /// connection.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<Vec<ServerInput>, ProtocolError> {
        if let Some(e) = self.timeout(now) {
            return Err(e);
        }
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(msg) = self.decoder.next_message()? {
            let unexpected = ProtocolError::Unexpected {
                got: msg.kind(),
                state: self.state.describe(),
            };
            let input = match (&self.state, msg) {
                (ServerState::Closed, _) => continue,
                (_, Message::Goodbye { reason }) => {
                    self.state = ServerState::Closed;
                    ServerInput::Goodbye(reason)
                }
                (ServerState::AwaitHello { .. }, Message::Hello(h)) => {
                    self.state = ServerState::Verifying;
                    ServerInput::Hello(h)
                }
                (ServerState::Authenticated { offer }, Message::FetchEmulator { sha256, from_chunk }) => {
                    if sha256 != offer.sha256 || from_chunk > offer.chunks() {
                        return Err(ProtocolError::Malformed(format!(
                            "fetch of emulator {sha256} from chunk {from_chunk}: the offer is {} in {} chunks",
                            offer.sha256,
                            offer.chunks()
                        )));
                    }
                    ServerInput::FetchEmulator { from_chunk }
                }
                (ServerState::Authenticated { .. }, Message::Ready) => {
                    self.state = ServerState::Ready;
                    ServerInput::Ready
                }
                (ServerState::Ready, Message::Update(u)) => ServerInput::Update(u),
                (ServerState::Ready, Message::SecAgg(m)) if m.from_client() => ServerInput::SecAgg(m),
                _ => return Err(unexpected),
            };
            out.push(input);
        }
        Ok(out)
    }

    /// Called when the peer's stream ends.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        self.decoder.finish()
    }

    /// The error ending a connection that has not said hello by its deadline.
    pub fn timeout(&self, now: Instant) -> Option<ProtocolError> {
        match self.state {
            ServerState::AwaitHello { deadline } if now >= deadline => {
                Some(ProtocolError::HelloTimeout(self.hello_timeout))
            }
            _ => None,
        }
    }

    /// The token was good: welcome the client and offer the emulator.
    pub fn accept(&mut self, mut welcome: Welcome) -> Result<Vec<u8>, ProtocolError> {
        if self.state != ServerState::Verifying {
            return Err(ProtocolError::Forbidden {
                what: "welcome",
                reason: "no hello is being verified",
            });
        }
        self.state = ServerState::Authenticated {
            offer: welcome.emulator.clone(),
        };
        self.decoder.set_limits(self.limits);
        welcome.max_update_bytes = self.limits.max_frame;
        Ok(encode_frame(&Message::Welcome(welcome)))
    }

    /// Refuses the client (bad token, protocol error); the connection is closed.
    pub fn reject(&mut self, reason: &str) -> Vec<u8> {
        self.state = ServerState::Closed;
        encode_frame(&Message::Reject { reason: reason.into() })
    }

    /// One chunk of the emulator; only to an authenticated client.
    pub fn chunk(&self, index: u32, data: Vec<u8>) -> Result<Vec<u8>, ProtocolError> {
        if !self.is_authenticated() {
            return Err(ProtocolError::Forbidden {
                what: "emulator chunk",
                reason: "the client is not authenticated",
            });
        }
        let sha256 = Sha256::digest(&data).into();
        Ok(encode_frame(&Message::Chunk(Chunk { index, sha256, data })))
    }

    /// A training task; only to a ready client.
    pub fn task(&self, task: &Task) -> Result<Vec<u8>, ProtocolError> {
        if self.state != ServerState::Ready {
            return Err(ProtocolError::Forbidden {
                what: "task",
                reason: "the client is not ready",
            });
        }
        Ok(encode_frame(&Message::Task(task.clone())))
    }

    /// A secure-aggregation stage message; only the kinds a server sends, only to a ready client.
    pub fn secagg(&self, msg: &SecAggMessage) -> Result<Vec<u8>, ProtocolError> {
        if self.state != ServerState::Ready || !msg.from_server() {
            return Err(ProtocolError::Forbidden {
                what: msg.kind(),
                reason: "a server sends it only to a ready client",
            });
        }
        Ok(encode_frame(&Message::SecAgg(msg.clone())))
    }

    /// The verdict on an update.
    pub fn ack(&self, ack: UpdateAck) -> Vec<u8> {
        encode_frame(&Message::UpdateAck(ack))
    }

    /// Closes the connection with a reason.
    pub fn goodbye(&mut self, reason: &str) -> Vec<u8> {
        self.state = ServerState::Closed;
        encode_frame(&Message::Goodbye { reason: reason.into() })
    }
}

/// What a client connection hands to its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Authenticated; the emulator on offer.
    Welcome(Welcome),
    /// The server refused; the connection is over.
    Rejected(String),
    /// A verified chunk of the emulator (its SHA-256 and length checked, in order).
    Chunk(Chunk),
    /// Train a round.
    Task(Task),
    /// The verdict on an update.
    Ack(UpdateAck),
    /// A secure-aggregation stage message (only the kinds a server sends).
    SecAgg(SecAggMessage),
    /// The server is closing.
    Goodbye(String),
}

#[derive(Debug, Clone, PartialEq)]
enum ClientState {
    AwaitWelcome,
    Authenticated { offer: EmulatorOffer, next: Option<u32> },
    Ready,
    Closed,
}

impl ClientState {
    fn describe(&self) -> &'static str {
        match self {
            ClientState::AwaitWelcome => "awaiting welcome",
            ClientState::Authenticated { .. } => "downloading the emulator",
            ClientState::Ready => "ready",
            ClientState::Closed => "closed",
        }
    }
}

/// The client's end of its connection.
#[derive(Debug)]
pub struct ClientConn {
    decoder: FrameDecoder,
    state: ClientState,
    /// The largest update the server takes (from its welcome).
    max_update: u32,
}

impl ClientConn {
    /// A new connection and the hello to send first.
    pub fn new(limits: Limits, hello: Hello) -> (Self, Vec<u8>) {
        let conn = ClientConn {
            decoder: FrameDecoder::new(limits),
            state: ClientState::AwaitWelcome,
            max_update: 0,
        };
        (conn, encode_frame(&Message::Hello(hello)))
    }

    /// Feeds received bytes.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<ClientEvent>, ProtocolError> {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(msg) = self.decoder.next_message()? {
            let unexpected = ProtocolError::Unexpected {
                got: msg.kind(),
                state: self.state.describe(),
            };
            let event = match (&mut self.state, msg) {
                (ClientState::Closed, _) => continue,
                (_, Message::Reject { reason }) => {
                    self.state = ClientState::Closed;
                    ClientEvent::Rejected(reason)
                }
                (_, Message::Goodbye { reason }) => {
                    self.state = ClientState::Closed;
                    ClientEvent::Goodbye(reason)
                }
                (ClientState::AwaitWelcome, Message::Welcome(w)) => {
                    // The client names its cache files after this hash: 64 hex digits, nothing else (no path).
                    let sha = &w.emulator.sha256;
                    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(ProtocolError::Malformed(format!(
                            "the offered emulator's SHA-256 `{}` is not 64 hex digits",
                            sha.escape_debug()
                        )));
                    }
                    if w.emulator.chunk_size == 0 && w.emulator.size > 0 {
                        return Err(ProtocolError::Malformed(
                            "the emulator is offered in chunks of 0 bytes".into(),
                        ));
                    }
                    self.state = ClientState::Authenticated {
                        offer: w.emulator.clone(),
                        next: None,
                    };
                    self.max_update = w.max_update_bytes;
                    ClientEvent::Welcome(w)
                }
                (
                    ClientState::Authenticated {
                        offer,
                        next: Some(next),
                    },
                    Message::Chunk(c),
                ) => {
                    if c.index != *next || c.data.len() != offer.chunk_len(c.index) {
                        return Err(ProtocolError::Malformed(format!(
                            "chunk {} of {} bytes, expected chunk {next} of {} bytes",
                            c.index,
                            c.data.len(),
                            offer.chunk_len(*next)
                        )));
                    }
                    if <[u8; 32]>::from(Sha256::digest(&c.data)) != c.sha256 {
                        return Err(ProtocolError::ChunkHash { index: c.index });
                    }
                    *next += 1;
                    ClientEvent::Chunk(c)
                }
                (ClientState::Ready, Message::Task(t)) => ClientEvent::Task(t),
                (ClientState::Ready, Message::UpdateAck(a)) => ClientEvent::Ack(a),
                (ClientState::Ready, Message::SecAgg(m)) if m.from_server() => ClientEvent::SecAgg(m),
                _ => return Err(unexpected),
            };
            out.push(event);
        }
        Ok(out)
    }

    /// Called when the server's stream ends.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        self.decoder.finish()
    }

    /// Asks for the emulator from `from_chunk` on (0, or where an interrupted download stopped).
    pub fn fetch(&mut self, from_chunk: u32) -> Result<Vec<u8>, ProtocolError> {
        let ClientState::Authenticated { offer, next } = &mut self.state else {
            return Err(ProtocolError::Forbidden {
                what: "fetch",
                reason: "not authenticated",
            });
        };
        *next = Some(from_chunk);
        Ok(encode_frame(&Message::FetchEmulator {
            sha256: offer.sha256.clone(),
            from_chunk,
        }))
    }

    /// Tells the server the emulator is here.
    pub fn ready(&mut self) -> Result<Vec<u8>, ProtocolError> {
        if !matches!(self.state, ClientState::Authenticated { .. }) {
            return Err(ProtocolError::Forbidden {
                what: "ready",
                reason: "not authenticated",
            });
        }
        self.state = ClientState::Ready;
        Ok(encode_frame(&Message::Ready))
    }

    /// Sends a task's result; an update larger than the server takes (its welcome said how much) is
    /// [`ProtocolError::UpdateTooLarge`] instead.
    pub fn update(&self, update: &Update) -> Result<Vec<u8>, ProtocolError> {
        if self.state != ClientState::Ready {
            return Err(ProtocolError::Forbidden {
                what: "update",
                reason: "not ready",
            });
        }
        self.sized(encode_frame(&Message::Update(update.clone())))
    }

    /// Sends a secure-aggregation stage message (only the kinds a client sends); a masked update larger than the
    /// server takes is [`ProtocolError::UpdateTooLarge`], as a plain one.
    pub fn secagg(&self, msg: &SecAggMessage) -> Result<Vec<u8>, ProtocolError> {
        if self.state != ClientState::Ready || !msg.from_client() {
            return Err(ProtocolError::Forbidden {
                what: msg.kind(),
                reason: "a client sends it only when ready",
            });
        }
        self.sized(encode_frame(&Message::SecAgg(msg.clone())))
    }

    fn sized(&self, frame: Vec<u8>) -> Result<Vec<u8>, ProtocolError> {
        let len = (frame.len() - HEADER_LEN) as u64;
        if len > u64::from(self.max_update) {
            return Err(ProtocolError::UpdateTooLarge {
                len,
                limit: self.max_update.into(),
            });
        }
        Ok(frame)
    }

    /// Leaves.
    pub fn goodbye(&mut self, reason: &str) -> Vec<u8> {
        self.state = ClientState::Closed;
        encode_frame(&Message::Goodbye { reason: reason.into() })
    }
}

#[cfg(test)]
mod tests;
