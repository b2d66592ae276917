//! The accept loop: HTTP/1.1 connections with a header read deadline, at most
//! `max_connections` at once, and a graceful shutdown bounded by a grace period.
//!
//! `axum::serve` sets neither a header timeout nor a connection cap, so a client that opens
//! hundreds of connections and sends half a header holds them for ever (slowloris). Here
//! each connection is served by hyper's HTTP/1 builder with `header_read_timeout` (which also
//! closes a keep-alive connection left idle that long), and takes a permit of a semaphore
//! before it is accepted: beyond the cap, new connections wait in the listen backlog until one
//! closes. The request body's deadline is the JSON endpoint's own (see `guard::json_body`).
//!
//! Shutdown (Ctrl-C or SIGTERM in `qwen2vl serve`): stop accepting, let each connection
//! finish what it is answering (keep-alive off), and after the grace period stop the engine,
//! which ends every running stream with its finish chunk and `data: [DONE]`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};

use crate::backend::Backend;

/// How long connections may take to close once the engine was stopped after the grace
/// period (the streams only have their last chunks to write).
const FINAL_DRAIN: Duration = Duration::from_secs(5);

/// Connection settings of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// The whole request head must arrive within this (also the idle keep-alive limit).
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// On shutdown, how long running answers may go on before they are cancelled.
    pub shutdown_grace: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains (see the module
/// docs) and stops `backend`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    backend: Arc<dyn Backend>,
    conns: Connections,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max = conns
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(conns.header_read_timeout)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => {}
            }
            // Finish the answer in progress (a stream included), then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit: all of them back means all connections closed.
    let all = max as u32;
    if tokio::time::timeout(conns.shutdown_grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::info!(
            "shutdown: answers still running after {:?}; cancelling them",
            conns.shutdown_grace
        );
        stop_backend(&backend).await;
        let _ = tokio::time::timeout(FINAL_DRAIN, permits.acquire_many(all)).await;
    }
    stop_backend(&backend).await;
}

/// [`Backend::shutdown`] joins the engine thread: off the async workers.
async fn stop_backend(backend: &Arc<dyn Backend>) {
    let b = backend.clone();
    let _ = tokio::task::spawn_blocking(move || b.shutdown()).await;
}
