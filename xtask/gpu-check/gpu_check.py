#!/usr/bin/env python3
"""The runner of `cargo xtask gpu-check`: runs llmscope against known CUDA work and compares
what it exports with what was done and with what the driver says, then writes a markdown
report (each check with expected, seen and result) and exits 1 if any check failed.

Two modes, the same checks:
  on a GPU machine (nvidia-smi answers): the real driver, libcudart and NVML; the workload is
    compiled with nvcc (-cudart shared); PyTorch is used where `--python` has it;
  --doubles: the test doubles of libcudart, libcuda and NVML (what `cargo xtask test` runs,
    so this harness cannot rot between GPU runs); the workload is compiled as C by gcc.

Python 3 standard library only: the GPU machines have nothing else to install from."""
import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PASS, FAIL, SKIP, MEASURED = "PASS", "FAIL", "SKIP", "MEASURED"
# The workload is named like an LLM server so that llmscope tracks it from its exec.
WORKLOAD_ARGV = ["-m", "/models/gpu-check.gguf"]
MODEL = "gpu-check"
COUNTS = {"ALLOCS": 8, "ALLOC_BYTES": 1 << 20, "LAUNCHES": 1000, "COPY_BYTES": 65536,
          "H2D_COPIES": 3, "D2H_COPIES": 2, "D2D_COPIES": 1, "SYNCS": 10}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(seconds, f, every=0.05):
    end = time.monotonic() + seconds
    while True:
        v = f()
        if v or time.monotonic() > end:
            return v
        time.sleep(every)


LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text):
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


class Agent:
    """llmscope on a free port, its log in `log`; stopped with SIGTERM."""

    def __init__(self, binary, args, env, log):
        self.port = free_port()
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([binary, "--web.listen-address", f"127.0.0.1:{self.port}", *args],
                                     env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(60, lambda: self.get("/healthz") is not None, 0.1):
            self.stop()
            raise RuntimeError(f"llmscope did not start; its log:\n{open(log).read()}")

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None

    def metrics(self):
        return parse_exposition(self.get("/metrics") or "")

    def value(self, name, **labels):
        """The sum of the samples of `name` with these labels; None when there are none."""
        found = [v for n, l, v in self.metrics() if n == name and all(l.get(k) == str(x) for k, x in labels.items())]
        return sum(found) if found else None

    def series(self, name, **labels):
        return [(l, v) for n, l, v in self.metrics() if n == name and all(l.get(k) == str(x) for k, x in labels.items())]

    def probed(self, seconds=20):
        """Waits until a CUDA library is probed (calls made before that are not seen)."""
        return wait_for(seconds, lambda: sum(v for n, _, v in self.metrics() if n == "llmscope_cuda_libraries") >= 1, 0.1)

    def tracked(self, pid):
        doc = json.loads(self.get("/api/processes") or "[]")
        entries = doc if isinstance(doc, list) else doc.get("processes", [])
        return next((p for p in entries if str(p.get("pid")) == str(pid)), None)

    def cpu_seconds(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def log_text(self):
        """The log so far, without terminal colours."""
        self.log.flush()
        return re.sub(r"\x1b\[[0-9;]*m", "", open(self.log_path, errors="replace").read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Workload:
    """The compiled workload (or the PyTorch one): "ready", then its plan on a line from us."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env={**os.environ, **{k: str(v) for k, v in env.items()}},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"workload {argv[0]} did not start: {ready!r}")

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if not line.startswith("done"):
            raise RuntimeError(f"workload failed: {line!r}")
        return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Report:
    def __init__(self):
        self.rows = []

    def add(self, check, expected, seen, result, note=""):
        self.rows.append((check, expected, seen, result, note))
        print(f"[{result}] {check}: expected {expected}; seen {seen}" + (f" ({note})" if note else ""), flush=True)

    def exact(self, check, expected, seen):
        self.add(check, expected, seen, PASS if seen == expected else FAIL)

    def failed(self):
        return any(r[3] == FAIL for r in self.rows)

    def markdown(self, header):
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
        lines = [f"# llmscope gpu-check — {header['mode']}", ""]
        lines += [f"- **{k}**: {cell(v)}" for k, v in header.items() if k != "mode"]
        lines += ["", "| check | expected | seen | result | note |", "| --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        counts = {r: sum(1 for row in self.rows if row[3] == r) for r in (PASS, FAIL, SKIP, MEASURED)}
        lines += ["", ", ".join(f"{n} {r.lower()}" for r, n in counts.items())]
        return "\n".join(lines) + "\n"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def nvidia_smi(*query):
    r = run(["nvidia-smi", *query, "--format=csv,noheader,nounits"]) if shutil.which("nvidia-smi") else None
    if not r or r.returncode != 0:
        return None
    return [[f.strip() for f in line.split(",")] for line in r.stdout.strip().splitlines() if line.strip()]


def compile_workload(args, work):
    """The workload binary, named like llama.cpp's server; (path, how)."""
    out = os.path.join(work, "llama-server")
    src = os.path.join(HERE, "workload.cu")
    if args.doubles:
        cudart = os.path.abspath(args.cudart)
        r = run(["gcc", "-O2", "-x", "c", src, "-o", out, f"-L{os.path.dirname(cudart)}",
                 f"-l:{os.path.basename(cudart)}", f"-Wl,-rpath,{os.path.dirname(cudart)}"])
        how = f"gcc -x c against {cudart}"
    else:
        nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
        if not nvcc:
            return None, "no nvcc on this machine"
        r = run([nvcc, "-O2", "-cudart", "shared", "-o", out, src])
        how = f"{nvcc} -cudart shared"
    if r.returncode != 0:
        return None, f"{how} failed: {r.stderr.strip()[-500:]}"
    return out, how


def kernel_facts():
    tracefs = next((p for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing") if os.path.exists(os.path.join(p, "events"))), None)
    return {
        "BTF (/sys/kernel/btf/vmlinux)": os.path.exists("/sys/kernel/btf/vmlinux"),
        "tracefs": tracefs or False,
        "uprobes": bool(tracefs) and os.path.exists(os.path.join(tracefs, "uprobe_events")),
    }


def tracked(report, agent, w, what):
    """Waits until the agent tracks workload `w`; a FAIL row when it never does."""
    if wait_for(10, lambda: agent.tracked(w.pid), 0.05):
        return True
    report.add(f"{what}: tracked by the agent", f"pid {w.pid} in /api/processes", "never", FAIL)
    return False


def check_nvml(report, agent, args, hold):
    """1. Device and per-process memory: llmscope (NVML) against nvidia-smi, or against the
    values the NVML double serves."""
    if args.doubles:
        values = open(args.nvml_values).read()
        gpu = dict(kv.split("=", 1) for kv in values.splitlines()[0].split()[1:])
        smi_total, smi_used, smi_temp = int(gpu["total"]), int(gpu["used"]), float(gpu["temp"])
        proc = next(line for line in values.splitlines() if line.startswith("proc"))
        smi_proc = int(dict(kv.split("=", 1) for kv in proc.split()[1:])["used"])
        source = "the NVML double's values"
    else:
        row = nvidia_smi("--query-gpu=index,memory.total,memory.used,temperature.gpu")[0]
        smi_total, smi_used, smi_temp = int(row[1]) << 20, int(row[2]) << 20, float(row[3])
        apps = nvidia_smi("--query-compute-apps=pid,used_memory") or []
        smi_proc = next((int(a[1]) << 20 for a in apps if a[0] == str(hold.pid)), None)
        source = "nvidia-smi"
    # The device series appear with the NVML collector's first reading, which may come after
    # the workload is tracked (NVML's initialisation alone can take seconds on a GPU node).
    total = wait_for(10, lambda: agent.value("nvidia_gpu_memory_total_bytes", gpu=0), 0.2)
    used = agent.value("nvidia_gpu_memory_used_bytes", gpu=0)
    temp = agent.value("nvidia_gpu_temperature", gpu=0)
    mib = lambda b: "—" if b is None else f"{b / 1048576:.0f} MiB"
    report.add("NVML: GPU 0 memory total", f"{mib(smi_total)} ({source})", mib(total),
               PASS if total is not None and abs(total - smi_total) <= 1 << 20 else FAIL)
    # Used memory and temperature move between the two readings.
    report.add("NVML: GPU 0 memory used", f"{mib(smi_used)} ±256 MiB ({source})", mib(used),
               PASS if used is not None and abs(used - smi_used) <= 256 << 20 else FAIL)
    report.add("NVML: GPU 0 temperature", f"{smi_temp:.0f} °C ±3 ({source})", "—" if temp is None else f"{temp:.0f} °C",
               PASS if temp is not None and abs(temp - smi_temp) <= 3 else FAIL)
    seen = wait_for(10, lambda: agent.value("llm_process_gpu_memory_bytes", pid=hold.pid), 0.2)
    report.add("NVML: per-process GPU memory of the holding workload", f"{mib(smi_proc)} ±16 MiB ({source})", mib(seen),
               PASS if seen is not None and smi_proc is not None and abs(seen - smi_proc) <= 16 << 20 else FAIL,
               "includes the CUDA context, unlike the live-allocation count below")
    held = COUNTS["ALLOCS"] * COUNTS["ALLOC_BYTES"]
    live = wait_for(10, lambda: agent.value("llm_process_cuda_device_memory_bytes", pid=hold.pid), 0.2)
    report.exact("CUDA: live device memory of the holding workload (uprobes)", held, None if live is None else int(live))


def check_counts(report, agent, binary, env):
    """2 and 3. Exact runtime counts at --cuda-overhead-budget 100, and the driver layer."""
    w = Workload([binary, *WORKLOAD_ARGV], {**env, "MODE": "counts", **COUNTS})
    if not tracked(report, agent, w, "counts workload"):
        return w.close()
    done = w.go()
    c = COUNTS
    expected = {
        ("llm_process_cuda_alloc_bytes_total", ()): c["ALLOCS"] * c["ALLOC_BYTES"],
        ("llm_process_cuda_free_total", ()): c["ALLOCS"],
        ("llm_process_cuda_kernel_launches_total", ()): c["LAUNCHES"],
        ("llm_process_cuda_memcpy_bytes_total", (("direction", "h2d"),)): c["H2D_COPIES"] * c["COPY_BYTES"],
        ("llm_process_cuda_memcpy_bytes_total", (("direction", "d2h"),)): c["D2H_COPIES"] * c["COPY_BYTES"],
        ("llm_process_cuda_memcpy_bytes_total", (("direction", "d2d"),)): c["D2D_COPIES"] * c["COPY_BYTES"],
        ("llm_process_cuda_calls_total", (("function", "cudaDeviceSynchronize"),)): c["SYNCS"],
        ("llm_process_cuda_calls_total", (("function", "cudaMalloc"),)): c["ALLOCS"],
    }
    seen = lambda: {k: agent.value(k[0], pid=w.pid, api="runtime", **dict(k[1])) for k in expected}
    got = wait_for(10, lambda: (lambda s: s if s == expected else None)(seen()), 0.2) or seen()
    report.exact("workload: CUDA calls that failed", "0", done.get("errors"))
    for (name, labels), want in expected.items():
        label = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
        report.exact(f"CUDA (runtime): {label}", want, None if got[(name, labels)] is None else int(got[(name, labels)]))
    live = agent.value("llm_process_cuda_device_memory_bytes", pid=w.pid)
    report.exact("CUDA: live device memory after every free", 0, None if live is None else int(live))
    # 3. Runtime versus driver: what the driver probes saw of the same calls.
    driver = {l.get("function"): int(v) for l, v in agent.series("llm_process_cuda_calls_total", pid=w.pid, api="driver") if v}
    runtime_exact = all(got[k] == v for k, v in expected.items())
    report.add("runtime vs driver: driver probes on the same calls; no runtime total counts one twice",
               "runtime totals exact; driver calls counted apart (api=\"driver\")",
               (", ".join(f"{f}×{n}" for f, n in sorted(driver.items())) or "no driver call seen") + "; runtime totals " + ("exact" if runtime_exact else "off"),
               PASS if runtime_exact else FAIL, "the dashboards and rules never add the two layers")
    w.close()


def check_oom(report, agent, binary, env):
    """5. A real out-of-memory: the counter and the log line. (The libcudart double fails
    allocations with the code FAKE_CUDA_MALLOC_RC names; the real one ignores it.)"""
    w = Workload([binary, *WORKLOAD_ARGV], {**env, "MODE": "oom", "FAKE_CUDA_MALLOC_RC": 2})
    if not tracked(report, agent, w, "OOM workload"):
        return w.close()
    done = w.go()
    oom = wait_for(10, lambda: agent.value("llm_process_cuda_oom_total", pid=w.pid), 0.2)
    report.add("OOM: cudaMalloc of 64 TiB fails with cudaErrorMemoryAllocation", "2", done.get("first_error"),
               PASS if done.get("first_error") == "2" else FAIL)
    report.exact("OOM: llm_process_cuda_oom_total", 1, None if oom is None else int(oom))
    logged = wait_for(5, lambda: any("CUDA out of memory" in l and f"pid={w.pid}" in l for l in agent.log_text().splitlines()), 0.2)
    report.add("OOM: the agent logs it", f"a 'CUDA out of memory' line with pid={w.pid}", "logged" if logged else "not logged", PASS if logged else FAIL)
    w.close()


def check_torch(report, agent, args, env):
    """4. PyTorch's caching allocator and kernels against llmscope's counts."""
    python = args.python
    if not python or run([python, "-c", "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"]).returncode != 0:
        report.add("PyTorch: allocations, launches, copies", "—", "—", SKIP, f"no PyTorch with CUDA ({python or 'no --python'})")
        return
    n = 2000
    w = Workload([python, os.path.join(HERE, "torch_workload.py"), "--model", MODEL + "-torch", "--launches", str(n)], env)
    # `import torch` mapped libcudart: give the probes a moment to attach before any call.
    id_ = wait_for(15, lambda: agent.tracked(w.pid), 0.1) or {}
    time.sleep(1)
    stats = json.loads(w.go()["stats"])
    report.add("PyTorch: classified, with its model", "framework pytorch, model " + MODEL + "-torch",
               f"framework {id_.get('framework')}, model {id_.get('model_name')}",
               PASS if id_.get("framework") == "pytorch" and id_.get("model_name") == MODEL + "-torch" else FAIL)
    calls = lambda f: int(agent.value("llm_process_cuda_calls_total", pid=w.pid, api="runtime", function=f) or 0)
    segments, reserved = stats["segment.all.allocated"], stats["reserved_bytes.all.allocated"]
    alloc_bytes = int(agent.value("llm_process_cuda_alloc_bytes_total", pid=w.pid, api="runtime") or 0)
    report.add("PyTorch: cudaMalloc calls vs the caching allocator's segments", f"≥ {segments}", calls("cudaMalloc"),
               PASS if calls("cudaMalloc") >= segments else FAIL, "libraries (cuBLAS) may allocate besides the allocator")
    report.add("PyTorch: bytes allocated vs reserved by the allocator", f"≥ {reserved}", alloc_bytes, PASS if alloc_bytes >= reserved else FAIL)
    # The layers are never added (a runtime launch may reach a probed driver function too).
    launches = int(agent.value("llm_process_cuda_kernel_launches_total", pid=w.pid, api="runtime") or 0)
    driver = int(agent.value("llm_process_cuda_kernel_launches_total", pid=w.pid, api="driver") or 0)
    report.add("PyTorch: runtime kernel launches for N elementwise kernels", f"N={n} to N+10%+200", launches,
               PASS if n <= launches <= n * 1.1 + 200 else FAIL, f"driver-layer launches seen: {driver}")
    h2d = int(agent.value("llm_process_cuda_memcpy_bytes_total", pid=w.pid, direction="h2d") or 0)
    d2h = int(agent.value("llm_process_cuda_memcpy_bytes_total", pid=w.pid, direction="d2h") or 0)
    report.add("PyTorch: copies both ways", f"h2d ≥ {stats['h2d_bytes']}, d2h ≥ {stats['d2h_bytes']}", f"h2d {h2d}, d2h {d2h}",
               PASS if h2d >= stats["h2d_bytes"] and d2h >= stats["d2h_bytes"] else FAIL)
    syncs = sum(int(v) for l, v in agent.series("llm_process_cuda_calls_total", pid=w.pid) if "ynchronize" in l.get("function", ""))
    report.add("PyTorch: synchronisations", f"≥ {stats['syncs']}", syncs, PASS if syncs >= stats["syncs"] else FAIL)
    w.close()


def bench_round(argv, env, seconds):
    w = Workload(argv, {**env, "MODE": "bench", "SECONDS": seconds})
    time.sleep(0.5)
    done = w.go()
    w.close()
    return float(done["per_second"])


def check_overhead(report, args, binary, env, agent_args, agent_env, work):
    """6. The launch-bound loop with and without the agent at default settings, alternating:
    PyTorch's where it is there, else the C workload's."""
    torch = args.python and run([args.python, "-c", "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"]).returncode == 0
    if torch:
        argv, what = [args.python, os.path.join(HERE, "torch_workload.py"), "--model", MODEL + "-torch", "--bench"], "PyTorch"
    else:
        argv, what = [binary, *WORKLOAD_ARGV], "C workload"
    if args.doubles:
        # The double's launches cost nothing: let each synchronisation wait 100 µs, as a GPU
        # finishing 32 small kernels would, or the ratio measures only the probes.
        env = {**env, "FAKE_CUDA_SYNC_US": 100}
        what += ", double: 100 µs a synchronisation"
    with_agent, without, duty = [], [], []
    for i in range(args.rounds):
        without.append(bench_round(argv, env, args.bench_seconds))
        agent = Agent(args.agent, agent_args, agent_env, os.path.join(work, f"bench-agent-{i}.log"))
        try:
            with_agent.append(bench_round(argv, env, args.bench_seconds))
            duty.append(agent.value("llmscope_cuda_launch_probe_duty_ratio") or 0.0)
        finally:
            agent.stop()
    ratio = statistics.median(with_agent) / statistics.median(without)
    report.add(f"launch-bound loop ({what}): throughput with / without the agent (default settings)", "≥ 0.98 (benchmark goal)",
               f"{ratio:.3f} (median of {args.rounds} alternating rounds of {args.bench_seconds} s; launch-probe duty {statistics.median(duty):.3f})",
               MEASURED, f"launches/s without {statistics.median(without):.0f}, with {statistics.median(with_agent):.0f}")


def check_exec_latency(report, agent, binary, env, n=20):
    """7. Exec → visible in /api/processes."""
    seen = []
    for _ in range(n):
        start = time.monotonic()
        w = Workload([binary, *WORKLOAD_ARGV], env)
        if wait_for(5, lambda: agent.tracked(w.pid), 0.002):
            seen.append((time.monotonic() - start) * 1000)
        w.close()
    if not seen:
        report.add("exec → visible in /api/processes", f"{n} processes seen", "none", FAIL)
        return
    seen.sort()
    report.add("exec → visible in /api/processes", f"{n} processes seen", f"{len(seen)} seen; p50 {seen[len(seen) // 2]:.1f} ms, max {seen[-1]:.1f} ms",
               MEASURED if len(seen) == n else FAIL)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", required=True, help="the llmscope binary")
    p.add_argument("--out", required=True, help="directory for the report, logs and builds")
    p.add_argument("--doubles", action="store_true", help="run against the test doubles (no GPU)")
    p.add_argument("--cudart", help="--doubles: the libcudart.so.12 double to link the workload against")
    p.add_argument("--cuda-driver", help="--doubles: the libcuda.so.1 double the runtime double calls into")
    p.add_argument("--nvml-lib", help="NVML library for the agent (--doubles: the NVML double)")
    p.add_argument("--python", default="/opt/torch/.venv/bin/python" if os.path.exists("/opt/torch/.venv/bin/python") else None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bench-seconds", type=int, default=5)
    args = p.parse_args()
    work = os.path.abspath(args.out)
    os.makedirs(work, exist_ok=True)
    if not args.doubles and nvidia_smi("--query-gpu=name") is None:
        sys.exit("nvidia-smi does not answer: no GPU here (run with --doubles and the test doubles)")
    report = Report()
    header = {"mode": "test doubles (no GPU)" if args.doubles else "real GPU", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "kernel": platform.release(), "host": f"{os.cpu_count()} CPUs"}
    if not args.doubles:
        gpu = nvidia_smi("--query-gpu=name,driver_version")[0]
        header.update({"GPU": gpu[0], "driver": gpu[1]})
        cuda = re.search(r"CUDA Version: ([\d.]+)", run(["nvidia-smi"]).stdout)
        header["CUDA (driver API)"] = cuda.group(1) if cuda else "?"
    facts = kernel_facts()
    header.update({k: v for k, v in facts.items()})
    for k, v in facts.items():
        report.add(f"kernel: {k}", "present", v, PASS if v else FAIL)

    binary, how = compile_workload(args, work)
    header["workload"] = how
    env = {}
    agent_env = {}
    if args.doubles:
        env["FAKE_CUDART_DRIVER"] = os.path.abspath(args.cuda_driver)
        values = os.path.join(work, "nvml-values")
        args.nvml_values = values
        agent_env["LLMSCOPE_FAKE_NVML"] = values
    base_args = ["--rescan-interval", "1h", "--nvml-interval", "500ms"] + (["--nvml-lib", args.nvml_lib] if args.nvml_lib else [])
    if binary is None:
        report.add("workload: compiled", "built", how, FAIL)
    else:
        hold = Workload([binary, *WORKLOAD_ARGV], {**env, "MODE": "counts", **COUNTS, "LAUNCHES": 0, "SYNCS": 1, "NO_FREE": 1})
        if args.doubles:
            held = COUNTS["ALLOCS"] * COUNTS["ALLOC_BYTES"]
            with open(values, "w") as f:
                f.write(f"gpu name=NVIDIA_H100_80GB_HBM3 uuid=GPU-0 total=85899345920 used=21474836480 util=63 mem_util=31 temp=66 power_mw=412000 extended=1\n"
                        f"proc gpu=0 pid={hold.pid} used={held + (500 << 20)} sm=58 mem=22\n")
        agent = Agent(args.agent, base_args + ["--cuda-overhead-budget", "100"], agent_env, os.path.join(work, "agent.log"))
        cpu0, t0 = agent.cpu_seconds(), time.monotonic()
        try:
            probed = agent.probed()
            report.add("agent: libcudart probed", "uprobes attached", "attached" if probed else "not attached", PASS if probed else FAIL)
            tracked(report, agent, hold, "holding workload")
            hold.go()
            check_nvml(report, agent, args, hold)
            check_counts(report, agent, binary, env)
            check_torch(report, agent, args, env)
            check_oom(report, agent, binary, env)
            check_exec_latency(report, agent, binary, env)
            cpu = (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            report.add("agent: CPU and peak RSS during the checks", "—", f"{cpu * 100:.1f} % of a core, peak RSS {agent.peak_rss() / 1048576:.1f} MiB", MEASURED)
        finally:
            hold.close()
            agent.stop()
        check_overhead(report, args, binary, env, base_args, agent_env, work)
    with open(os.path.join(work, "report.md"), "w") as f:
        f.write(report.markdown(header))
    print(f"report: {os.path.join(work, 'report.md')}")
    sys.exit(1 if report.failed() else 0)


if __name__ == "__main__":
    main()
