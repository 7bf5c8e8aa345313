//! A real Docker engine for the container tests: Debian's docker.io, started here when no
//! daemon answers, and images made locally from files of this machine (no registry).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::wait_for;

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("running docker (cargo xtask test installs docker.io)")
}

/// Makes sure a Docker daemon answers; starts `dockerd` (no bridge, no iptables: the test
/// containers run without a network) when none does.
pub fn require_docker() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if docker(&["info"]).status.success() {
            return;
        }
        let log = std::env::temp_dir().join("llmscope-test-dockerd.log");
        // The daemon outlives this test binary (the next one uses it too): never waited for.
        #[allow(clippy::zombie_processes)]
        Command::new("dockerd")
            .args(["--iptables=false", "--bridge=none"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting dockerd (cargo xtask test installs docker.io)");
        let up = wait_for(Duration::from_secs(60), || {
            docker(&["info"]).status.success().then_some(())
        });
        assert!(
            up.is_some(),
            "dockerd did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    });
}

/// An image holding `files` (host path → path in the image) and the shared libraries they
/// need, made with `docker import`; tagged by a hash of its inputs, so it is made once.
pub fn image(name: &str, files: &[(&Path, &str)]) -> String {
    require_docker();
    let mut all: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(h, c)| (h.to_path_buf(), c.to_string()))
        .collect();
    for (host, _) in files {
        let ldd = Command::new("ldd").arg(host).output().expect("running ldd");
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            all.push((PathBuf::from(lib), lib.to_owned()));
        }
    }
    all.sort();
    all.dedup();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (host, inside) in &all {
        inside.hash(&mut hasher);
        std::fs::read(host).unwrap().hash(&mut hasher);
    }
    let tag = format!("llmscope-test/{name}:{:016x}", hasher.finish());
    if docker(&["image", "inspect", &tag]).status.success() {
        return tag;
    }
    let root = std::env::temp_dir().join(format!("llmscope-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (host, inside) in &all {
        let dest = root.join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(host, &dest).unwrap();
    }
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    let tar = root.with_extension("tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let out = docker(&["import", tar.to_str().unwrap(), &tag]);
    assert!(out.status.success(), "docker import: {out:?}");
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
    tag
}

/// Whether the image exists locally.
pub fn have_image(tag: &str) -> bool {
    require_docker();
    docker(&["image", "inspect", tag]).status.success()
}

/// A running container, removed when dropped.
pub struct Container {
    pub name: String,
    pub id: String,
}

impl Container {
    /// `docker run -d` of `image` running `argv`, without a network.
    pub fn run(name: &str, image: &str, env: &[(&str, &str)], argv: &[&str]) -> Container {
        Container::run_with(name, image, &[], env, argv)
    }

    /// [`Container::run`] with more `docker run` options.
    pub fn run_with(
        name: &str,
        image: &str,
        options: &[&str],
        env: &[(&str, &str)],
        argv: &[&str],
    ) -> Container {
        let name = format!("llmscope-test-{name}-{}", std::process::id());
        let _ = docker(&["rm", "-f", &name]);
        let mut args = vec!["run", "-d", "--name", &name];
        if !options.contains(&"--network") {
            args.extend(["--network", "none"]);
        }
        args.extend(options);
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for e in &env {
            args.extend(["-e", e.as_str()]);
        }
        args.push(image);
        args.extend(argv);
        let out = docker(&args);
        assert!(out.status.success(), "docker run: {out:?}");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Container { name, id }
    }

    /// What it wrote to its standard output and error.
    pub fn logs(&self) -> String {
        let out = docker(&["logs", &self.id]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The host pid of its main process.
    pub fn pid(&self) -> u32 {
        let out = docker(&["inspect", "-f", "{{.State.Pid}}", &self.id]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
    }
}

/// The containerd that dockerd runs (Debian's docker.io manages its own).
pub const CONTAINERD_SOCKET: &str = "/var/run/docker/containerd/containerd.sock";
/// Its state directory, where it keeps each container's OCI bundle.
pub const CONTAINERD_STATE: &str = "/var/run/docker/containerd/daemon";

fn ctr(args: &[&str]) -> std::process::Output {
    Command::new("ctr")
        .args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"])
        .args(args)
        .output()
        .expect("running ctr (cargo xtask test installs docker.io, which brings containerd)")
}

/// A container run by containerd directly, in the `k8s.io` namespace, with the annotations
/// containerd's CRI plugin writes for a pod's container; removed when dropped.
pub struct PodContainer {
    pub id: String,
}

impl PodContainer {
    /// `image` (made with [`image`]) running `argv` as container `container` of pod
    /// `namespace/pod`.
    pub fn run(
        image: &str,
        pod: &str,
        namespace: &str,
        container: &str,
        argv: &[&str],
    ) -> PodContainer {
        let options: Vec<String> = [
            "io.kubernetes.cri.container-type=container".to_owned(),
            format!("io.kubernetes.cri.container-name={container}"),
            format!("io.kubernetes.cri.sandbox-name={pod}"),
            format!("io.kubernetes.cri.sandbox-namespace={namespace}"),
        ]
        .into_iter()
        .flat_map(|a| ["--annotation".to_owned(), a])
        .collect();
        PodContainer::start(image, 0xc0ffee, &options, argv)
    }

    /// `ctr run -d` of a Docker image (imported into containerd once) with more options;
    /// `n` tells this test binary's containers apart.
    pub fn start(image: &str, n: u64, options: &[String], argv: &[&str]) -> PodContainer {
        let reference = if image.contains('/') {
            format!("docker.io/{image}")
        } else {
            format!("docker.io/library/{image}")
        };
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Command::new("ctr")
            .args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"])
            .args(["images", "import", "-"])
            .stdin(save.stdout.take().unwrap())
            .output()
            .unwrap();
        // Either failing fails the other (a broken pipe, or a truncated archive): both are told.
        let saved = save.wait().unwrap();
        assert!(
            saved.success() && out.status.success(),
            "docker save {image} | ctr images import: docker save {saved}, ctr {out:?} \
             (is the disk full? df: {})",
            String::from_utf8_lossy(
                &Command::new("df")
                    .arg("-h")
                    .arg("/")
                    .output()
                    .unwrap()
                    .stdout
            )
        );
        let id = format!(
            "{:064x}",
            (u128::from(std::process::id()) << 64) | u128::from(n)
        );
        let _ = ctr(&["task", "kill", "-s", "KILL", &id]);
        let _ = ctr(&["task", "delete", "-f", &id]);
        let _ = ctr(&["container", "delete", &id]);
        let mut args: Vec<&str> = vec!["run", "-d"];
        args.extend(options.iter().map(String::as_str));
        args.extend([reference.as_str(), id.as_str()]);
        args.extend(argv);
        let out = ctr(&args);
        assert!(out.status.success(), "ctr run: {out:?}");
        PodContainer { id }
    }

    /// The host pid of its main process.
    pub fn pid(&self) -> u32 {
        let out = ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&self.id))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no task {}: {out:?}", self.id))
    }
}

impl Drop for PodContainer {
    fn drop(&mut self) {
        let _ = ctr(&["task", "kill", "-s", "KILL", &self.id]);
        std::thread::sleep(Duration::from_millis(200));
        let _ = ctr(&["task", "delete", "-f", &self.id]);
        let _ = ctr(&["container", "delete", &self.id]);
    }
}
