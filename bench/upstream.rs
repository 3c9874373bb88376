//! A fast MCP tool server for the load benchmark: the bundled demo tool
//! server (Streamable HTTP, plain JSON responses).
//!
//!     cargo run --release --example bench-upstream -- 127.0.0.1:9001
#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let server = toolgate::demo::ToolServer::without_recording();
    let addr = server
        .start(listen.parse().expect("an address like 127.0.0.1:9001"))
        .await?;
    println!("READY {addr}");
    std::future::pending::<()>().await;
    Ok(())
}
