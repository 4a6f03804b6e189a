#!/usr/bin/env bash
# Creates the MaxText environment that experiments/bench/peers.py compares fmjax against:
# .venv-maxtext (git-ignored) beside fmjax's .venv, with a Python >= 3.12 interpreter (MaxText 0.2.x
# needs it; fmjax's .venv stays on its own Python).
#
#   bash experiments/bench/peers_setup.sh [VENV]      # default: <repo>/.venv-maxtext
#
# MaxText's PyPI package declares no base dependencies and its extras pull TPU or CUDA wheels, so it
# is installed with --no-deps, with CPU jax and exactly the modules `maxtext.trainers.pre_train.train`
# imports on a CPU run with DECOUPLE_GCLOUD=TRUE (found by running it and adding each missing module),
# all pinned, also --no-deps: PyPI is the only thing this needs. Python: $PYTHON312 if set, else
# python3.12 on PATH, else pyenv's newest 3.12.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-maxtext}"
MAXTEXT_VERSION=0.2.5

PY="${PYTHON312:-}"
if [ -z "$PY" ] && command -v python3.12 >/dev/null; then PY="$(command -v python3.12)"; fi
if [ -z "$PY" ] && command -v pyenv >/dev/null; then
  v="$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)"
  [ -n "$v" ] && PY="$(pyenv root)/versions/$v/bin/python3.12"
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  echo "peers_setup.sh: no Python >= 3.12 found (MaxText needs it); set PYTHON312=/path/to/python3.12" >&2
  exit 1
fi

# What MaxText imports for a CPU pre-training run, pinned to the versions the comparison ran with.
# jax/jaxlib 0.11.1: the lowest its tpu/cuda extras allow (fmjax's .venv has 0.10.2).
PINS=(
  jax==0.11.1 jaxlib==0.11.1 flax==0.12.9 optax==0.2.8 orbax-checkpoint==0.12.8 numpy==2.5.5 scipy==1.18.1
  ml_dtypes==0.7.0 opt_einsum==3.4.0 tensorstore==0.1.86 treescope==0.1.10 msgpack==1.2.4 etils==1.15.0
  absl-py==2.5.1 omegaconf==2.4.0 PyYAML==6.0.4 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing_extensions==4.16.0 typing-inspection==0.4.5 protobuf==7.36.2 rich==15.0.0 markdown-it-py==4.3.0
  mdurl==0.1.2 Pygments==2.21.0 humanize==4.17.0 simplejson==4.3.0 psutil==7.2.2 prometheus_client==0.26.0
  zipp==4.1.2 fsspec==2026.9.0 aiofiles==25.1.0 uvloop==0.23.0
  pathwaysutils==0.1.13 fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 anyio==4.16.0
  opentelemetry-api==1.45.3 requests==2.34.2 urllib3==2.8.0 idna==3.21 certifi==2026.10.19.post1
  uvicorn==0.55.0 click==8.5.1 h11==0.16.0 packaging==26.4 Jinja2==3.1.6 MarkupSafe==3.0.4
  aqtp==0.9.0 qwix==0.1.8 tokamax==0.0.17 immutabledict==4.3.1 xprof==2.24.2 fire==0.7.1 termcolor==3.3.0
  six==1.17.0 jaxtyping==0.3.11 wadler_lindig==0.1.8 einshape==1.0 tqdm==4.70.1
  huggingface_hub==2.5.0 transformers==5.25.0 regex==2026.12.2 httpx2==2.17.0 httpcore2==2.17.0
  truststore==0.10.5 filelock==4.3.2 safetensors==0.8.0 tokenizers==0.23.3 typer==0.29.3 shellingham==1.5.4
  ml_collections==1.1.0 grain==0.2.18 cloudpickle==3.1.3 portpicker==1.6.0 array_record==0.8.6 drjax==0.2.1
  pillow==13.0.0 tiktoken==0.14.0 sentencepiece==0.2.3 sympy==1.14.0 mpmath==1.4.1
)

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --no-deps "maxtext==$MAXTEXT_VERSION" "${PINS[@]}"
DECOUPLE_GCLOUD=TRUE JAX_PLATFORMS=cpu "$VENV/bin/python" - <<'EOF'
import jax
import maxtext.trainers.pre_train.train  # noqa: F401  (fails naming any module still missing)
from importlib.metadata import version
print(f"MaxText {version('maxtext')}, jax {jax.__version__}, Python {__import__('sys').version.split()[0]}, "
      f"devices {jax.devices()}")
EOF
