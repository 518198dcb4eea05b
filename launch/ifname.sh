#!/usr/bin/env bash
# Print the network interface this host uses to reach ADDR (an address or a host name), for GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME; print nothing and exit 1 when there is no such interface (ADDR on the loopback, no `ip`).
#
#   launch/ifname.sh 10.0.0.1        ->  eth1
#
# Without a named interface gloo binds to the address its own host name resolves to, which on many clusters is
# 127.0.1.1 or nothing: the other nodes cannot connect. The route the kernel would take to the master is the
# interface the other nodes reach this one on too (same subnet), which is why it is the default here. When ADDR
# is this host's own address the route goes through `lo`: then the interface that holds ADDR is the one.
set -uo pipefail
addr=${1:?usage: launch/ifname.sh ADDR}
command -v ip >/dev/null || exit 1
if ! [[ "$addr" =~ ^[0-9.]+$ || "$addr" == *:* ]]; then
  addr=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}')
  [ -n "$addr" ] || exit 1
fi
dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
if [ "$dev" = lo ]; then
  dev=$(ip -o addr show to "$addr" 2>/dev/null | awk '{print $2; exit}')
fi
[ -n "$dev" ] && [ "$dev" != lo ] || exit 1
echo "$dev"
