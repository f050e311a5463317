#!/usr/bin/env bash
# ctest install_consumer: installs the build into a temporary prefix, then builds and runs
# tests/install/consumer.c against it twice, through the CMake package (find_package(kvcomp)) and
# through pkg-config (where pkg-config exists). With kvcomp_nccl.h installed the consumer includes
# it too, so the package must carry NCCL's include directory.
#   tests/install_consumer.sh BUILD_DIR CMAKE
set -euo pipefail
build=${1:?usage: install_consumer.sh BUILD_DIR CMAKE}
cmake=${2:?usage: install_consumer.sh BUILD_DIR CMAKE}
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/install" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$cmake" --install "$build" --prefix "$tmp/prefix" >/dev/null
nccl=OFF
[ -f "$tmp/prefix/include/kvcomp_nccl.h" ] && nccl=ON
echo "installed into $tmp/prefix (kvcomp_nccl.h: $nccl)"

"$cmake" -S "$src" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$tmp/prefix" -DKVC_NCCL_HEADER=$nccl \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
"$cmake" --build "$tmp/cmake" >/dev/null
"$tmp/cmake/consumer"

if command -v pkg-config >/dev/null; then
  pc=$(find "$tmp/prefix" -name kvcomp.pc | head -n 1)
  export PKG_CONFIG_PATH=$(dirname "$pc")
  defs=""
  [ "$nccl" = ON ] && defs="-DKVC_NCCL_HEADER=1"
  # shellcheck disable=SC2046
  ${CC:-cc} $defs "$src/consumer.c" $(pkg-config --cflags --libs kvcomp) -o "$tmp/pc_consumer"
  LD_LIBRARY_PATH=$(pkg-config --variable=libdir kvcomp) "$tmp/pc_consumer"
else
  echo "pkg-config not found: the pkg-config build was not tried"
fi
