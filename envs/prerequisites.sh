#!/usr/bin/env bash
# What `make setup` needs from the machine, checked before any install, so that a missing
# piece is named within seconds rather than after minutes of pip (README, "Prerequisites"):
# Python >= 3.11 with its venv module (PYTHON=, default python3), and a C and a C++ compiler
# where llama.cpp must be built (its wheel not yet cached for this CPU:
# envs/install-llama-cpp.sh --needs-build). Every missing one is named with the command that
# installs it; the exit status is 1 if any is missing.
set -uo pipefail
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
missing=0

need() {  # what is missing, and how to get it
    echo "setup: missing: $1" >&2
    echo "       install: $2" >&2
    missing=1
}

if ! command -v "$python" >/dev/null 2>&1; then
    need "Python >= 3.11 ('$python' not found)" \
        "apt-get install python3 python3-venv (Debian/Ubuntu), or make PYTHON=/path/to/python3.11"
elif ! version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    need "Python >= 3.11 ('$python' does not run)" "make PYTHON=/path/to/python3.11"
elif ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    need "Python >= 3.11 ('$python' is $version)" \
        "apt-get install python3.11 python3.11-venv (or uv python install 3.11), then make PYTHON=python3.11"
elif ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need "the venv module of '$python' ($version; Debian splits it off)" \
        "apt-get install python$version-venv"
fi

if bash "$here/install-llama-cpp.sh" --needs-build >/dev/null 2>&1; then
    # CMake looks for these names (or $CC / $CXX); llama.cpp is C and C++.
    if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 \
            && ! command -v clang >/dev/null 2>&1; then
        need "a C compiler, to build llama.cpp once for this CPU (its wheel is not cached yet)" \
            "apt-get install build-essential (Debian/Ubuntu), dnf install gcc gcc-c++ (Fedora), or xcode-select --install (macOS)"
    fi
    if ! command -v "${CXX:-c++}" >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 \
            && ! command -v clang++ >/dev/null 2>&1; then
        need "a C++ compiler, to build llama.cpp once for this CPU (its wheel is not cached yet)" \
            "apt-get install build-essential (Debian/Ubuntu), dnf install gcc-c++ (Fedora), or xcode-select --install (macOS)"
    fi
fi
exit $missing
