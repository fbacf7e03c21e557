"""``renderfarm worker --gpus all``: one worker process per GPU, each seeing only its own.

CUDA does not survive fork and one solo-pool process drives one device, so a box with several
GPUs runs several workers. This parent starts them with ``CUDA_VISIBLE_DEVICES`` set, passes
SIGTERM/SIGINT on (warm shutdown: running jobs finish) and exits when they all have.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def gpu_ids(spec: str) -> list[str]:
    """``all`` → every GPU nvidia-smi lists; ``0,2`` → those."""
    if spec != "all":
        ids = [part.strip() for part in spec.split(",") if part.strip()]
        if not ids or not all(i.isdigit() for i in ids):
            raise ValueError(f"--gpus must be 'all' or GPU indices like 0,1, got {spec!r}")
        return ids
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"--gpus all: cannot list GPUs with nvidia-smi ({exc})") from None
    ids = [line.strip() for line in out.splitlines() if line.strip()]
    if not ids:
        raise RuntimeError("--gpus all: nvidia-smi lists no GPU")
    return ids


def worker_commands(ids: list[str], args: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    """The command and environment of each GPU's worker. With ``RENDERFARM_METRICS_PORT`` set,
    worker k serves its /metrics on that port + k."""
    out = []
    port = os.environ.get("RENDERFARM_METRICS_PORT", "")
    for k, gpu in enumerate(ids):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        if port.isdigit():  # one /metrics port per worker process: the first GPU's is the setting
            env["RENDERFARM_METRICS_PORT"] = str(int(port) + k)
        out.append(([sys.executable, "-m", "renderfarm", "worker", *args, "--name",
                     f"gpu{gpu}-{os.getpid()}"], env))
    return out


def run_per_gpu(ids: list[str], args: list[str]) -> int:
    procs = [subprocess.Popen(cmd, env=env) for cmd, env in worker_commands(ids, args)]

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(proc.wait() for proc in procs)
