#!/usr/bin/env bash
# The pure-Python dependencies shardwise needs on a lent GPU machine, as wheels for its Python (3.12,
# x86-64 manylinux), in .whl/ (git-ignored through .git/info/exclude): the machine has no registry,
# and its image lacks pydantic (and what pydantic needs). Run here, once, before the device call:
#
#     bash benchmarks/gpu_wheels.sh            # ~2 MB into .whl/
#     device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
#
# Versions are the ones this checkout's venv runs (make setup), so the GPU run imports the same code.
# torch is not downloaded: a CUDA torch wheel (~900 MB) is far over what a device call carries (64 MiB);
# gpu_check.sh uses the machine's own CUDA torch then and the report records its version next to our pin.
# (A torch-<pin>-cp312-*.whl placed in .whl/ by hand is installed by gpu_check.sh instead.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${WHEELS:-.whl}
PKGS=(pydantic pydantic_core annotated_types typing_inspection typing_extensions)
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    echo '/.whl/' >> .git/info/exclude
fi
mkdir -p "$DEST"
specs=()
for pkg in "${PKGS[@]}"; do
    ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")
    specs+=("$pkg==$ver")
done
echo "gpu_wheels: ${specs[*]} for CPython 3.12 x86-64 -> $DEST/"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
# one version of each: an older wheel of the same name left from an earlier run would stop the install
for spec in "${specs[@]}"; do
    pkg=${spec%%==*} ver=${spec#*==}
    for f in "$DEST/$pkg"-*.whl; do
        case "$f" in "$DEST/$pkg-$ver-"*) ;; *) [ -e "$f" ] && rm -f "$f" ;; esac
    done
done
ls -l "$DEST"
du -sh "$DEST"
