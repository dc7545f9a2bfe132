# Source on the GPU machine (see ../shared/DEVICE.md), from the repo root, with .device carried:
#   . tools/device_env.sh
# Unpacks the flashinfer bundle and the AOT kernels, adds the wheels the machine lacks (after its own
# site-packages, so nothing it has is shadowed), and puts the repo on PYTHONPATH.
# .device/extra.tar.xz = the unpacked wheels of prometheus-client pydantic pydantic-core annotated-types
# typing-inspection typing-extensions httpx httpcore h11 anyio sniffio certifi idna gguf openai httpx2 httpcore2
# truststore distro jiter xgrammar apache-tvm-ffi
# (pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ...).
set -e
mkdir -p /tmp/site
[ -d /tmp/site/flashinfer ] || { tar xJf .device/bundle.tar.xz -C /tmp/site && tar xJf .device/aot.tar.xz -C /tmp/site; }
# kernels/asyncllm_kernels is the package asyncllm_kernels (the install maps it; here the path does)
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH} FLASHINFER_DISABLE_JIT=1 PYTHONUNBUFFERED=1
if ! python -c "import pydantic, prometheus_client, httpx, gguf, openai, xgrammar" 2>/dev/null; then
  mkdir -p /tmp/extra && tar xJf .device/extra.tar.xz -C /tmp/extra
  echo /tmp/extra > "$(python -c 'import site; print(site.getsitepackages()[0])')/zz-asyncllm-extra.pth"
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
set +e
