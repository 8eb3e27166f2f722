//! Where the servers' data goes: stdout, raw while there is one session; labelled per line
//! (`[N] …`) once a second session appears or with `--label`; or one file per session in
//! `--output-dir` (`session-N.out`).
//!
//! One writer task owns stdout and the files, so output of several sessions never
//! interleaves inside a line.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// How output is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Raw until a second session appears, then labelled lines.
    Auto,
    /// Labelled lines from the start.
    Labelled,
    /// `DIR/session-N.out`.
    Dir(PathBuf),
}

enum Msg {
    Data(u32, Bytes),
    /// A session is established; the count of sessions so far.
    Sessions(u32),
    /// A session's output is over: flush its partial line.
    End(u32),
    /// Flush everything and answer.
    Close(oneshot::Sender<()>),
}

/// A handle to the writer. Cheap to clone.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Msg>,
}

impl Output {
    /// Starts the writer on stdout.
    pub fn start(mode: Mode) -> Output {
        Output::start_on(mode, tokio::io::stdout())
    }

    /// Starts the writer on `out`.
    pub fn start_on<W: AsyncWrite + Unpin + Send + 'static>(mode: Mode, out: W) -> Output {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(Writer::new(mode, out).run(rx));
        Output { tx }
    }

    /// Data from session `id` (waits when the writer is behind).
    pub async fn write(&self, id: u32, data: Bytes) {
        let _ = self.tx.send(Msg::Data(id, data)).await;
    }

    /// Tells the writer how many sessions there are.
    pub async fn sessions(&self, count: u32) {
        let _ = self.tx.send(Msg::Sessions(count)).await;
    }

    /// Session `id` will write no more.
    pub async fn end(&self, id: u32) {
        let _ = self.tx.send(Msg::End(id)).await;
    }

    /// Flushes everything written so far.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer<W> {
    mode: Mode,
    out: W,
    labelled: bool,
    partial: HashMap<u32, Vec<u8>>,
    files: HashMap<u32, tokio::fs::File>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    fn new(mode: Mode, out: W) -> Self {
        let labelled = mode == Mode::Labelled;
        Writer {
            mode,
            out,
            labelled,
            partial: HashMap::new(),
            files: HashMap::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            let r = match msg {
                Msg::Data(id, data) => self.data(id, &data).await,
                Msg::Sessions(n) => {
                    if n > 1 && self.mode == Mode::Auto {
                        self.labelled = true;
                    }
                    Ok(())
                }
                Msg::End(id) => self.end(id).await,
                Msg::Close(done) => {
                    let ids: Vec<u32> = self.partial.keys().copied().collect();
                    for id in ids {
                        let _ = self.end(id).await;
                    }
                    let _ = self.out.flush().await;
                    for f in self.files.values_mut() {
                        let _ = f.flush().await;
                    }
                    let _ = done.send(());
                    Ok(())
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "output not written");
            }
        }
    }

    async fn data(&mut self, id: u32, data: &[u8]) -> std::io::Result<()> {
        if let Mode::Dir(dir) = &self.mode {
            let file = match self.files.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let path = dir.join(format!("session-{id}.out"));
                    e.insert(tokio::fs::File::create(&path).await?)
                }
            };
            file.write_all(data).await?;
            return Ok(());
        }
        if !self.labelled {
            self.out.write_all(data).await?;
            return self.out.flush().await;
        }
        let buf = self.partial.entry(id).or_default();
        buf.extend_from_slice(data);
        let mut text = Vec::new();
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            text.extend_from_slice(format!("[{id}] ").as_bytes());
            text.extend_from_slice(&line);
        }
        if !text.is_empty() {
            self.out.write_all(&text).await?;
            self.out.flush().await?;
        }
        Ok(())
    }

    async fn end(&mut self, id: u32) -> std::io::Result<()> {
        if let Some(mut f) = self.files.remove(&id) {
            f.flush().await?;
        }
        if let Some(rest) = self.partial.remove(&id) {
            if !rest.is_empty() {
                let mut text = format!("[{id}] ").into_bytes();
                text.extend_from_slice(&rest);
                text.push(b'\n');
                self.out.write_all(&text).await?;
                self.out.flush().await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    async fn collect(mode: Mode, steps: impl FnOnce(Output) -> futures_like::BoxFut) -> String {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let out = Output::start_on(mode, client);
        steps(out.clone()).await;
        out.close().await;
        drop(out);
        let mut s = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1024];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap();
        String::from_utf8(s).unwrap()
    }

    mod futures_like {
        pub type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    }

    #[tokio::test]
    async fn raw_with_one_session_labelled_after_the_second() {
        let text = collect(Mode::Auto, |o| {
            Box::pin(async move {
                o.sessions(1).await;
                o.write(1, Bytes::from_static(b"hi\n")).await;
                o.sessions(2).await;
                o.write(2, Bytes::from_static(b"two\npart")).await;
                o.write(1, Bytes::from_static(b"one\n")).await;
                o.end(2).await;
            })
        })
        .await;
        assert_eq!(text, "hi\n[2] two\n[1] one\n[2] part\n");
    }

    #[tokio::test]
    async fn files_per_session() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let text = collect(Mode::Dir(d.clone()), |o| {
            Box::pin(async move {
                o.write(1, Bytes::from_static(b"a")).await;
                o.write(2, Bytes::from_static(b"b")).await;
                o.end(1).await;
            })
        })
        .await;
        assert_eq!(text, "");
        assert_eq!(
            std::fs::read_to_string(d.join("session-1.out")).unwrap(),
            "a"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("session-2.out")).unwrap(),
            "b"
        );
    }
}
