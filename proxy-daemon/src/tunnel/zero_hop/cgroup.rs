//! Where the capture program attaches: the root of the cgroup v2 hierarchy this process
//! sees. Every process on the machine (systemd services, pidnap and its children, shells)
//! lives below it, so the app behind any tunnel is seen wherever it runs, and the
//! program's filter (a registered port on 127.0.0.1 of this network namespace) keeps
//! every other socket untouched. In a cgroup namespace (a container) the root is the
//! namespace's root: the apps of that container.

use std::path::PathBuf;

/// The mount point of the cgroup v2 filesystem's root, from `/proc/self/mountinfo`.
/// None without cgroup v2 (a v1-only host), or when it is not mounted in this mount
/// namespace (`ip netns exec` remounts /sys and hides it).
pub fn v2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    v2_root_in(&info)
}

fn v2_root_in(mountinfo: &str) -> Option<PathBuf> {
    // `36 25 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw`: field 4 is the root
    // of the mount inside the filesystem, field 5 the mount point, the fs type follows
    // the " - " separator. Only a mount of the hierarchy's root sees every process.
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = mount.split_whitespace().collect();
        let point = fields.get(4)?;
        (fields.get(3) == Some(&"/")).then(|| PathBuf::from(unescape(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_root_and_skips_v1_and_subtree_mounts() {
        let info = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
34 25 0:29 /user.slice /mnt/sub rw - cgroup2 cgroup2 rw
35 25 0:29 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            v2_root_in(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(v2_root_in("25 30 0:23 / /sys rw - sysfs sysfs rw\n"), None);
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }
}
