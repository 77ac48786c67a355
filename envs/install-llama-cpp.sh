#!/usr/bin/env bash
# llama.cpp for the GGUF export (rule export_gguf; docs/serving.md), into the Python
# environment of $PYTHON (default: python): llama-cpp-python built from its source
# distribution (llama.cpp's runtime and quantizer, for the round trip and the k-quant types),
# and, from the same archive, llama.cpp's converter convert_hf_to_gguf.py with the gguf-py it
# is written against, unpacked into <prefix>/share/llama.cpp (models/gguf_export.py).
#
# PyPI has no wheel of it: the C++ build takes ~2.5 min on 2 cores (6.5 with llama.cpp's
# `common` library, which the package builds by default and this script leaves out). The
# wheel is kept in ~/.cache/qlora-pipeline, keyed by the CPU's instruction set, because it is built for this
# CPU (-march=native: AVX-512 code must never run on a CPU without it); a new venv on the
# same machine, or CI with that folder cached, installs it in seconds.
#
# --needs-build: only say whether this CPU's wheel is missing (exit 0) or cached (exit 1), for
# envs/prerequisites.sh, which then asks for a compiler; prints the folder it looks in.
# --wheel: only build (or find) the wheel, installing nothing: `make setup` runs this beside
# pip's installs, then this script again to install.
set -euo pipefail
VERSION=0.3.36
cache=${XDG_CACHE_HOME:-$HOME/.cache}/qlora-pipeline/llama-cpp-python-$VERSION
cpu=$({ grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m; } | sha256sum | cut -c1-12)
sdist=$cache/llama_cpp_python-$VERSION.tar.gz
wheels=$cache/$(uname -m)-$cpu
if [[ ${1:-} == --needs-build ]]; then
    echo "$wheels"
    ! compgen -G "$wheels/llama_cpp_python-$VERSION-*.whl" >/dev/null
    exit
fi
python=${PYTHON:-python}
prefix=$("$python" -c 'import sys; print(sys.prefix)')
mkdir -p "$wheels"
if [[ ! -f $sdist ]]; then
    "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -d "$cache"
fi
if ! compgen -G "$wheels/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "building llama-cpp-python $VERSION for this CPU (once; ~2.5 min on 2 cores)"
    src=$(mktemp -d)
    trap 'rm -rf "$src" "$wheels.tmp"' EXIT
    tar -xzf "$sdist" -C "$src"
    # Only the libraries the bindings load (llama, ggml): the package forces llama.cpp's
    # `common` library on (34k lines of JSON and chat-template C++, more than half the build),
    # which nothing here loads; no llava, tests, examples, tools or server either.
    sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE/set(LLAMA_BUILD_COMMON OFF CACHE/' \
        "$src/llama_cpp_python-$VERSION/CMakeLists.txt"
    grep -q 'LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)$' \
        "$src/llama_cpp_python-$VERSION/CMakeLists.txt" \
        || { echo "install-llama-cpp.sh: llama-cpp-python $VERSION's CMakeLists.txt no" \
                  "longer forces LLAMA_BUILD_COMMON; expected the line this script edits" >&2
             exit 1; }
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$python" -m pip wheel --quiet --no-deps "$src/llama_cpp_python-$VERSION" -w "$wheels.tmp"
    mv "$wheels.tmp"/llama_cpp_python-*.whl "$wheels"/ && rmdir "$wheels.tmp"
fi
[[ ${1:-} == --wheel ]] && exit 0
# Its dependencies (numpy, jinja2, diskcache, typing-extensions) are pinned in requirements.txt.
"$python" -m pip install --quiet --no-deps "$wheels"/llama_cpp_python-$VERSION-*.whl
share=$prefix/share/llama.cpp
rm -rf "$share" && mkdir -p "$share"
inner=llama_cpp_python-$VERSION/vendor/llama.cpp
tar -xzf "$sdist" -C "$share" --strip-components=3 \
    "$inner/convert_hf_to_gguf.py" "$inner/conversion" "$inner/gguf-py" "$inner/LICENSE"
