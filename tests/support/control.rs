//! Client of the backend's control socket (JSON lines, protocol.md section 6).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{invalid, retry, Error, Result};

/// One connection to the control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl ControlClient {
    /// Connect (retrying for up to 5 s), with a 15 s read timeout.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect_timeout(path, Duration::from_secs(5), Duration::from_secs(15))
    }

    /// Connect, retrying for `connect_timeout`; replies must arrive within
    /// `read_timeout`.
    pub fn connect_timeout(
        path: impl AsRef<Path>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Self> {
        let path = path.as_ref();
        let s = retry(
            connect_timeout,
            &format!("connect to control socket {}", path.display()),
            || UnixStream::connect(path),
        )?;
        s.set_read_timeout(Some(read_timeout))?;
        let writer = s.try_clone()?;
        Ok(ControlClient {
            reader: BufReader::new(s),
            writer,
            line: String::new(),
        })
    }

    /// Change the reply timeout.
    pub fn set_read_timeout(&mut self, t: Duration) -> Result<()> {
        self.writer.set_read_timeout(Some(t))?;
        Ok(())
    }

    /// Send one raw line (a newline is appended) without reading a reply.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.writer.write_all(&buf)?;
        Ok(())
    }

    /// Read one reply line and parse it as JSON.
    pub fn read_reply(&mut self) -> Result<Value> {
        self.line.clear();
        let n = match self.reader.read_line(&mut self.line) {
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(Error::Timeout("no reply on the control socket".into()))
            }
            Err(e) => return Err(Error::Io(e)),
        };
        if n == 0 {
            return invalid("control socket closed by the backend");
        }
        serde_json::from_str(self.line.trim_end())
            .or_else(|e| invalid(format!("control reply {:?} is not JSON: {e}", self.line)))
    }

    /// Send one request object and read its reply.
    pub fn request(&mut self, req: &Value) -> Result<Value> {
        self.send_line(&req.to_string())?;
        self.read_reply()
    }

    /// `{"op":"dma",...}`; `pasid` and `timeout_ms` are added when `Some`.
    pub fn dma(
        &mut self,
        endpoint: u32,
        iova: u64,
        len: u64,
        write: bool,
        pasid: Option<u32>,
        timeout_ms: Option<u64>,
    ) -> Result<Value> {
        let mut req =
            json!({"op": "dma", "endpoint": endpoint, "iova": iova, "len": len, "write": write});
        if let Some(p) = pasid {
            req["pasid"] = json!(p);
        }
        if let Some(t) = timeout_ms {
            req["timeout_ms"] = json!(t);
        }
        self.request(&req)
    }

    /// `{"op":"stats"}`.
    pub fn stats(&mut self) -> Result<Value> {
        self.request(&json!({"op": "stats"}))
    }
}

/// A successful DMA reply's ranges as `(iova, gpa, len)`; an error
/// describing the reply otherwise.
pub fn dma_ranges(reply: &Value) -> Result<Vec<(u64, u64, u64)>> {
    if reply["ok"] != json!(true) {
        return invalid(format!("DMA failed: {reply}"));
    }
    let ranges = match reply["ranges"].as_array() {
        Some(r) => r,
        None => return invalid(format!("DMA reply without ranges: {reply}")),
    };
    ranges
        .iter()
        .map(
            |r| match (r["iova"].as_u64(), r["gpa"].as_u64(), r["len"].as_u64()) {
                (Some(i), Some(g), Some(l)) => Ok((i, g, l)),
                _ => invalid(format!("malformed range {r} in {reply}")),
            },
        )
        .collect()
}

/// The `error` kind of a failed reply (`None` if it succeeded).
pub fn error_kind(reply: &Value) -> Option<&str> {
    if reply["ok"] == json!(true) {
        None
    } else {
        reply["error"].as_str()
    }
}
