//! A LISTENing connection that collects notifications, for tests of the wake-ups.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// A LISTENing connection that collects notifications, for tests of the wake-ups.
pub struct Listener {
    pub client: Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
}

impl Listener {
    pub async fn start(url: &str, channel: &str) -> Self {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("listener connection");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Notifications arrive only through poll_message.
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                // A send fails only once the Listener is dropped: nobody is left to read.
                if let AsyncMessage::Notification(n) = message
                    && tx
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .is_err()
                {
                    break;
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .expect("LISTEN");
        Self { client, rx }
    }

    /// Every notification that arrives until `quiet` passes without one.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while let Ok(Some(n)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            got.push(n);
        }
        got
    }
}
