//! The baseline of `cargo xtask bench`'s throughput comparison (#21): the
//! same echo work as plugvisor's echo plugin behind its listeners — raw
//! TCP, one line in, `[echo VERSION] line` out, and the `plugvisor.v1.Plugin`
//! gRPC service — served by a plain tokio and tonic server with no plugin
//! boundary, no hot swap and no probes: what a user would write by hand.
//!
//! Usage: `bare-echo TCP_ADDR GRPC_ADDR`; serves until killed.
use std::net::SocketAddr;
use std::pin::Pin;

use plugvisor_tests::pb::plugin_server::{Plugin, PluginServer};
use plugvisor_tests::pb::{Request, Response};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_stream::{Stream, StreamExt as _};

const VERSION: &str = "0.0.0-bare";

fn answer(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + VERSION.len() + 8);
    out.extend_from_slice(b"[echo ");
    out.extend_from_slice(VERSION.as_bytes());
    out.extend_from_slice(b"] ");
    out.extend_from_slice(frame);
    out
}

async fn tcp(addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).split(b'\n');
            while let Ok(Some(mut line)) = lines.next_segment().await {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let mut out = answer(&line);
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

struct Echo;

type Answers = Pin<Box<dyn Stream<Item = Result<Response, tonic::Status>> + Send>>;

fn response(req: &Request) -> Response {
    Response {
        payload: answer(&req.payload),
        plugin_version: VERSION.into(),
        error: String::new(),
    }
}

#[tonic::async_trait]
impl Plugin for Echo {
    async fn invoke(
        &self,
        request: tonic::Request<Request>,
    ) -> Result<tonic::Response<Response>, tonic::Status> {
        Ok(tonic::Response::new(response(request.get_ref())))
    }

    type ExchangeStream = Answers;

    async fn exchange(
        &self,
        request: tonic::Request<tonic::Streaming<Request>>,
    ) -> Result<tonic::Response<Answers>, tonic::Status> {
        // tonic's own stream item type: its Status is what it is.
        #[expect(clippy::result_large_err, reason = "tonic's Status, not ours")]
        fn answered(r: Result<Request, tonic::Status>) -> Result<Response, tonic::Status> {
            r.map(|req| response(&req))
        }
        let answers = request.into_inner().map(answered);
        Ok(tonic::Response::new(Box::pin(answers)))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare-echo TCP_ADDR GRPC_ADDR";
    let tcp_addr: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let grpc_addr: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let grpc = tonic::transport::Server::builder()
            .add_service(PluginServer::new(Echo))
            .serve(grpc_addr);
        tokio::select! {
            r = tcp(tcp_addr) => r.map_err(Into::into),
            r = grpc => r.map_err(Into::into),
        }
    })
}
