# Source on a GPU machine of the device tool (no network): installs the carried wheels and
# diffopt itself (editable, no build isolation: setuptools cannot be downloaded there).
set -e
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "WARNING: Running pip as" || true
python3 -c "import diffopt.kernels, diffopt.models, torch; print('diffopt ok; torch', torch.__version__, torch.cuda.get_device_name())"
set +e
