//! What both services' HTTP servers share.

use std::{net::SocketAddr, time::Duration};

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

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
