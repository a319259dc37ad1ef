//! A TCP proxy in front of a Redis primary that can cut its replication link while every other
//! connection goes on: how a test makes a replica lag behind writes the primary acknowledged.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// Forwards `127.0.0.1:port` to the primary; stops with the test.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    _tasks: JoinSet<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let flag = cut.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                connections.spawn(forward(client, server, flag.clone()));
            }
        });
        Self {
            port,
            cut,
            _tasks: tasks,
        }
    }

    /// From now on nothing the primary sends reaches its replicas (it believes it does).
    pub fn cut_replication(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

/// Copies both ways. A connection that sent `REPLCONF` is a replica's: once `cut` is set, what
/// the primary sends on it is dropped.
async fn forward(client: TcpStream, server: TcpStream, cut: Arc<AtomicBool>) {
    let replica = Arc::new(AtomicBool::new(false));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let is_replica = replica.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if buf[..n]
                .windows(8)
                .any(|w| w.eq_ignore_ascii_case(b"REPLCONF"))
            {
                is_replica.store(true, Ordering::SeqCst);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = server_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if replica.load(Ordering::SeqCst) && cut.load(Ordering::SeqCst) {
                continue;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    // Either side closing closes both (a killed primary drops its replicas' links).
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
