//! Panics. A panic inside a connection or tunnel task is contained to that task: it is
//! logged with the task's request id, tokio drops the task (its sockets close, its map
//! entries and descriptor budget are released by their guards) and the daemon serves on.
//! A panic anywhere else (accept loop, log writer, start-up, shutdown) would leave the
//! daemon half-working, so it is logged and the process aborts: the supervisor restarts
//! it.

use std::cell::RefCell;
use std::future::Future;

thread_local! {
    /// This thread's owner watches for its end and handles a panic itself.
    static OWNER_HANDLES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the current thread as one whose panic its owner handles (it watches the
/// thread's end and shuts the daemon down in order): the hook only logs.
pub fn owner_handles_this_thread() {
    OWNER_HANDLES.with(|o| o.set(true));
}

tokio::task_local! {
    /// What the running task is serving: `request <id>` or `tunnel <id>`.
    static TASK: RefCell<Vec<u8>>;
}

/// Runs `fut` as a task whose panics are contained and labelled.
pub fn contained<F: Future>(label: &[u8], fut: F) -> impl Future<Output = F::Output> {
    TASK.scope(RefCell::new(label.to_vec()), fut)
}

/// Relabels the running task (a connection moving on to its next request).
pub fn label(kind: &[u8], id: &[u8]) {
    let _ = TASK.try_with(|t| {
        let mut t = t.borrow_mut();
        t.clear();
        t.extend_from_slice(kind);
        t.push(b' ');
        t.extend_from_slice(id);
    });
}

pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let task = TASK
            .try_with(|t| {
                t.try_borrow()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .ok()
            })
            .ok()
            .flatten();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("?").to_owned();
        if OWNER_HANDLES.with(|o| o.get()) {
            tracing::error!(%thread, %location, panic = %message, "thread panicked; its owner shuts the daemon down");
            crate::logging::flush_now();
            return;
        }
        match task {
            Some(task) => {
                tracing::error!(%task, %thread, %location, panic = %message, "task panicked: closed its connections, serving on");
                crate::logging::flush_now();
            }
            None => {
                tracing::error!(%thread, %location, panic = %message, "panic outside a connection or tunnel: aborting (the supervisor restarts the daemon)");
                crate::logging::stop();
                std::process::abort();
            }
        }
    }));
}
