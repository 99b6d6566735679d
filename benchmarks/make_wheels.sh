#!/usr/bin/env bash
# Build the wheels a CUDA GPU image needs to run gaudi_pretrain, into .whl/ (git-ignored), WITHOUT torch
# or transformers: the image's own builds of those must stay untouched (benchmarks/gpu_job.sh installs
# these with --no-deps into a side directory on PYTHONPATH).
#
# Target: CPython 3.12 on x86-64 manylinux (the lent H100/H200 image: /opt/torch/.venv, Python 3.12.3,
# torch 2.11 + cu130, transformers 5.17; see /work/.library/device/KINDS.md). That image already has
# numpy, packaging, psutil, tqdm, einops, msgpack, ninja, py-cpuinfo, pyyaml, pillow, tokenizers,
# safetensors, tensorboard, matplotlib and typing-extensions; it lacks DeepSpeed and these:
#   deepspeed   needs hjson + pydantic (pydantic-core, annotated-types, typing-inspection)
#   webdataset  needs braceexpand (numpy, pyyaml: in the image)
# pydantic-core needs typing-extensions >= 4.16: its wheel goes to .whl/optional/, and gpu_job.sh installs it
# only when the image's typing-extensions is older (shadowing a newer one could break the image's packages).
# DeepSpeed publishes only an sdist: it is built here into a pure-Python wheel with no prebuilt ops
# (DS_BUILD_OPS=0; we pass our own torch optimizer, so no op is ever JIT-built at run time).
#
#   benchmarks/make_wheels.sh            # uses .venv/bin/python (it must have torch for DeepSpeed's setup.py)
#   PYTHON=python3 WHL=.whl benchmarks/make_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WHL=${WHL:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
DEEPSPEED=${DEEPSPEED:-deepspeed==0.19.8}
# Pinned to what this repo's venv runs (pip freeze, 2026-11); one version of each, or the install stops.
BINARY=(pydantic-core==2.50.4)
PURE=(pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 webdataset==1.0.2
      braceexpand==0.1.7)

mkdir -p "$WHL/optional"
rm -f "$WHL"/*.whl "$WHL"/optional/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" -d "$WHL" "${BINARY[@]}"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" -d "$WHL" "${PURE[@]}"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" -d "$WHL/optional" typing-extensions==4.16.0
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps \
  --no-build-isolation -w "$WHL" "$DEEPSPEED"

# Every Requires-Dist of the carried wheels must be carried or already in the image.
IN_IMAGE="numpy packaging psutil tqdm einops msgpack ninja py-cpuinfo pyyaml torch typing-extensions"
"$PYTHON" - "$WHL" "$IN_IMAGE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

whl, in_image = Path(sys.argv[1]), set(sys.argv[2].split())
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(p.name.split("-")[0]) for p in whl.glob("*.whl")}
missing = []
for p in sorted(whl.glob("*.whl")):
    with zipfile.ZipFile(p) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
                if name not in have and name not in {norm(n) for n in in_image}:
                    missing.append(f"{p.name} needs {name}")
    print(f"{p.stat().st_size / 1e6:7.2f} MB  {p.name}")
if missing:
    sys.exit("missing: " + "; ".join(missing))
print(f"{len(have)} wheels in {whl}, all requirements carried or in the image")
EOF
