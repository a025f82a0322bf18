//! Machine-wide readings from /proc, for memory bounds and measurements.

/// `MemAvailable` from /proc/meminfo, KiB.
pub fn mem_available_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Machine-wide TCP socket memory in KiB (`/proc/net/sockstat`, pages).
pub fn tcp_mem_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = s.lines().find(|l| l.starts_with("TCP:")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "mem").unwrap();
    f[i + 1].parse::<i64>().unwrap() * 4
}

/// Busy CPU time of the whole machine, all cores, in USER_HZ ticks (`/proc/stat`).
pub fn cpu_jiffies() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let line = s.lines().next().unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle + iowait
    v.iter().take(8).sum::<u64>() - v[3] - v[4]
}
