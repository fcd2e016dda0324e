//! The baseline of the console load benchmark (`bench/console.sh`): a bare
//! axum "hello world" on the same runtime settings as `cloister serve`.
//! Usage: hello-axum ADDR

#![allow(clippy::print_stderr)]

use axum::Router;
use axum::routing::get;

/// The allocator `cloister` uses, so the comparison is like for like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A bare axum "hello world" (the console benchmark's baseline).
#[derive(Debug, clap::Parser)]
#[command(name = "hello-axum")]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:18081")]
    addr: String,
}

fn main() -> std::io::Result<()> {
    let addr = <Args as clap::Parser>::parse().addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("hello-axum on {addr}");
        let app = Router::new().route("/", get(|| async { "hello, world" }));
        axum::serve(listener, app).await
    })
}
