"""A worker with HF_HUB_OFFLINE unset (as the Dockerfiles run it) never touches the network for a
local model: loading the pipeline and rendering run in a process whose audit hook refuses, and
records, every connect or name lookup that is not loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import os, sys
    LOCAL = {"127.0.0.1", "::1", "localhost", None}
    attempts = []

    def hook(event, args):
        if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
            attempts.append(f"connect {args[1]}")
            raise OSError(f"network refused by the test: {args[1]}")
        if event == "socket.getaddrinfo" and args[0] not in LOCAL:
            attempts.append(f"lookup {args[0]}")
            raise OSError(f"name lookup refused by the test: {args[0]}")

    sys.addaudithook(hook)
    assert not [k for k in os.environ if k.endswith("_OFFLINE")], "offline flags are set"
    import torch
    from renderfarm.schema import JobRequest
    from worker.pipelines import PipelineCache
    from worker.profiles import Profile
    from worker.render import render

    torch.set_num_threads(1)
    cache = PipelineCache(sys.argv[1], Profile("cpu", "cpu", torch.float32))
    [image] = render(cache, JobRequest(prompt="offline", model="tiny", width=64, height=64,
                                       steps=2, seed=3, scheduler="euler"))
    print("size", image.size)
    print("attempts", attempts)
    sys.exit(1 if attempts else 0)
""")


def test_local_model_renders_without_the_network_and_without_hf_hub_offline(models_dir):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(models_dir)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "size (64, 64)" in out.stdout and "attempts []" in out.stdout
