//! The baseline for toolgate's overhead: a bare HTTP pass-through with no
//! auth, no parsing and no policy, in front of the same upstream.
//!
//!     cargo run --release --example passthrough -- LISTEN UPSTREAM_ADDR
use std::convert::Infallible;

// The same allocator as toolgate, so the baseline differs only in the work.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9100".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(HttpConnector::new());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("READY {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move {
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_owned();
                    *req.uri_mut() = format!("http://{upstream}{pq}")
                        .parse()
                        .expect("valid upstream URI");
                    let resp = match client.request(req).await {
                        Ok(r) => r.map(http_body_util::Either::Left),
                        Err(_) => {
                            let mut r = hyper::Response::new(http_body_util::Either::Right(
                                http_body_util::Empty::new(),
                            ));
                            *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
