//! A site's uplink for the offline demo: a TCP forwarder that can be cut (every open connection
//! closed, new ones refused) and restored, so a whole site loses the server and the broker while
//! the rest of the fleet does not.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone)]
pub struct Link {
    pub addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
}

impl Link {
    /// Forwards connections on a free loopback port to `upstream` while up.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (up, _) = watch::channel(true);
        let link = Link { addr: listener.local_addr()?, up: Arc::new(up) };
        let up = link.up.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut state = up.subscribe();
                if !*state.borrow() {
                    continue; // refused: dropped at once
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(link)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
