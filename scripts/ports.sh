# Sourced by the bench scripts: loopback ports, and the check for the tools they need.
# free_port prints a port nobody listens on; wait_port PORT waits (10 s at most) until one does;
# need_tools TOOL... stops with the install command when one is missing.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
need_tools() {
  local tool pkg
  for tool in "$@"; do
    case $tool in
      redis-cli | redis-benchmark) pkg=redis-tools ;;
      etcd) pkg=etcd-server ;;
      etcdctl) pkg=etcd-client ;;
      *) pkg=$tool ;;
    esac
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install $pkg" >&2; exit 1; }
  done
}
