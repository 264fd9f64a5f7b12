# Sourced by the bench scripts: loopback ports, and the check for the tools they need.
# free_port prints a port nobody listens on; wait_port PORT waits (10 s at most) until one does;
# need_tools TOOL... stops with the install command when one is missing.
# start_redis VAR / start_etcd VAR start a redis-server (no persistence) / a one-member etcd in
# the caller's $dir, add its pid to the caller's `pids` array (not in a $(…) subshell, whose
# `pids` would be lost and the server left running) and set the variable named VAR to its port.
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
# (Their locals start with an underscore, so that a caller's variable is never shadowed.)
start_redis() {
  local _port
  _port=$(free_port)
  redis-server --port "$_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null &
  pids+=($!)
  wait_port "$_port"
  printf -v "$1" %s "$_port"
}
start_etcd() {
  local _port _peer
  _port=$(free_port) _peer=$(free_port)
  etcd --name "etcd$_port" --data-dir "$dir/etcd$_port" --log-level error \
    --listen-client-urls "http://127.0.0.1:$_port" --advertise-client-urls "http://127.0.0.1:$_port" \
    --listen-peer-urls "http://127.0.0.1:$_peer" --initial-advertise-peer-urls "http://127.0.0.1:$_peer" \
    --initial-cluster "etcd$_port=http://127.0.0.1:$_peer" >/dev/null 2>&1 &
  pids+=($!)
  wait_port "$_port"
  # Serving once it answers a read (a leader elected), not only once its port is open.
  for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$_port" get probe >/dev/null 2>&1 && break
    sleep 0.1
  done
  printf -v "$1" %s "$_port"
}
