// Entry for sandbox/pidnap.config.ts (the platform's process supervisor), replacing the
// Node `apps/project-ingress-proxy/server.ts` process. Same name, same port, same env.
// pidnap runs it as root on the machine; the daemon needs only CAP_BPF + CAP_NET_ADMIN
// (+ CAP_PERFMON) for the eBPF fast path and falls back to userspace without them.
export const projectIngressProxy = {
  name: "project-ingress-proxy",
  command: "/usr/local/bin/project-ingress-proxy",
  args: ["--log-format", "json"],
  env: {
    PROJECT_INGRESS_PROXY_LISTEN: "0.0.0.0:8080",
    // PROJECT_INGRESS_PROXY_SECRET is passed through from the machine's environment.
  },
  restart: "always",
  // SIGTERM drains in-flight requests for up to 10 s (--shutdown-grace).
  stopSignal: "SIGTERM",
  stopTimeoutMs: 20_000,
};
