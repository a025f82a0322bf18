// Entry for sandbox/pidnap.config.ts (the platform's process supervisor), replacing the
// Node `apps/project-ingress-proxy/server.ts` process. Same name, same port, same env.
// pidnap runs it as root on the machine; the daemon needs only CAP_BPF + CAP_NET_ADMIN
// (+ CAP_PERFMON) for the eBPF fast path and falls back to userspace without them
// (CAP_SYS_NICE, optional, lets its hand-off thread run real-time).
//
// Binary upgrade without dropping a tunnel (docs/operations.md, "Takeover"): install the
// new binary at the same path (a rename, e.g. `install -m 755 new
// /usr/local/bin/project-ingress-proxy`), then send SIGUSR2 to the process pidnap runs
// (`pkill -USR2 -x project-ingress-proxy` on a machine that runs one daemon). It starts
// the new binary with --takeover, hands it the listening sockets, the fast path's maps
// and every live tunnel, drains its in-flight requests and exits 0. pidnap then starts
// its process again (restart: "always"); with --takeover-if-running that process takes
// everything over from the upgraded one in turn, which exits 0: nothing is dropped either
// time, and the process pidnap follows is the one serving.
export const projectIngressProxy = {
  name: "project-ingress-proxy",
  command: "/usr/local/bin/project-ingress-proxy",
  args: [
    "--log-format",
    "json",
    "--control-socket",
    "/run/project-ingress-proxy.sock",
    "--takeover-if-running",
  ],
  env: {
    PROJECT_INGRESS_PROXY_LISTEN: "0.0.0.0:8080",
    // PROJECT_INGRESS_PROXY_SECRET is passed through from the machine's environment.
  },
  restart: "always",
  // SIGTERM drains in-flight requests for up to 10 s (--shutdown-grace) and ends every
  // tunnel; use the upgrade above to keep them.
  stopSignal: "SIGTERM",
  stopTimeoutMs: 20_000,
};
