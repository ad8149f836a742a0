//! Follows MQTT framing in one direction of a connection, for the proxy's checks.
//!
//! It reads each fixed header and only the variable-header bytes a check needs (the
//! PUBLISH topic length and packet id, the packet id that opens PUBACK, PUBREC, PUBREL
//! and PUBCOMP, the CONNECT protocol level), and skips the rest of a packet in one
//! step: no payload byte is copied and nothing is allocated, so a proxy relaying
//! 32 KiB payloads pays per packet, not per byte. The state is kept across chunks, so
//! a packet may be split anywhere. MQTT 5 adds properties after the packet ids and a
//! reason code after an ack's id, so the same prefix reads serve 3.1.1 and 5.

/// The first byte of an MQTT SUBSCRIBE packet (type 8, flags 0b0010).
const SUBSCRIBE: u8 = 0x82;

/// A packet, as far as the checker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Frame {
    Connect {
        level: u8,
    },
    /// `id` is 0 for QoS 0.
    Publish {
        qos: u8,
        id: u16,
    },
    Ack {
        kind: Ack,
        id: u16,
    },
    Subscribe,
    /// The framing broke (a remaining length over four bytes, or QoS 3); the scanner
    /// stops for this direction.
    Malformed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ack {
    Puback,
    Pubrec,
    Pubrel,
    Pubcomp,
}

/// A variable-header field being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// PUBLISH topic length, then the topic is skipped.
    TopicLen,
    /// PUBLISH packet id (QoS > 0). MQTT 5 puts properties after it: same prefix.
    PublishId,
    /// The packet id that starts PUBACK/PUBREC/PUBREL/PUBCOMP in both versions.
    AckId,
    /// CONNECT protocol-name length, then the name is skipped.
    NameLen,
    /// CONNECT protocol level.
    Level,
    /// Nothing more is needed from this packet.
    Rest,
}

/// Where the scanner is in the byte stream of one direction.
#[derive(Clone, Copy, Debug)]
enum State {
    /// At the first byte of a packet.
    Header,
    /// Inside the variable-length "remaining length".
    Length { value: usize, shift: u32 },
    /// Reading a big-endian integer of `need` more bytes.
    Int { value: u16, need: u8, field: Field },
    /// Skipping `bytes` body bytes, then reading `then`.
    Skip { bytes: usize, then: Field },
    /// The framing was lost; everything else is ignored.
    Lost,
}

/// Follows MQTT framing in one direction, across chunks.
pub(super) struct Scanner {
    state: State,
    /// The current packet's first byte.
    header: u8,
    /// Body bytes of the current packet not yet consumed.
    left: usize,
}

impl Scanner {
    pub(super) fn new() -> Scanner {
        Scanner {
            state: State::Header,
            header: 0,
            left: 0,
        }
    }

    /// Feeds `chunk`, calling `on(offset, frame)` for each packet of interest as soon
    /// as the fields it needs are read (`offset` is where the packet starts if it
    /// starts in this chunk, else 0).
    pub(super) fn scan(&mut self, chunk: &[u8], mut on: impl FnMut(usize, Frame)) {
        let mut start = 0;
        let mut i = 0;
        while i < chunk.len() {
            match self.state {
                State::Lost => return,
                State::Header => {
                    start = i;
                    self.header = chunk[i];
                    if self.header == SUBSCRIBE {
                        on(start, Frame::Subscribe);
                    }
                    self.state = State::Length { value: 0, shift: 0 };
                    i += 1;
                }
                State::Length { value, shift } => {
                    let byte = chunk[i];
                    i += 1;
                    let value = value | (usize::from(byte & 0x7f) << shift);
                    if byte & 0x80 == 0 {
                        self.left = value;
                        self.begin_body(start, &mut on);
                    } else if shift >= 21 {
                        self.state = State::Lost;
                        on(start, Frame::Malformed);
                    } else {
                        self.state = State::Length {
                            value,
                            shift: shift + 7,
                        };
                    }
                }
                State::Int { value, need, field } => {
                    let value = (value << 8) | u16::from(chunk[i]);
                    i += 1;
                    self.left -= 1;
                    if need > 1 {
                        self.state = State::Int {
                            value,
                            need: need - 1,
                            field,
                        };
                    } else {
                        self.field_read(field, value, start, &mut on);
                    }
                }
                State::Skip { bytes, then } => {
                    let take = bytes.min(chunk.len() - i);
                    i += take;
                    self.left -= take;
                    if take < bytes {
                        self.state = State::Skip {
                            bytes: bytes - take,
                            then,
                        };
                    } else {
                        self.read(then);
                    }
                }
            }
            if self.left == 0 && !matches!(self.state, State::Length { .. } | State::Lost) {
                // The packet ended, with or without the fields it should have had.
                self.state = State::Header;
            }
        }
    }

    /// The remaining length is known: decide what to read from the body.
    fn begin_body(&mut self, start: usize, on: &mut impl FnMut(usize, Frame)) {
        let field = match self.header >> 4 {
            1 => Field::NameLen,
            3 => match (self.header >> 1) & 0b11 {
                0 => {
                    on(start, Frame::Publish { qos: 0, id: 0 });
                    Field::Rest
                }
                3 => {
                    self.state = State::Lost;
                    on(start, Frame::Malformed);
                    return;
                }
                _ => Field::TopicLen,
            },
            4..=7 => Field::AckId,
            _ => Field::Rest,
        };
        self.read(field);
    }

    /// Starts reading `field` (or skipping to the packet's end).
    fn read(&mut self, field: Field) {
        self.state = match field {
            Field::Rest => State::Skip {
                bytes: self.left,
                then: Field::Rest,
            },
            Field::Level => State::Int {
                value: 0,
                need: 1,
                field,
            },
            Field::TopicLen | Field::PublishId | Field::AckId | Field::NameLen => State::Int {
                value: 0,
                need: 2,
                field,
            },
        };
        if self.left == 0 {
            self.state = State::Header;
        }
    }

    fn field_read(
        &mut self,
        field: Field,
        value: u16,
        start: usize,
        on: &mut impl FnMut(usize, Frame),
    ) {
        match field {
            Field::TopicLen => {
                self.state = State::Skip {
                    bytes: usize::from(value).min(self.left),
                    then: Field::PublishId,
                };
                return;
            }
            Field::NameLen => {
                self.state = State::Skip {
                    bytes: usize::from(value).min(self.left),
                    then: Field::Level,
                };
                return;
            }
            Field::PublishId => on(
                start,
                Frame::Publish {
                    qos: (self.header >> 1) & 0b11,
                    id: value,
                },
            ),
            Field::AckId => {
                let kind = match self.header >> 4 {
                    4 => Ack::Puback,
                    5 => Ack::Pubrec,
                    6 => Ack::Pubrel,
                    _ => Ack::Pubcomp,
                };
                on(start, Frame::Ack { kind, id: value });
            }
            Field::Level => on(
                start,
                Frame::Connect {
                    level: u8::try_from(value).unwrap_or(u8::MAX),
                },
            ),
            Field::Rest => {}
        }
        self.read(Field::Rest);
    }
}
