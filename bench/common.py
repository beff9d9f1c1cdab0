"""What the benchmark scripts share: which machine a figure came from, peak RSS
of a side run in its own process, timing, and the one-JSON-object output.

Figures are ratios of two sides measured in the same run; peak memory is per
side, each side in its own child process so the two never share a high-water
mark.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Synthetic corpora and scratch caches: under XBT_STATE_DIR (make sets .state/) like all xbt state.
BENCH_STATE = Path(os.environ.get("XBT_STATE_DIR") or ROOT / ".state") / "bench"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    """The machine a figure came from: the GPU's name on cuda, else the CPU and torch's thread count."""
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


def check_device(device: str) -> str:
    """A device string the benches accept; a clear exit when cuda is asked for and absent."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device (this build: {torch.__version__})")
    if device != "cpu" and not device.startswith("cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block; cuda work is synchronised."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self):
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_child(argv: list[str], env: dict | None = None) -> dict:
    """Run `python argv...` in a fresh process; -> its JSON (last stdout line) plus
    peak_rss_mb, the child's own high-water mark (wait4's rusage is per child)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed with exit status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    return result


def emit(result: dict) -> dict:
    """The one JSON object a bench prints on stdout (progress goes to stderr)."""
    print(json.dumps(result), flush=True)
    return result


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
