#!/usr/bin/env python3
"""Generates llmscope's Grafana dashboards (the JSON files beside this script).

    python3 dashboards/generate.py            # rewrite the JSON files
    python3 dashboards/generate.py --check    # exit 1 when a JSON file is not what it generates

The dashboards are code so that every panel follows the same rules — a unit on every panel,
thresholds in the original monitor's Forest Green palette, the same variables everywhere —
and so that the tests can list every query (`cargo xtask test` evaluates each one against a
real Prometheus scraping the agent and must get data back).
"""
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).parent

# The original monitor's Forest Green palette.
GREEN = "#27AE60"
DARK_GREEN = "#1E8449"
LIGHT_GREEN = "#58D68D"
YELLOW = "#F1C40F"
ORANGE = "#E67E22"
RED = "#E74C3C"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROC = 'instance=~"$instance",framework=~"$framework",model_name=~"$model_name",pid=~"$pid"'
NODE = 'instance=~"$instance"'
MODEL = 'model_name=~"$model_name"'


def thresholds(warn=None, crit=None, base=GREEN):
    steps = [{"color": base, "value": None}]
    if warn is not None:
        steps.append({"color": YELLOW, "value": warn})
    if crit is not None:
        steps.append({"color": RED, "value": crit})
    return {"mode": "absolute", "steps": steps}


class Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns."""

    def __init__(self):
        self.x, self.y, self.row_height = 0, 0, 0

    def place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos


def target(expr, legend="", ref="A", instant=False, fmt="time_series"):
    t = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": not instant, "instant": instant}
    if fmt != "time_series":
        t["format"] = fmt
    return t


def panel(layout, kind, title, targets, unit, w=12, h=8, warn=None, crit=None, description="", decimals=None, extra=None):
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": layout.place(w, h),
        "targets": [targets] if isinstance(targets, dict) else targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds" if kind in ("stat", "gauge", "bargauge") else "palette-classic"},
                "thresholds": thresholds(warn, crit),
            },
            "overrides": [],
        },
        "options": {},
    }
    if decimals is not None:
        p["fieldConfig"]["defaults"]["decimals"] = decimals
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 2, "fillOpacity": 12, "showPoints": "never", "thresholdsStyle": {"mode": "off" if warn is None else "line"}}
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}, "tooltip": {"mode": "multi"}}
    if kind == "stat":
        p["options"] = {"colorMode": "background", "graphMode": "area", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    if extra:
        p.update(extra)
    return p


def variable(name, label, query, multi=True):
    return {
        "type": "query", "name": name, "label": label, "datasource": DATASOURCE,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": multi, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


DATASOURCE_VARIABLE = {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus", "current": {}, "hide": 0}
PROCESS_VARIABLES = [
    DATASOURCE_VARIABLE,
    variable("instance", "Node", "label_values(llmscope_build_info, instance)"),
    variable("framework", "Framework", 'label_values(llm_process_count{instance=~"$instance"}, framework)'),
    variable("model_name", "Model", 'label_values(llm_process_count{instance=~"$instance",framework=~"$framework"}, model_name)'),
    variable("pid", "PID", 'label_values(llm_process_memory_bytes{instance=~"$instance",framework=~"$framework",model_name=~"$model_name"}, pid)'),
]


def dashboard(uid, title, description, panels, variables=PROCESS_VARIABLES):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["llmscope", "llm", "gpu"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "style": "dark",
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "links": [{"title": "llmscope", "type": "dashboards", "tags": ["llmscope"], "asDropdown": True}],
        "panels": panels,
    }


def overview():
    l = Layout()
    return dashboard("llmscope-overview", "llmscope / Overview", "LLM processes, GPU memory and health at a glance.", [
        panel(l, "stat", "Active LLM processes", target(f'sum(llm_process_count{{instance=~"$instance",framework=~"$framework",model_name=~"$model_name"}})'), "short", w=6, h=5, decimals=0),
        panel(l, "stat", "GPU memory used", target(f"sum(nvidia_gpu_memory_used_bytes{{{NODE}}})"), "bytes", w=6, h=5),
        panel(l, "stat", "Hottest GPU", target(f"max(nvidia_gpu_temperature{{{NODE}}})"), "celsius", w=6, h=5, warn=75, crit=85),
        panel(l, "stat", "Average GPU utilisation", target(f"avg(nvidia_gpu_utilization{{{NODE}}})"), "percent", w=6, h=5, warn=85, crit=97),
        panel(l, "table", "LLM processes", [
            target(f"llm_process_cpu_percent{{{PROC}}}", ref="A", instant=True, fmt="table"),
            target(f"llm_process_memory_bytes{{{PROC}}}", ref="B", instant=True, fmt="table"),
            target(f"sum by (instance, pid) (llm_process_gpu_memory_bytes{{{PROC}}})", ref="C", instant=True, fmt="table"),
        ], "short", w=24, h=10, description="One row per process: CPU (percent of a core), resident memory and GPU memory.", extra={
            "transformations": [
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {
                    "excludeByName": {"Time": True, "__name__": True, "job": True},
                    "renameByName": {"Value #A": "CPU %", "Value #B": "RSS", "Value #C": "GPU memory", "model_name": "model", "llm_type": "family"},
                }},
            ],
            "fieldConfig": {"defaults": {"unit": "short", "thresholds": thresholds(), "color": {"mode": "thresholds"}}, "overrides": [
                {"matcher": {"id": "byName", "options": "RSS"}, "properties": [{"id": "unit", "value": "bytes"}]},
                {"matcher": {"id": "byName", "options": "GPU memory"}, "properties": [{"id": "unit", "value": "bytes"}]},
                {"matcher": {"id": "byName", "options": "CPU %"}, "properties": [{"id": "unit", "value": "percent"}]},
            ]},
        }),
        # Fleet: every node the variable selects, side by side (Prometheus or a fleet-scale
        # store such as VictoriaMetrics behind the data source).
        panel(l, "bargauge", "Fleet: top models by GPU memory", target(f"topk(10, sum by (model_name) (llm_process_gpu_memory_bytes{{{NODE}}}))", "{{model_name}}", instant=True), "bytes", w=8, h=8, extra={"options": {"orientation": "horizontal", "displayMode": "gradient", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}),
        panel(l, "bargauge", "Fleet: CUDA OOMs per node (range)", target(f"sum by (instance) (increase(llm_process_cuda_oom_total{{{NODE}}}[$__range]))", "{{instance}}", instant=True), "short", w=8, h=8, warn=1, crit=1, decimals=0, extra={"options": {"orientation": "horizontal", "displayMode": "gradient", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}),
        panel(l, "timeseries", "Fleet: GPU memory used per node", target(f"sum by (instance) (nvidia_gpu_memory_used_bytes{{{NODE}}})", "{{instance}}"), "bytes", w=8, h=8),
        panel(l, "timeseries", "LLM processes by framework", target(f'sum by (framework) (llm_process_count{{instance=~"$instance",framework=~"$framework",model_name=~"$model_name"}})', "{{framework}}"), "short", decimals=0),
        panel(l, "timeseries", "GPU memory by model", target(f"sum by (model_name) (llm_process_gpu_memory_bytes{{{PROC}}})", "{{model_name}}"), "bytes"),
    ])


def processes():
    l = Layout()
    legend = "{{name}} {{pid}} · {{model_name}}"
    return dashboard("llmscope-processes", "llmscope / Processes", "CPU, memory, GPU memory and utilisation per LLM process over time.", [
        panel(l, "timeseries", "CPU", target(f"llm_process_cpu_percent{{{PROC}}}", legend), "percent", warn=90, description="Percent of one core."),
        panel(l, "timeseries", "Resident memory", target(f"llm_process_memory_bytes{{{PROC}}}", legend), "bytes"),
        panel(l, "timeseries", "GPU memory (NVML)", target(f"llm_process_gpu_memory_bytes{{{PROC}}}", legend + " · GPU {{gpu}}"), "bytes"),
        panel(l, "timeseries", "GPU utilisation (SM)", target(f"llm_process_gpu_utilization{{{PROC}}}", legend + " · GPU {{gpu}}"), "percent", warn=90),
        panel(l, "timeseries", "Framework allocated vs reserved (gpu-info)", [
            target(f"llm_process_gpu_memory_allocated_bytes{{{PROC}}}", "allocated " + legend, "A"),
            target(f"llm_process_gpu_memory_reserved_bytes{{{PROC}}}", "reserved " + legend, "B"),
        ], "bytes", description="What the process reports its framework holds; reserved − allocated is cache and fragmentation."),
        panel(l, "timeseries", "Threads", target(f"llm_process_threads{{{PROC}}}", legend), "short", decimals=0),
    ])


def cuda():
    l = Layout()
    legend = "{{name}} {{pid}} · {{model_name}}"
    # Runtime calls reach the driver too: the layers are charted apart, never added.
    api_legend = legend + " · {{api}}"
    return dashboard("llmscope-cuda", "llmscope / CUDA", "What each process asks of the GPU, counted by eBPF uprobes on libcudart and libcuda.", [
        panel(l, "timeseries", "Kernel launches", target(f"sum by (instance, pid, name, model_name, api) (rate(llm_process_cuda_kernel_launches_total{{{PROC}}}[$__rate_interval]))", api_legend), "ops", description="Extrapolated when the launch probes are duty-cycled (llmscope_cuda_launch_counting)."),
        panel(l, "timeseries", "Allocation rate", target(f"sum by (instance, pid, name, model_name, api) (rate(llm_process_cuda_alloc_bytes_total{{{PROC}}}[$__rate_interval]))", api_legend), "Bps"),
        panel(l, "timeseries", "Live device memory", target(f"llm_process_cuda_device_memory_bytes{{{PROC}}}", legend), "bytes", description="From allocation/free pairs; a steady climb is a leak."),
        panel(l, "timeseries", "Memcpy throughput by direction", target(f"sum by (api, direction) (rate(llm_process_cuda_memcpy_bytes_total{{{PROC}}}[$__rate_interval]))", "{{api}} {{direction}}"), "Bps"),
        panel(l, "timeseries", "Sync stall ratio", target(f"sum by (instance, pid, name, model_name, api) (rate(llm_process_cuda_sync_seconds_total{{{PROC}}}[$__rate_interval]))", api_legend), "percentunit", warn=0.3, crit=0.6, description="Seconds per second the CPU waited in synchronize calls."),
        panel(l, "timeseries", "CUDA errors", target(f"sum by (api, function, code) (rate(llm_process_cuda_errors_total{{{PROC}}}[$__rate_interval]))", "{{function}} → {{code}}"), "ops", warn=0.01),
        panel(l, "stat", "OOM events (range)", target(f"sum(increase(llm_process_cuda_oom_total{{{PROC}}}[$__range]))"), "short", w=8, h=6, warn=1, crit=1, decimals=0),
        panel(l, "stat", "Uprobe attachments", target(f"sum(llmscope_uprobe_attachments{{{NODE}}})"), "short", w=8, h=6, decimals=0),
        panel(l, "stat", "Launch-probe duty", target(f"avg(llmscope_cuda_launch_probe_duty_ratio{{{NODE}}})"), "percentunit", w=8, h=6),
    ])


def gpus():
    l = Layout()
    legend = "GPU {{gpu}} · {{name}}"
    return dashboard("llmscope-gpus", "llmscope / GPU devices", "Utilisation, memory, temperature, power, clocks, throttling, ECC and PCIe per GPU (NVML).", [
        panel(l, "timeseries", "Utilisation", target(f"nvidia_gpu_utilization{{{NODE}}}", legend), "percent", warn=85, crit=97),
        panel(l, "timeseries", "Memory used", [
            target(f"nvidia_gpu_memory_used_bytes{{{NODE}}}", "used " + legend, "A"),
            target(f"nvidia_gpu_memory_total_bytes{{{NODE}}}", "total " + legend, "B"),
        ], "bytes"),
        panel(l, "timeseries", "Temperature", target(f"nvidia_gpu_temperature{{{NODE}}}", legend), "celsius", warn=75, crit=85),
        panel(l, "timeseries", "Power vs limit", [
            target(f"nvidia_gpu_power_usage{{{NODE}}}", "draw " + legend, "A"),
            target(f"nvidia_gpu_power_limit{{{NODE}}}", "limit " + legend, "B"),
        ], "watt"),
        panel(l, "timeseries", "Clocks", [
            target(f"nvidia_gpu_sm_clock_hertz{{{NODE}}}", "SM " + legend, "A"),
            target(f"nvidia_gpu_memory_clock_hertz{{{NODE}}}", "memory " + legend, "B"),
        ], "hertz"),
        panel(l, "timeseries", "Throttle reasons active", target(f"nvidia_gpu_throttle_reason{{{NODE}}} == 1", "{{kind}} · GPU {{gpu}}"), "bool_on_off"),
        panel(l, "timeseries", "ECC errors", target(f"sum by (gpu, kind) (increase(nvidia_gpu_ecc_errors_total{{{NODE}}}[$__rate_interval]))", "{{kind}} · GPU {{gpu}}"), "short", warn=1, crit=10),
        panel(l, "timeseries", "PCIe throughput", [
            target(f"nvidia_gpu_pcie_tx_bytes_per_second{{{NODE}}}", "tx " + legend, "A"),
            target(f"nvidia_gpu_pcie_rx_bytes_per_second{{{NODE}}}", "rx " + legend, "B"),
        ], "Bps"),
        panel(l, "timeseries", "Energy", target(f"rate(nvidia_gpu_energy_joules_total{{{NODE}}}[$__rate_interval])", legend), "watt", description="Average power from the energy counter."),
        panel(l, "timeseries", "Fan speed", target(f"nvidia_gpu_fan_speed{{{NODE}}}", legend), "percent", warn=80),
    ])


SERVER = 'instance=~"$instance",model_name=~"$model_name"'
SERVER_METRICS = "vllm:num_requests_running|sglang:num_running_reqs|tgi_queue_size|llamacpp:requests_processing|trtllm_num_requests_running"


def inference():
    """The servers' own metrics, names as each project's source has them (README, "Inference
    servers"): vLLM V1 with V0's names as `or` fallbacks, SGLang, TGI, llama.cpp, TensorRT-LLM.
    Prometheus finds the servers through llmscope's /api/sd, whose target labels (model_name,
    framework, pid) win over the servers' own, so every server is broken down by model_name and
    instance and sits beside llmscope's view of the same model."""
    l = Layout()
    by = "instance, model_name"
    legend = "{{model_name}} · {{instance}}"

    def quantiles(metric, qs, fallback=None):
        rate = f"rate({metric}_bucket{{{SERVER}}}[$__rate_interval])"
        if fallback:
            rate += f" or rate({fallback}_bucket{{{SERVER}}}[$__rate_interval])"
        refs = "ABCD"
        return [target(f"histogram_quantile({q}, sum by (le, {by}) ({rate}))", f"P{name} {legend}", refs[i]) for i, (q, name) in enumerate(qs)]

    p50_99 = [(0.5, "50"), (0.99, "99")]
    variables = [
        DATASOURCE_VARIABLE,
        variable("instance", "Server", f'label_values({{__name__=~"{SERVER_METRICS}"}}, instance)'),
        variable("model_name", "Model", f'label_values({{__name__=~"{SERVER_METRICS}"}}, model_name)'),
    ]
    return dashboard("llmscope-inference", "llmscope / Inference servers", "What vLLM, SGLang, TGI, llama.cpp and TensorRT-LLM servers report about themselves (Prometheus finds them through llmscope's /api/sd), beside what llmscope sees of the same models.", [
        # vLLM (V1 engine; V0 names as fallbacks)
        panel(l, "timeseries", "vLLM request rate", target(f"sum by ({by}, finished_reason) (rate(vllm:request_success_total{{{SERVER}}}[$__rate_interval]))", legend + " · {{finished_reason}}"), "reqps"),
        panel(l, "stat", "vLLM success rate", target(f'sum(rate(vllm:request_success_total{{{SERVER},finished_reason!="abort"}}[$__rate_interval])) / sum(rate(vllm:request_success_total{{{SERVER}}}[$__rate_interval]))'), "percentunit", w=12, h=8, extra={"fieldConfig": {"defaults": {"unit": "percentunit", "color": {"mode": "thresholds"}, "thresholds": {"mode": "absolute", "steps": [{"color": RED, "value": None}, {"color": YELLOW, "value": 0.95}, {"color": GREEN, "value": 0.99}]}}, "overrides": []}}),
        panel(l, "timeseries", "vLLM end-to-end latency", quantiles("vllm:e2e_request_latency_seconds", [(0.5, "50"), (0.95, "95"), (0.99, "99"), (0.999, "99.9")]), "s", warn=2),
        panel(l, "timeseries", "vLLM time to first token", quantiles("vllm:time_to_first_token_seconds", p50_99), "s", warn=1),
        panel(l, "timeseries", "vLLM inter-token latency", quantiles("vllm:inter_token_latency_seconds", p50_99, fallback="vllm:time_per_output_token_seconds"), "s", description="vllm:inter_token_latency_seconds (V1); vllm:time_per_output_token_seconds where a server still exports only that."),
        panel(l, "timeseries", "vLLM queue time", quantiles("vllm:request_queue_time_seconds", p50_99), "s", warn=1),
        panel(l, "timeseries", "vLLM tokens per second", [
            target(f"sum by ({by}) (rate(vllm:generation_tokens_total{{{SERVER}}}[$__rate_interval]))", "generated " + legend, "A"),
            target(f"sum by ({by}) (rate(vllm:prompt_tokens_total{{{SERVER}}}[$__rate_interval]))", "prompt " + legend, "B"),
        ], "short"),
        panel(l, "timeseries", "vLLM requests running / waiting", [
            target(f"sum by ({by}) (vllm:num_requests_running{{{SERVER}}})", "running " + legend, "A"),
            target(f"sum by ({by}) (vllm:num_requests_waiting{{{SERVER}}})", "waiting " + legend, "B"),
        ], "short", warn=5, crit=10, decimals=0),
        panel(l, "timeseries", "vLLM KV-cache usage", target(f"max by ({by}) (vllm:kv_cache_usage_perc{{{SERVER}}} or vllm:gpu_cache_usage_perc{{{SERVER}}})", legend), "percentunit", warn=0.7, crit=0.9),
        panel(l, "timeseries", "vLLM preemptions", target(f"sum by ({by}) (rate(vllm:num_preemptions_total{{{SERVER}}}[$__rate_interval]))", legend), "ops", warn=0.1),
        # SGLang
        panel(l, "timeseries", "SGLang requests running / queued", [
            target(f"sum by ({by}) (sglang:num_running_reqs{{{SERVER}}})", "running " + legend, "A"),
            target(f"sum by ({by}) (sglang:num_queue_reqs{{{SERVER}}})", "queued " + legend, "B"),
        ], "short", warn=5, crit=10, decimals=0),
        panel(l, "timeseries", "SGLang generation throughput and KV use", [
            target(f"sum by ({by}) (sglang:gen_throughput{{{SERVER}}})", "tokens/s " + legend, "A"),
            target(f"max by ({by}) (sglang:token_usage{{{SERVER}}})", "KV use " + legend, "B"),
        ], "short"),
        panel(l, "timeseries", "SGLang latency", [
            *quantiles("sglang:e2e_request_latency_seconds", [(0.99, "99 e2e")]),
            *[dict(t, refId=r) for t, r in zip(quantiles("sglang:time_to_first_token_seconds", [(0.99, "99 TTFT")]) + quantiles("sglang:inter_token_latency_seconds", [(0.99, "99 ITL")]), "BC")],
        ], "s", warn=2),
        # TGI
        panel(l, "timeseries", "TGI requests, queue and batch", [
            target(f"sum by ({by}) (rate(tgi_request_count{{{SERVER}}}[$__rate_interval]))", "requests/s " + legend, "A"),
            target(f"sum by ({by}) (tgi_queue_size{{{SERVER}}})", "queue " + legend, "B"),
            target(f"sum by ({by}) (tgi_batch_current_size{{{SERVER}}})", "batch " + legend, "C"),
        ], "short"),
        panel(l, "timeseries", "TGI latency", [
            *quantiles("tgi_request_duration", [(0.99, "99 request")]),
            *[dict(t, refId="B") for t in quantiles("tgi_request_mean_time_per_token_duration", [(0.99, "99 per token")])],
        ], "s", warn=2),
        # llama.cpp server (checked on a real llama-server in the tests)
        panel(l, "timeseries", "llama.cpp tokens per second", [
            target(f"sum by ({by}) (rate(llamacpp:tokens_predicted_total{{{SERVER}}}[$__rate_interval]))", "generated " + legend, "A"),
            target(f"sum by ({by}) (rate(llamacpp:prompt_tokens_total{{{SERVER}}}[$__rate_interval]))", "prompt " + legend, "B"),
        ], "short"),
        panel(l, "timeseries", "llama.cpp requests processing / deferred", [
            target(f"sum by ({by}) (llamacpp:requests_processing{{{SERVER}}})", "processing " + legend, "A"),
            target(f"sum by ({by}) (llamacpp:requests_deferred{{{SERVER}}})", "deferred " + legend, "B"),
        ], "short", warn=5, crit=10, decimals=0),
        panel(l, "timeseries", "llama.cpp generation speed", target(f"max by ({by}) (llamacpp:predicted_tokens_seconds{{{SERVER}}})", legend), "short", description="Average generation throughput the server reports, tokens per second."),
        panel(l, "timeseries", "llama.cpp decode calls and busy slots", [
            target(f"sum by ({by}) (rate(llamacpp:n_decode_total{{{SERVER}}}[$__rate_interval]))", "decode calls/s " + legend, "A"),
            target(f"max by ({by}) (llamacpp:n_busy_slots_per_decode{{{SERVER}}})", "busy slots per decode " + legend, "B"),
        ], "short"),
        # TensorRT-LLM (trtllm-serve's /prometheus/metrics)
        panel(l, "timeseries", "TensorRT-LLM requests running / waiting", [
            target(f"sum by ({by}) (trtllm_num_requests_running{{{SERVER}}})", "running " + legend, "A"),
            target(f"sum by ({by}) (trtllm_num_requests_waiting{{{SERVER}}})", "waiting " + legend, "B"),
        ], "short", warn=5, crit=10, decimals=0),
        panel(l, "timeseries", "TensorRT-LLM time to first token", quantiles("trtllm_time_to_first_token_seconds", p50_99), "s", warn=1),
        # Ollama, as llmscope reads its /api/ps
        panel(l, "timeseries", "Ollama models loaded (GPU memory)", target(f"sum by (instance, model_name) (llm_ollama_model_vram_bytes{{{MODEL}}})", legend), "bytes", description="From llmscope: Ollama has no Prometheus endpoint; llmscope reads each server's /api/ps."),
        panel(l, "timeseries", "Ollama models: time until unloaded", target(f"llm_ollama_model_expiry_timestamp_seconds{{{MODEL}}} - time()", legend), "s"),
        # Servers that export nothing themselves (Ollama, llama-server without --metrics):
        # llmscope's request telemetry, from the servers' own connections.
        panel(l, "timeseries", "Requests per second (llmscope request telemetry)", target(f"sum by (instance, model_name, route, status_class) (rate(gen_ai_server_request_duration_seconds_count{{{MODEL}}}[$__rate_interval]))", "{{model_name}} · {{route}} · {{status_class}} · {{instance}}"), "reqps", description="Measured by llmscope on the server's own connections (--requests), for servers that export no metrics."),
        panel(l, "timeseries", "Request duration (llmscope request telemetry)", [
            target(f"histogram_quantile({q}, sum by (le, instance, model_name) (rate(gen_ai_server_request_duration_seconds_bucket{{{MODEL}}}[$__rate_interval])))", f"P{name} {legend}", ref)
            for ref, (q, name) in zip("AB", p50_99)
        ], "s", warn=2),
        panel(l, "timeseries", "Time to first token (llmscope request telemetry)", [
            target(f"histogram_quantile({q}, sum by (le, instance, model_name) (rate(gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL}}}[$__rate_interval])))", f"P{name} {legend}", ref)
            for ref, (q, name) in zip("AB", p50_99)
        ], "s", warn=1, description="Streamed responses: from the request's first byte to the response's first body byte."),
        panel(l, "timeseries", "Time per output token (llmscope request telemetry)", [
            target(f"histogram_quantile({q}, sum by (le, instance, model_name) (rate(gen_ai_server_time_per_output_token_seconds_bucket{{{MODEL}}}[$__rate_interval])))", f"P{name} {legend}", ref)
            for ref, (q, name) in zip("AB", p50_99)
        ], "s"),
        panel(l, "timeseries", "Tokens per second (llmscope request telemetry)", target(f"sum by (instance, model_name, token_type, source) (rate(gen_ai_server_tokens_total{{{MODEL}}}[$__rate_interval]))", "{{token_type}} ({{source}}) {{model_name}} · {{instance}}"), "short", description="source=server: the response said (usage, timings, eval_count); source=chunks: stream events counted, an estimate."),
        panel(l, "timeseries", "Requests in flight (llmscope request telemetry)", target(f"sum by (instance, model_name, pid) (gen_ai_server_active_requests{{{MODEL}}})", "{{model_name}} · pid {{pid}} · {{instance}}"), "short", decimals=0),
        # The same models, as llmscope sees their processes
        panel(l, "timeseries", "GPU memory by model (llmscope, NVML)", target(f"sum by (model_name) (llm_process_gpu_memory_bytes{{{MODEL}}})", "{{model_name}}"), "bytes", w=8),
        panel(l, "timeseries", "CUDA OOMs by model (llmscope)", target(f"sum by (model_name, api) (increase(llm_process_cuda_oom_total{{{MODEL}}}[$__rate_interval]))", "{{model_name}} · {{api}}"), "short", w=8, warn=1, crit=1, decimals=0),
        panel(l, "timeseries", "CPU by model (llmscope)", target(f"sum by (model_name) (llm_process_cpu_percent{{{MODEL}}})", "{{model_name}}"), "percent", w=8, description="Percent of one core, all of the model's processes."),
    ], variables)


DASHBOARDS = {
    "overview.json": overview,
    "processes.json": processes,
    "cuda.json": cuda,
    "gpu-devices.json": gpus,
    "inference-servers.json": inference,
}


def render(build):
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("dashboards out of date (run python3 dashboards/generate.py):", ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
