//! Log lines leave the request path without a syscall: each thread appends formatted lines
//! to a buffer of its own; worker threads hand theirs over when it is full or when the
//! worker is about to sleep (tokio's park hook), other threads after every line. One
//! writer thread writes the handed-over buffers to stderr: it sleeps until a buffer is
//! queued, then gathers for one tick and writes everything in one `writev`, so a busy
//! daemon writes a few times a second and an idle one never wakes. It runs at a lower
//! priority than the workers: on a small machine its write must not delay a request.
//! When the reader of stderr (journald, a pipe) is slow, buffers queue up to a bound and
//! past it are dropped, counted; the count is logged once the reader keeps up again.
//! Request handling never waits for the log.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A thread's buffer is handed over at this size.
const BATCH_BYTES: usize = 32 * 1024;
/// A batch up to this size is copied into the last queued buffer instead.
const SMALL_BATCH_BYTES: usize = 8 * 1024;
/// Most bytes waiting for the writer; past it, handed-over buffers are dropped.
const MAX_PENDING_BYTES: usize = 8 << 20;
/// Once woken by a queued buffer, the writer gathers this long before it writes: a line
/// reaches stderr at most this late (warnings and errors at once). 20 ms woke the writer
/// 50 times a second under load, and each write delayed a request on 2 vCPUs.
const WRITER_TICK: Duration = Duration::from_millis(100);
/// The writer's nice value (workers run at 0): the scheduler lets a woken worker
/// preempt it.
const WRITER_NICE: libc::c_int = 10;

#[derive(Default)]
struct Queue {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
    /// Lines dropped since the writer last reported.
    dropped_lines: u64,
    /// A warning or error is queued: write it now, not at the next tick.
    urgent: bool,
    stopping: bool,
    /// The writer waits for a first buffer: the thread that queues one wakes it.
    writer_asleep: bool,
    /// Written buffers, emptied, for the threads to fill again (no allocation per batch).
    spare: Vec<Vec<u8>>,
}

impl Queue {
    /// Takes a thread's lines (leaving `b` empty and ready for more), or drops and counts
    /// them past the bound.
    fn enqueue(&mut self, b: &mut Vec<u8>, batching: bool) {
        if self.bytes + b.len() > MAX_PENDING_BYTES {
            let lines = b.iter().filter(|&&c| c == b'\n').count() as u64;
            self.dropped_lines += lines;
            DROPPED_TOTAL.fetch_add(lines, Ordering::Relaxed);
            b.clear();
            return;
        }
        self.bytes += b.len();
        // A small batch (a worker going idle after a request or two) is copied into the
        // last queued buffer when it has room: nothing changes hands and nothing is
        // allocated, and a burst of small batches fills each queued buffer before another
        // is needed. (Handing over the thread's buffer every time took a fresh 32 KiB
        // buffer per flush: 2,000 tunnels opened at once held 12 MiB of log buffers.)
        if let Some(last) = self.buffers.last_mut() {
            if b.len() <= SMALL_BATCH_BYTES && last.capacity() - last.len() >= b.len() {
                last.extend_from_slice(b);
                b.clear();
                return;
            }
        }
        // Workers refill a recycled batch buffer; other threads log rarely, line by line,
        // and keep no batch-sized buffer.
        let next = if batching {
            self.spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(BATCH_BYTES))
        } else {
            Vec::new()
        };
        self.buffers.push(std::mem::replace(b, next));
    }
}

/// Most emptied buffers kept for reuse.
const SPARE_BUFFERS: usize = 16;

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    writer: Mutex<Option<JoinHandle<()>>>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
/// Lines dropped since start (for the metrics).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped since start because the log reader was not keeping up.
pub fn dropped_lines() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Worker threads batch; every other thread hands each line over at once.
    static BATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Starts the writer thread (idempotent).
pub fn start() {
    let shared = SHARED.get_or_init(|| Shared {
        queue: Mutex::new(Queue::default()),
        wake: Condvar::new(),
        writer: Mutex::new(None),
    });
    let mut writer = shared.writer.lock().unwrap();
    if writer.is_none() {
        *writer = Some(
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(|| {
                    // SAFETY: setpriority on this thread (tid); failure changes nothing.
                    unsafe {
                        libc::setpriority(
                            libc::PRIO_PROCESS,
                            libc::gettid() as libc::id_t,
                            WRITER_NICE,
                        )
                    };
                    write_loop()
                })
                .expect("spawning the log writer thread"),
        );
    }
}

/// Marks the current thread as a worker: its lines are batched until [`flush`].
pub fn batch_this_thread() {
    BATCHING.with(|b| b.set(true));
}

/// Appends to this thread's buffer with `fill`, then hands it over if due.
pub fn append(fill: impl FnOnce(&mut Vec<u8>)) {
    let due = BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        fill(&mut b);
        b.len() >= BATCH_BYTES || !BATCHING.with(Cell::get)
    });
    if due {
        flush();
    }
}

/// Hands this thread's buffer to the writer and has it written at once.
pub fn flush_now() {
    flush();
    if let Some(shared) = SHARED.get() {
        shared.queue.lock().unwrap().urgent = true;
        shared.wake.notify_one();
    }
}

/// Hands this thread's buffer to the writer (a worker calls it before it sleeps).
pub fn flush() {
    let Some(shared) = SHARED.get() else {
        // No writer (unit tests, early start-up errors): write directly.
        BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            let _ = std::io::stderr().write_all(&b);
            b.clear();
        });
        return;
    };
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_empty() {
            return;
        }
        let mut queue = shared.queue.lock().unwrap();
        queue.enqueue(&mut b, BATCHING.with(Cell::get));
        let wake = std::mem::take(&mut queue.writer_asleep);
        drop(queue);
        if wake {
            shared.wake.notify_one();
        }
    });
}

/// Flushes this thread, then waits until the writer has written everything queued and
/// stops it (end of the process).
pub fn stop() {
    flush();
    let Some(shared) = SHARED.get() else { return };
    shared.queue.lock().unwrap().stopping = true;
    shared.wake.notify_one();
    if let Some(writer) = shared.writer.lock().unwrap().take() {
        let _ = writer.join();
    }
}

fn write_loop() {
    let shared = SHARED.get().expect("started");
    loop {
        let (mut buffers, dropped, stopping) = {
            let mut queue = shared.queue.lock().unwrap();
            // Asleep while nothing is queued: an idle daemon does not wake.
            while queue.buffers.is_empty() && !queue.stopping && !queue.urgent {
                queue.writer_asleep = true;
                queue = shared.wake.wait(queue).unwrap();
            }
            queue.writer_asleep = false;
            // Then one write per tick, whatever the number of batches: the workers hand
            // over small batches whenever they go idle, without a wake-up.
            let deadline = Instant::now() + WRITER_TICK;
            while !queue.stopping && !queue.urgent {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                queue = shared.wake.wait_timeout(queue, left).unwrap().0;
            }
            queue.urgent = false;
            queue.bytes = 0;
            (
                std::mem::take(&mut queue.buffers),
                std::mem::take(&mut queue.dropped_lines),
                queue.stopping,
            )
        };
        // Locked only while writing: anything else that writes to stderr (a library's
        // `eprintln!`) would otherwise block for ever.
        let mut stderr = std::io::stderr().lock();
        // A failed write (stderr closed) loses these lines; nothing else can be done.
        let _ = write_all_vectored(&mut stderr, &buffers);
        if dropped > 0 {
            // Written after the lines that made it: the reader is keeping up again.
            let mut line = Vec::new();
            super::format_notice(
                &mut line,
                "WARN",
                "log lines dropped while the log reader was not keeping up",
                &[("dropped_lines", dropped)],
            );
            let _ = stderr.write_all(&line);
        }
        let _ = stderr.flush();
        drop(stderr);
        let done = stopping && buffers.is_empty();
        let mut queue = shared.queue.lock().unwrap();
        for mut b in buffers.drain(..) {
            if queue.spare.len() < SPARE_BUFFERS && b.capacity() <= 4 * BATCH_BYTES {
                b.clear();
                queue.spare.push(b);
            }
        }
        drop(queue);
        if done {
            return;
        }
    }
}

/// Writes every buffer, as few `writev` calls as the kernel allows.
fn write_all_vectored(out: &mut impl Write, buffers: &[Vec<u8>]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = buffers
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| std::io::IoSlice::new(b))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Small batches (a worker idling after each request) share queued buffers, in order:
    /// 2,000 flushes of one line need a handful of buffers, not 2,000.
    #[test]
    fn small_batches_share_queued_buffers_in_order() {
        let mut queue = super::Queue::default();
        let mut thread_buffer = Vec::with_capacity(super::BATCH_BYTES);
        let mut expected = Vec::new();
        for i in 0..2000 {
            let line = format!("{{\"line\":{i}}}\n");
            thread_buffer.extend_from_slice(line.as_bytes());
            expected.extend_from_slice(line.as_bytes());
            queue.enqueue(&mut thread_buffer, true);
            assert!(thread_buffer.is_empty());
        }
        let written: Vec<u8> = queue.buffers.concat();
        assert_eq!(written, expected);
        assert_eq!(queue.bytes, expected.len());
        assert!(
            queue.buffers.len() <= expected.len() / super::BATCH_BYTES + 2,
            "{} buffers for {} bytes",
            queue.buffers.len(),
            expected.len()
        );
    }

    /// The writer thread must not hold stderr between writes: a library that writes
    /// there itself (`eprintln!`) would block for ever (it did: the first tunnel that
    /// printed to stderr stopped its worker).
    #[test]
    fn other_stderr_writers_never_block() {
        super::start();
        super::append(|b| b.extend_from_slice(b"{\"test\":\"line\"}\n"));
        std::thread::sleep(super::WRITER_TICK * 3);
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            eprintln!("written beside the log writer");
            let _ = done.send(());
        });
        assert!(
            wait.recv_timeout(Duration::from_secs(5)).is_ok(),
            "eprintln blocked behind the log writer"
        );
    }
}
