//! What both services' HTTP servers share.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};

/// The next connection. Errors (out of file descriptors and the like) back off briefly
/// instead of spinning; the server keeps serving the connections it has.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The `Content-Type` of `GET /metrics` (OpenMetrics text, which Prometheus reads).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` in the Prometheus text format.
pub fn encode_metrics(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)?;
    Ok(body)
}

/// Looks for the blank line that ends a request head as bytes arrive, each byte once: a head
/// sent a byte per segment costs linear work, not a rescan of everything per read.
#[derive(Default)]
pub struct HeadEnd {
    /// Bytes of the head already looked at.
    scanned: usize,
    /// Bytes examined in all (the test's measure of the work).
    pub examined: usize,
}

impl HeadEnd {
    /// Whether `head` (the same buffer, grown since the last call) holds `\r\n\r\n`.
    pub fn found(&mut self, head: &[u8]) -> bool {
        // A terminator may straddle the old end: look back three bytes.
        let from = self.scanned.saturating_sub(3);
        let new = &head[from.min(head.len())..];
        self.examined += new.len();
        self.scanned = head.len();
        // `\n\r\n` ends `\r\n\r\n` too; httparse (and hyper) also take bare line feeds.
        new.windows(2).any(|w| w == b"\n\n") || new.windows(3).any(|w| w == b"\n\r\n")
    }
}

/// A stream that first yields bytes already read from it (the request head the native path
/// looked at), then reads on.
pub struct Prefixed {
    /// `None` once read, which frees the head's buffer: an upgraded WebSocket keeps this stream
    /// for its lifetime.
    prefix: Option<Bytes>,
    inner: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Bytes, inner: TcpStream) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(prefix) = &mut this.prefix {
            let n = prefix.len().min(buf.remaining());
            buf.put_slice(&prefix[..n]);
            prefix.advance(n);
            if prefix.is_empty() {
                this.prefix = None;
            }
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The head read by the native path comes first, then the socket; once read, its buffer
    /// is released (a WebSocket would otherwise keep it for its lifetime).
    #[tokio::test]
    async fn a_prefixed_stream_reads_the_head_then_the_socket_and_frees_the_head() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(b" world").await.expect("write");
        let mut prefixed = Prefixed::new(Bytes::from_static(b"hello"), server);
        let mut first = [0u8; 3];
        prefixed.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"hel");
        assert!(
            prefixed.prefix.is_some(),
            "part of the head is still unread"
        );
        let mut rest = [0u8; 8];
        prefixed.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"lo world");
        assert!(prefixed.prefix.is_none(), "the head's buffer is still held");
        assert!(Prefixed::new(Bytes::new(), client).prefix.is_none());
    }

    #[test]
    fn a_head_sent_byte_by_byte_is_scanned_in_linear_time() {
        let max = 16 * 1024;
        let mut head = b"GET /v1/events?channel=a HTTP/1.1\r\n".to_vec();
        while head.len() < max - 4 {
            head.extend_from_slice(b"x-pad: y\r\n");
        }
        head.truncate(max - 4);
        head.extend_from_slice(b"\r\n\r\n");
        let mut end = HeadEnd::default();
        let mut buffer = Vec::new();
        let mut complete = false;
        for &byte in &head {
            buffer.push(byte);
            complete = end.found(&buffer);
            if complete {
                break;
            }
        }
        assert!(complete && buffer.len() == head.len());
        // Rescanning the buffer after every byte would examine about max²/2 bytes.
        assert!(
            end.examined <= 4 * head.len(),
            "{} bytes examined for a {}-byte head",
            end.examined,
            head.len()
        );
        // Bare line feeds end a head too, as httparse reads them.
        assert!(HeadEnd::default().found(b"GET /healthz HTTP/1.1\nhost: x\n\n"));
        assert!(!HeadEnd::default().found(b"GET /healthz HTTP/1.1\r\nhost: x\r\n"));
        // Split anywhere, the terminator is still found once complete.
        for split in 1..4 {
            let mut end = HeadEnd::default();
            let whole = b"GET / HTTP/1.1\r\n\r\n";
            let cut = whole.len() - split;
            assert!(!end.found(&whole[..cut]));
            assert!(end.found(whole), "split {split} bytes before the end");
        }
    }
}
