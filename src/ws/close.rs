//! WebSocket close codes the server uses (contract §6), as plain data.

/// A close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const INVALID_UTF8: CloseCode = CloseCode(1007);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4001);
    pub const INSTANCE_DELETED: CloseCode = CloseCode(4004);
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4008);

    /// The close frame's reason text, and the metrics label.
    pub fn reason(self) -> &'static str {
        match self.0 {
            1000 => "normal",
            1001 => "server shutting down",
            1002 => "protocol error",
            1007 => "invalid utf-8",
            1009 => "message too big",
            4001 => "heartbeat timeout",
            4004 => "instance deleted",
            4008 => "slow consumer",
            _ => "closed",
        }
    }

    /// A metrics label without spaces.
    pub fn label(self) -> &'static str {
        match self.0 {
            1000 => "normal",
            1001 => "shutdown",
            1002 => "protocol_error",
            1007 => "invalid_utf8",
            1009 => "too_big",
            4001 => "heartbeat",
            4004 => "instance_deleted",
            4008 => "slow_consumer",
            _ => "other",
        }
    }
}
