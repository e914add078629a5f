//! The process's signals as the nodes' controls: SIGHUP reloads, SIGTERM and SIGINT stop.

use dnsfence_agent::Controls;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

/// Controls fed by the process's signals, for as many nodes as asked: each gets the stop;
/// only the first gets the reloads (in `dnsfence run` the agent reloads, and the proxy
/// follows it). Must be called inside the runtime.
pub(crate) fn controls(nodes: usize) -> std::io::Result<Vec<Controls>> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, stop) = watch::channel(false);
    let (reload_tx, reload) = mpsc::channel(4);
    let mut out = vec![Controls {
        reload,
        stop: stop.clone(),
    }];
    // The others' reload senders live as long as the process: they never reload.
    let mut idle = Vec::new();
    for _ in 1..nodes {
        let (tx, reload) = mpsc::channel(1);
        idle.push(tx);
        out.push(Controls {
            reload,
            stop: stop.clone(),
        });
    }
    tokio::spawn(async move {
        let _idle = idle;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let _ = reload_tx.try_send(());
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let _ = stop_tx.send(true);
        // Keep the stop visible (and the reload channel open) until the process ends.
        std::future::pending::<()>().await;
    });
    Ok(out)
}
