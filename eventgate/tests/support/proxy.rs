//! A TCP proxy in front of a Redis primary that can cut its replication link while every other
//! connection goes on (how a test makes a replica lag behind writes the primary acknowledged),
//! or make one client connection a black hole (a host gone without a reset).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// Forwards `127.0.0.1:port` to the primary; stops with the test.
pub struct Proxy {
    pub port: u16,
    faults: Arc<Faults>,
    _tasks: JoinSet<()>,
}

#[derive(Default)]
struct Faults {
    /// Replication links drop what the primary sends.
    cut: AtomicBool,
    /// The next connection to send this becomes a black hole.
    needle: Mutex<Option<Vec<u8>>>,
    black_holes: AtomicUsize,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let faults = Arc::new(Faults::default());
        let mut tasks = JoinSet::new();
        let shared = faults.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                connections.spawn(forward(client, server, shared.clone()));
            }
        });
        Self {
            port,
            faults,
            _tasks: tasks,
        }
    }

    /// From now on nothing the primary sends reaches its replicas (it believes it does).
    pub fn cut_replication(&self) {
        self.faults.cut.store(true, Ordering::SeqCst);
    }

    /// The next client connection to send `needle` stops carrying anything either way, from
    /// that read on, and stays open: what a client sees when the server's host vanishes.
    pub fn black_hole_on(&self, needle: &[u8]) {
        *self.faults.needle.lock().expect("needle") = Some(needle.to_vec());
    }

    /// Connections made black holes so far.
    pub fn black_holes(&self) -> usize {
        self.faults.black_holes.load(Ordering::SeqCst)
    }
}

/// Copies both ways. A connection that sent `REPLCONF` is a replica's: once `cut` is set, what
/// the primary sends on it is dropped. A black hole drops everything both ways.
async fn forward(client: TcpStream, server: TcpStream, faults: Arc<Faults>) {
    let replica = Arc::new(AtomicBool::new(false));
    let hole = Arc::new(AtomicBool::new(false));
    let (in_hole, up_faults) = (hole.clone(), faults.clone());
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
            if !in_hole.load(Ordering::SeqCst) {
                let mut needle = up_faults.needle.lock().expect("needle");
                if let Some(found) = needle.as_ref()
                    && buf[..n].windows(found.len()).any(|w| w == &found[..])
                {
                    *needle = None;
                    in_hole.store(true, Ordering::SeqCst);
                    up_faults.black_holes.fetch_add(1, Ordering::SeqCst);
                }
            }
            if in_hole.load(Ordering::SeqCst) {
                continue;
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
            if hole.load(Ordering::SeqCst)
                || (replica.load(Ordering::SeqCst) && faults.cut.load(Ordering::SeqCst))
            {
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
