//! Zero-downtime takeover (SPEC §5): a new process started with `--takeover` and the same
//! `--control-socket` receives, from the running one, the listening sockets, the admin
//! socket, the fast path's maps and every live tunnel; the old process finishes its
//! in-flight requests and exits 0. See `docs/operations.md`.

pub mod wire;
