//! Accepting connections: `TCP_NODELAY` (events are small and latency matters) and a write
//! timeout, so a client that stops reading cannot hold its connection open for ever.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

/// The gateway's listener for `axum::serve`.
pub struct GatewayListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl GatewayListener {
    pub fn new(inner: TcpListener, write_timeout: Duration) -> Self {
        Self {
            inner,
            write_timeout,
        }
    }
}

impl axum::serve::Listener for GatewayListener {
    type Io = Pin<Box<TimeoutStream<TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    return (Box::pin(stream), addr);
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
