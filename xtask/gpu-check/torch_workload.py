"""The gpu-check PyTorch workload: known work through PyTorch's caching allocator.

    python torch_workload.py --model NAME --launches N   allocations, copies both ways,
        N small elementwise kernels, synchronisations; prints "done stats=<json>" with the
        allocator's own counts (torch.cuda.memory_stats) and what was asked
    python torch_workload.py --model NAME --bench         (SECONDS from the environment) a
        launch-bound loop: 32 tiny kernels, a synchronisation, again; prints per_second

Like the C workload: "ready" once torch is imported (no CUDA call yet, so the probes can
attach first), the work on a line from stdin, then it waits for stdin to close."""
import argparse
import json
import os
import sys
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--launches", type=int, default=2000)
p.add_argument("--bench", action="store_true")
args = p.parse_args()
print("ready", flush=True)
sys.stdin.readline()

if args.bench:
    x = torch.zeros(1024, device="cuda")
    torch.cuda.synchronize()
    seconds, n, start = float(os.environ.get("SECONDS", "5")), 0, time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(32):
            x.add_(1)
        torch.cuda.synchronize()
        n += 32
    print(f"done errors=0 per_second={n / (time.monotonic() - start):.1f}", flush=True)
else:
    held = [torch.empty((1 << 20) * (i + 1), dtype=torch.uint8, device="cuda") for i in range(8)]
    host = torch.randn(1 << 20)  # 4 MiB of float32
    dev = host.cuda()
    back = dev.cpu()
    x = torch.zeros(1024, device="cuda")
    for _ in range(args.launches):
        x.add_(1)
    syncs = 5
    for _ in range(syncs):
        torch.cuda.synchronize()
    assert float(x[0]) == args.launches and torch.equal(back, host)
    s = torch.cuda.memory_stats()
    stats = {
        "segment.all.allocated": s["segment.all.allocated"],
        "reserved_bytes.all.allocated": s["reserved_bytes.all.allocated"],
        "h2d_bytes": host.numel() * host.element_size(),
        "d2h_bytes": dev.numel() * dev.element_size(),
        "syncs": syncs,
        "launches": args.launches,
    }
    print("done errors=0 stats=" + json.dumps(stats, separators=(",", ":")), flush=True)
for _ in sys.stdin:
    pass
