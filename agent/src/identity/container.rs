//! Which container a process runs in, from its cgroup paths (`/proc/<pid>/cgroup`, cgroup v1
//! and v2): Docker (cgroupfs and systemd drivers), containerd and CRI-O under Kubernetes
//! (both cgroup drivers), podman (root and rootless). A process in no container has none.
//!
//! Pure: the caller reads the file (bounded); nothing here touches /proc.

/// A container a process belongs to, as its cgroup path names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// The full 64-hex-digit id.
    pub id: String,
}

impl ContainerRef {
    /// The short id Docker shows and the `container_id` label carries (12 hex digits).
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The container id a path segment names: `<id>`, `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`. Not `crio-conmon-…`
/// or `libpod-conmon-…` (the runtime's monitor, not the container).
fn segment_id(segment: &str) -> Option<&str> {
    let bare = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = bare.rsplit('-').next()?;
    if !is_id(id) {
        return None;
    }
    let prefix = &bare[..bare.len() - id.len()];
    match prefix {
        "" | "docker-" | "cri-containerd-" | "crio-" | "libpod-" | "containerd-" => Some(id),
        _ => None,
    }
}

/// The container of the process whose `/proc/<pid>/cgroup` is `text`: the innermost container
/// id on any hierarchy's path (nested containers report the inner one).
pub fn from_cgroup(text: &str) -> Option<ContainerRef> {
    text.lines().find_map(|line| {
        // hierarchy-id:controllers:path
        let path = line.splitn(3, ':').nth(2)?;
        let segments: Vec<&str> = path.split('/').collect();
        let id = segments.iter().rev().find_map(|s| segment_id(s))?;
        Some(ContainerRef { id: id.to_owned() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e2b1a0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";
    const UID: &str = "8d2f7a4e-1b3c-4d5e-9f60-7a8b9c0d1e2f";

    #[test]
    fn real_world_cgroup_paths() {
        let uid_ = UID.replace('-', "_");
        let cases: Vec<(String, bool)> = vec![
            // Docker, cgroup v1 (cgroupfs driver), several hierarchies.
            (format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n0::/docker/{ID}"), true),
            // Docker, cgroup v2, systemd driver.
            (format!("0::/system.slice/docker-{ID}.scope"), true),
            // containerd CRI, systemd driver.
            (
                format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                true,
            ),
            // containerd or dockershim, cgroupfs driver, cgroup v1.
            (format!("4:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}"), true),
            // Guaranteed pods sit right under kubepods.
            (format!("0::/kubepods/pod{UID}/{ID}"), true),
            // CRI-O, systemd driver; its monitor is not the container.
            (
                format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
                true,
            ),
            (format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope"), false),
            // podman: root (with its inner "container" cgroup) and rootless.
            (format!("0::/machine.slice/libpod-{ID}.scope/container"), true),
            (
                format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
                true,
            ),
            (format!("0::/machine.slice/libpod-conmon-{ID}.scope"), false),
            // No container: systemd services and sessions, the root.
            ("0::/system.slice/sshd.service".into(), false),
            ("0::/user.slice/user-0.slice/session-3.scope".into(), false),
            ("12:pids:/\n0::/".into(), false),
            ("".into(), false),
            // Something that only looks like an id.
            (format!("0::/docker/{}", &ID[..63]), false),
            (format!("0::/docker/{}", ID.to_uppercase()), false),
        ];
        for (text, in_container) in cases {
            let got = from_cgroup(&text);
            if in_container {
                let got = got.unwrap_or_else(|| panic!("no container in {text}"));
                assert_eq!(got.id, ID, "{text}");
                assert_eq!(got.short_id(), &ID[..12]);
            } else {
                assert_eq!(got, None, "{text}");
            }
        }
    }

    #[test]
    fn nested_containers_report_the_inner_one() {
        let inner = "a".repeat(64);
        let text = format!("0::/docker/{ID}/docker/{inner}");
        assert_eq!(from_cgroup(&text).unwrap().id, inner);
    }
}
