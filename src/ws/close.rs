//! WebSocket close codes the server uses (contract §6), as plain data: each
//! code with its close-frame reason and its metrics label, so adding a code
//! means saying all three.

/// A close code the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: the client asked, or the session ended normally.
    Normal = 1000,
    /// 1001: the server is shutting down; reconnect, possibly to another node.
    GoingAway = 1001,
    /// 1002: the client broke the WebSocket protocol.
    ProtocolError = 1002,
    /// 1007: a text message, or a close reason, that is not UTF-8.
    InvalidUtf8 = 1007,
    /// 1009: a client message over the limit.
    TooBig = 1009,
    /// 4001: nothing heard from the client within the idle timeout.
    HeartbeatTimeout = 4001,
    /// 4004: the instance was deleted.
    InstanceDeleted = 4004,
    /// 4008: the client fell behind its buffer bounds.
    SlowConsumer = 4008,
}

impl CloseCode {
    /// Every code, for tests and metrics.
    pub const ALL: [CloseCode; 8] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidUtf8,
        CloseCode::TooBig,
        CloseCode::HeartbeatTimeout,
        CloseCode::InstanceDeleted,
        CloseCode::SlowConsumer,
    ];

    /// The number sent in the close frame.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code with this number, if the server uses it.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The close frame's reason text.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "server shutting down",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidUtf8 => "invalid utf-8",
            CloseCode::TooBig => "message too big",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::InstanceDeleted => "instance deleted",
            CloseCode::SlowConsumer => "slow consumer",
        }
    }

    /// A metrics label without spaces.
    pub fn label(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "shutdown",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::InvalidUtf8 => "invalid_utf8",
            CloseCode::TooBig => "too_big",
            CloseCode::HeartbeatTimeout => "heartbeat",
            CloseCode::InstanceDeleted => "instance_deleted",
            CloseCode::SlowConsumer => "slow_consumer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
        assert_eq!(CloseCode::SlowConsumer.code(), 4008);
        assert_eq!(CloseCode::from_code(0), None);
    }
}
