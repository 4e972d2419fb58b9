//! A TCP proxy in front of the fleet server's HTTP port that misbehaves on bundle downloads only
//! (check-ins pass): it can stall a download after its first bytes while holding the connection,
//! cut every download at once, drop each download after a number of bytes, or answer a download
//! itself with a lying Content-Length.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass = 0,
    /// Relay `limit` bytes of a bundle response, then send nothing and keep the connection open.
    Stall = 1,
    /// Close the connection as soon as a bundle is requested.
    Cut = 2,
    /// Relay `limit` bytes of a bundle response, then close the connection.
    Drop = 3,
    /// Answer a bundle request itself, which the upstream never sees: `Content-Length: limit`,
    /// then that many zero bytes (or until the client goes away).
    Lie = 4,
}

#[derive(Clone)]
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
    limit: Arc<AtomicUsize>,
}

const BUNDLE_REQUEST: &[u8] = b"GET /api/v1/bundles/";

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(Mode::Pass as u8)),
            limit: Arc::new(AtomicUsize::new(1300)),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        p.relay(client, server).await;
                    }
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode, limit: usize) {
        self.limit.store(limit, Ordering::SeqCst);
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::Stall,
            2 => Mode::Cut,
            3 => Mode::Drop,
            4 => Mode::Lie,
            _ => Mode::Pass,
        }
    }

    async fn relay(&self, client: TcpStream, server: TcpStream) {
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let bundle = Arc::new(AtomicBool::new(false));
        let seen = bundle.clone();
        let this = self.clone();
        let lie = Arc::new(tokio::sync::Notify::new());
        let lie_now = lie.clone();
        let upstream = tokio::spawn(async move {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let n = match client_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if buffer[..n].windows(BUNDLE_REQUEST.len()).any(|w| w == BUNDLE_REQUEST) {
                    match this.mode() {
                        Mode::Cut => return,
                        Mode::Lie => {
                            lie_now.notify_one();
                            return;
                        }
                        _ => {}
                    }
                    seen.store(true, Ordering::SeqCst);
                }
                if server_write.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        });
        let mut buffer = vec![0u8; 16 * 1024];
        let mut relayed = 0usize;
        loop {
            if upstream.is_finished() && self.mode() == Mode::Cut {
                return;
            }
            let read = tokio::select! {
                read = server_read.read(&mut buffer) => read,
                _ = lie.notified() => {
                    let announced = self.limit.load(Ordering::SeqCst);
                    let _ = lie_about_length(&mut client_write, announced).await;
                    break;
                }
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mode = self.mode();
            if bundle.load(Ordering::SeqCst) && matches!(mode, Mode::Stall | Mode::Drop) {
                let allowed = self.limit.load(Ordering::SeqCst).saturating_sub(relayed).min(n);
                let _ = client_write.write_all(&buffer[..allowed]).await;
                relayed += allowed;
                if allowed < n {
                    if mode == Mode::Stall {
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    }
                    break;
                }
                continue;
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        upstream.abort();
    }
}

/// A bundle response announcing `announced` bytes, and that many zero bytes.
async fn lie_about_length(client: &mut tokio::net::tcp::OwnedWriteHalf, announced: usize) -> std::io::Result<()> {
    let head =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {announced}\r\n\r\n");
    client.write_all(head.as_bytes()).await?;
    let zeros = vec![0u8; 16 * 1024];
    let mut sent = 0;
    while sent < announced {
        let n = zeros.len().min(announced - sent);
        client.write_all(&zeros[..n]).await?;
        sent += n;
    }
    Ok(())
}
