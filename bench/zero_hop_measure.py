#!/usr/bin/env python3
"""Zero-hop measurements for docs/zero-hop.md, interleaved so machine load drifts hit every
system alike: `python3 bench/zero_hop_measure.py [ROUNDS]` (root; after `cargo xtask build`
and `cargo build --release -p tests --bin zh_app --bin zh_client`).

Topology as in `cargo xtask bench`: client netns ⟷ veth ⟷ machine netns with the app
(`zh_app tokio`, every byte checked) on loopback and three daemons: `--splice ebpf`
(today's default path), `--splice ebpf --zero-hop on`, `--splice off`. `direct` reaches
the app across the veth. Each round runs every scenario against every system in turn:
app→client 1 GiB, client→app 1 GiB, both ways 512+512 MiB, 64-byte echo ×20,000 (p50).
CPU: the processes' own CPU time (client + app + the daemon under test, user + system,
softirq work done in their context included), per GB; the machine-wide /proc/stat figure
is printed too but is only meaningful on an otherwise idle machine.
Prints one JSON line per run and a median table at the end.

Filters: ZHM_SCENARIOS / ZHM_SYSTEMS (comma-separated names as in the tables below);
ZHM_OLD_DAEMON=PATH adds another build as "daemon zero-hop (old)" for an A/B in one run;
ZHM_LOG sets the daemons' RUST_LOG (`warn,proxy_daemon::tunnel=debug` logs each tunnel's
zero-hop counters: redirected and passed bytes, why messages passed). The daemons run with
`--admin-listen off` (several daemons share the namespace).
"""
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON = os.path.join(ROOT, "target/release/project-ingress-proxy")
APP = os.path.join(ROOT, "target/release/zh_app")
CLIENT = os.path.join(ROOT, "target/release/zh_client")
C, M = "zhm-c", "zhm-m"
MIP = "10.207.0.2"
GIB = 1 << 30

SYSTEMS = {
    "direct": None,
    "daemon ebpf": (8101, ["--splice", "ebpf", "--zero-hop", "off"]),
    "daemon zero-hop": (8102, ["--splice", "ebpf", "--zero-hop", "on"]),
    "daemon userspace": (8103, ["--splice", "off", "--zero-hop", "off"]),
}
# A/B against another build: ZHM_OLD_DAEMON=/path/to/project-ingress-proxy adds it as
# "daemon zero-hop (old)".
# ZHM_COPY_UP=1: also zero-hop with the client→app direction on the userspace copy relay
# instead of the kernel's verdict (is the backlog worker what echo pays for?).
if os.environ.get("ZHM_COPY_UP"):
    SYSTEMS["daemon zero-hop copy-up"] = (8105, ["--splice", "off", "--zero-hop", "on"])
if os.environ.get("ZHM_OLD_DAEMON"):
    SYSTEMS["daemon zero-hop (old)"] = (8104, ["--splice", "ebpf", "--zero-hop", "on"])
SCENARIOS = {
    "app→client": ["source", "3", str(GIB)],
    "client→app": ["sink", "4", str(GIB)],
    "both ways": ["both", "5", str(GIB // 2), "6", str(GIB // 2)],
    # The client stops reading for 2 s after 64 MiB: how soon do the app's sends come
    # back to zero-hop (the daemon's closing line counts them)?
    "app→client stalled": ["source", "7", str(GIB), str(64 << 20), "2000"],
    "echo 64 B": ["echo", "20000", "64"],
}


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def busy_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6]


def proc_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def children_ticks():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * os.sysconf("SC_CLK_TCK")


def setup():
    for ns in (C, M):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", C, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", M)
    sh("ip", "-n", C, "addr", "add", "10.207.0.1/30", "dev", "veth0")
    sh("ip", "-n", M, "addr", "add", MIP + "/30", "dev", "veth0")
    sh("ip", "-n", C, "link", "set", "veth0", "up")
    sh("ip", "-n", M, "link", "set", "veth0", "up")


def enter(ns, *args):
    return ["nsenter", "--net=/var/run/netns/" + ns, *args]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    setup()
    procs = []
    try:
        env = dict(os.environ, ZH_BIND="0.0.0.0")
        app = subprocess.Popen(enter(M, APP, "tokio", "9100"), env=env,
                               stdout=subprocess.DEVNULL)
        procs.append(app)
        pids = {}
        for name, spec in SYSTEMS.items():
            if spec:
                port, args = spec
                binary = os.environ["ZHM_OLD_DAEMON"] if name.endswith("(old)") else DAEMON
                p = subprocess.Popen(
                    enter(M, binary, "--listen", "0.0.0.0:%d" % port, "--log-format", "json", "--admin-listen", "off", *args),
                    env=dict(os.environ, RUST_LOG=os.environ.get("ZHM_LOG", "warn")), stdout=subprocess.DEVNULL,
                    stderr=open("/tmp/zhm-%d.log" % port, "w"))
                procs.append(p)
                pids[name] = p.pid
        time.sleep(2)
        results = {}
        for r in range(rounds):
            for scen, cargs in SCENARIOS.items():
                if os.environ.get("ZHM_SCENARIOS") and scen not in os.environ["ZHM_SCENARIOS"].split(","):
                    continue
                for name, spec in SYSTEMS.items():
                    if os.environ.get("ZHM_SYSTEMS") and name not in os.environ["ZHM_SYSTEMS"].split(","):
                        continue
                    addr = "%s:%d" % (MIP, spec[0] if spec else 9100)
                    e = dict(os.environ, TARGET="localhost:9100")
                    t0 = busy_ticks()
                    ours = [app.pid] + ([pids[name]] if name in pids else [])
                    p0 = sum(proc_ticks(p) for p in ours) + children_ticks()
                    out = subprocess.run(enter(C, CLIENT, addr, *cargs), env=e, capture_output=True,
                                         text=True, timeout=300)
                    ticks = busy_ticks() - t0
                    pticks = sum(proc_ticks(p) for p in ours) + children_ticks() - p0
                    try:
                        res = json.loads(out.stdout.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        res = {"ok": False, "error": out.stderr[:1500]}
                    if "bytes" in res:
                        gb = res["bytes"] / 1e9
                        res["machine_cpu_s_per_gb"] = ticks / os.sysconf("SC_CLK_TCK") / gb
                        res["cpu_s_per_gb"] = pticks / os.sysconf("SC_CLK_TCK") / gb
                    res.update(round=r, scenario=scen, system=name)
                    print(json.dumps(res), flush=True)
                    results.setdefault((scen, name), []).append(res)
        print()
        print("| scenario | system | Gbit/s | ×direct | CPU s/GB (client+app+daemon) | ×direct | echo p50 µs | ×direct | ok |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")

        def med(v):
            v = sorted(v)
            return v[len(v) // 2] if v else float("nan")

        for scen in SCENARIOS:
            base = results.get((scen, "direct"), [])
            bg = med([x.get("gbps", 0) for x in base])
            bc = med([x.get("cpu_s_per_gb", 0) for x in base])
            bp = med([x.get("p50_us", 0) for x in base])
            for name in SYSTEMS:
                rs = results.get((scen, name), [])
                ok = all(x.get("ok") for x in rs)
                if scen.startswith("echo"):
                    p = med([x.get("p50_us", 0) for x in rs])
                    print("| %s | %s | | | | | %.1f | %.2f | %s |" % (scen, name, p, p / bp, ok))
                else:
                    g = med([x.get("gbps", 0) for x in rs])
                    c = med([x.get("cpu_s_per_gb", 0) for x in rs])
                    print("| %s | %s | %.2f | %.2f | %.2f | %.2f | | | %s |" % (scen, name, g, g / bg, c, c / bc, ok))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (C, M):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


main()
