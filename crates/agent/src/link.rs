//! The two ways the agent and a proxy talk: over the agent's Unix socket (`dnsfence agent`
//! and `dnsfence proxy --agent`, two processes), or over an in-process channel (`dnsfence
//! run`, one process). Both carry the same [`Message`]s through the same code on each side;
//! the in-process link also hands the proxy the policy set the agent compiled, so one
//! process compiles each snapshot once and both ends number selectors alike.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use dnsfence_policy::PolicySet;
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::control::{read_message, write_message, Message};

/// One message on a link, and (in-process only) the policy set a snapshot was compiled
/// into.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The message.
    pub message: Message,
    /// With a snapshot over an in-process link: the agent's compiled policies.
    pub compiled: Option<Arc<PolicySet>>,
}

impl From<Message> for Frame {
    fn from(message: Message) -> Self {
        Self {
            message,
            compiled: None,
        }
    }
}

/// Messages queued on an in-process link before the sender waits.
const LOCAL_QUEUE: usize = 64;

/// One end of a connection between the agent and a proxy (or an operator's command).
#[derive(Debug)]
pub enum Link {
    /// Newline-delimited JSON on a Unix socket.
    Unix {
        /// The reading half.
        rd: BufReader<OwnedReadHalf>,
        /// The writing half.
        wr: OwnedWriteHalf,
        /// The line being read.
        line: String,
    },
    /// A pair of channels inside one process.
    Local {
        /// To the other end.
        tx: mpsc::Sender<Frame>,
        /// From the other end.
        rx: mpsc::Receiver<Frame>,
    },
}

impl Link {
    /// A link over a connected Unix socket.
    pub fn unix(stream: UnixStream) -> Self {
        let (rd, wr) = stream.into_split();
        Self::Unix {
            rd: BufReader::new(rd),
            wr,
            line: String::new(),
        }
    }

    /// Both ends of an in-process link.
    pub fn pair() -> (Self, Self) {
        let (a_tx, a_rx) = mpsc::channel(LOCAL_QUEUE);
        let (b_tx, b_rx) = mpsc::channel(LOCAL_QUEUE);
        (
            Self::Local { tx: a_tx, rx: b_rx },
            Self::Local { tx: b_tx, rx: a_rx },
        )
    }

    /// Sends a frame (over a socket, only its message).
    pub async fn send(&mut self, frame: impl Into<Frame>) -> io::Result<()> {
        let frame = frame.into();
        match self {
            Self::Unix { wr, .. } => write_message(wr, &frame.message).await,
            Self::Local { tx, .. } => tx
                .send(frame)
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }

    /// The next frame; `Ok(None)` when the other end is gone.
    pub async fn recv(&mut self) -> io::Result<Option<Frame>> {
        match self {
            Self::Unix { rd, line, .. } => Ok(read_message(rd, line).await?.map(Frame::from)),
            Self::Local { rx, .. } => Ok(rx.recv().await),
        }
    }
}

/// Where the agent takes connections.
#[derive(Debug)]
pub enum Listener {
    /// Its Unix socket (bound by [`crate::node`], which may have to wait for it).
    Unix(PathBuf),
    /// In-process links, each sent by a proxy of the same process.
    Local(mpsc::Receiver<Link>),
}

/// How a proxy reaches the agent.
#[derive(Debug, Clone)]
pub enum Connector {
    /// The agent's Unix socket.
    Unix(PathBuf),
    /// The agent of the same process.
    Local(mpsc::Sender<Link>),
}

impl Connector {
    /// A connector and the listener it reaches, in one process.
    pub fn local() -> (Self, Listener) {
        let (tx, rx) = mpsc::channel(4);
        (Self::Local(tx), Listener::Local(rx))
    }

    /// A new link to the agent.
    pub async fn connect(&self) -> io::Result<Link> {
        match self {
            Self::Unix(path) => UnixStream::connect(path).await.map(Link::unix),
            Self::Local(agent) => {
                let (ours, theirs) = Link::pair();
                agent
                    .send(theirs)
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
                Ok(ours)
            }
        }
    }

    /// What it reaches, for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Unix(path) => path.display().to_string(),
            Self::Local(_) => "the agent of this process".to_owned(),
        }
    }
}

/// Accepts the next connection on a bound agent socket.
pub(crate) async fn accept(listener: &UnixListener) -> io::Result<Link> {
    listener.accept().await.map(|(s, _)| Link::unix(s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;
    use crate::control::{Role, CONTROL_PROTOCOL};

    fn hello(pid: u32) -> Message {
        Message::Hello {
            protocol: CONTROL_PROTOCOL,
            role: Role::Proxy,
            pid,
            version: 0,
        }
    }

    #[tokio::test]
    async fn both_links_carry_the_same_messages() {
        // In-process, through a connector, with the compiled set alongside.
        let (connector, Listener::Local(mut incoming)) = Connector::local() else {
            unreachable!()
        };
        let mut proxy = connector.connect().await.unwrap();
        let mut agent = incoming.recv().await.unwrap();
        proxy.send(hello(1)).await.unwrap();
        assert_eq!(agent.recv().await.unwrap().unwrap().message, hello(1));
        let set = Arc::new(PolicySet::default());
        agent
            .send(Frame {
                message: hello(2),
                compiled: Some(set.clone()),
            })
            .await
            .unwrap();
        let got = proxy.recv().await.unwrap().unwrap();
        assert!(got.compiled.is_some_and(|c| Arc::ptr_eq(&c, &set)));
        drop(agent);
        assert!(proxy.recv().await.unwrap().is_none());
        // Over a socket pair: the message, never the set.
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Link::unix(a), Link::unix(b));
        a.send(Frame {
            message: hello(3),
            compiled: Some(set),
        })
        .await
        .unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.message, hello(3));
        assert!(got.compiled.is_none());
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }
}
