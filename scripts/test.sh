#!/usr/bin/env bash
# Runs every check and test of the workspace: the one test command of README.md and of CI.
#
# First it makes sure the system programs the tests start (real servers, no mocks) are present:
# as root it installs missing Debian packages with apt-get; otherwise it prints the command to run
# and stops. Then: cargo fmt --check, clippy with warnings denied, all tests, the doc tests, and
# the planted-bugs checks (a test-only feature: every known bug planted back must be caught).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's library directory of this machine (x86_64-linux-gnu, aarch64-linux-gnu, …)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
# command (or file) the tests need -> Debian package that provides it
needs=(
  redis-server:redis-server
  redis-benchmark:redis-tools
  etcd:etcd-server
  etcdctl:etcd-client
  openssl:openssl
  protoc:protobuf-compiler
  /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev
  chromium:chromium
  chromedriver:chromium-driver
  # the fault suite's cuts between etcd members: network namespaces (run as root)
  ip:iproute2
  # the fault suite's clock nemesis: libfaketime, and tcmalloc in front of Redis's jemalloc
  "/usr/lib/$multiarch/faketime/libfaketime.so.1:libfaketime"
  "/usr/lib/$multiarch/libtcmalloc_minimal.so.4:libtcmalloc-minimal4"
)

missing=()
for pair in "${needs[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  if [[ $cmd == /* ]]; then
    [[ -e $cmd ]] || missing+=("$pkg")  # a file: protoc's standard imports, a preloaded library
  else
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "==> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "error: the tests need these Debian packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --workspace --all-targets
echo "==> doc tests"
cargo test --workspace --doc
echo "==> planted bugs: each must be caught (docs/RELIABILITY.md, 'Planted bugs')"
cargo test -p distlock-server --features planted-bugs --test simulation planted_bugs_are_caught
cargo test -p distlock --features planted-bugs --test memory planted_renewal_from_answer_is_caught
cargo test -p distlock --features redis,planted-bugs --test redis planted_abandoned_queue_place_is_caught
echo "==> OpenAPI fuzzer (schemathesis) against a real server"
cargo build --workspace --bin distlock --quiet
./scripts/fuzz-api.sh target/debug/distlock
