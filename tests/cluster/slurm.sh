#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (Debian's slurm-wlm and munge), for tests.
#   slurm.sh start DIR [NODES]  write slurm.conf/gres.conf under DIR, start munged, slurmctld and
#                               NODES slurmd (default 1); wait until every node is idle and a
#                               trial srun across all of them succeeds
#   slurm.sh stop DIR           stop exactly the daemons (and namespaces) started from DIR
# Each node advertises 2 fake GPUs (symbolic links to /dev/null: Slurm needs a device file per
# GPU, and drops or rejects other kinds) so that --gpus requests are scheduled for real.
#
# One node is this machine itself. With NODES >= 2 every node is a machine of its own as far as
# the network goes: a Linux network namespace with its own interface (eth0) and address on a
# bridge that the controller's address sits on, its own host name (a UTS namespace: mfnode1,
# mfnode2, ...) and its own /etc/hosts (a private mount of /etc/netns/NS/hosts over it), where
# every node's name resolves to its address. A slurmd runs in each; jobs and srun steps started
# there talk to the other nodes across the bridge only. They share this machine's file system,
# as cluster nodes share a network file system. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
set -euo pipefail
action=${1:?start or stop}; dir=$(realpath -m "${2:?state directory}")
host=$(hostname -s)
tag=$(echo "$dir" | md5sum | cut -c1-6)
net=$((16 + 0x${tag:0:2} % 200))  # 10.77.<net>.0/24: the bridge's subnet

stop() {
    for pidfile in "$dir"/slurmd*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    for ns in $(ip netns list 2>/dev/null | awk -v t="mf$tag-" 'index($1, t) == 1 {print $1}'); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)  # job steps left behind on that node
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip link delete "mfbr$tag" 2>/dev/null || true
}

if [ "$action" = stop ]; then
    stop
    for name in slurm.conf gres.conf; do
        [ "$(readlink "/etc/slurm/$name" 2>/dev/null)" = "$dir/$name" ] && rm -f "/etc/slurm/$name"
    done
    exit 0
fi

nodes=${3:-1}
mkdir -p "$dir"/{spool,state,log,gpus}
for i in 0 1; do ln -sf /dev/null "$dir/gpus/nvidia$i"; done
read -r cpus sockets cores threads memory < <(slurmd -C | tr ' ' '\n' | awk -F= '
    /^CPUs=/{c=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2} /^ThreadsPerCore=/{t=$2}
    /^RealMemory=/{m=$2} END{print c, s, k, t, m}')
layout="CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory Gres=gpu:2"
if [ "$nodes" -eq 1 ]; then
    controller=127.0.0.1
    names=$host
    node_lines="NodeName=$host NodeAddr=127.0.0.1 $layout State=UNKNOWN"
else
    controller=10.77.$net.1
    names="mfnode[1-$nodes]"
    node_lines=""
    for i in $(seq "$nodes"); do
        node_lines+="NodeName=mfnode$i NodeAddr=10.77.$net.$((10 + i)) $layout State=UNKNOWN"$'\n'
    done
fi
cat > "$dir/slurm.conf" <<CONF
ClusterName=medfold-test
SlurmctldHost=$host($controller)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmctldPort=${MEDFOLD_SLURMCTLD_PORT:-16817}
SlurmdPort=${MEDFOLD_SLURMD_PORT:-16818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=300
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
$node_lines
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$names Name=gpu File=$dir/gpus/nvidia[0-1]" > "$dir/gres.conf"
# Client commands inside jobs (the srun that Snakemake's job step runs) read /etc/slurm: the
# Slurm executor plugin clears SLURM_* variables, SLURM_CONF included. Link ours there, unless
# a real configuration is in place (then refuse rather than overwrite it).
mkdir -p /etc/slurm
for name in slurm.conf gres.conf; do
    if [ -e "/etc/slurm/$name" ] && [ ! -L "/etc/slurm/$name" ]; then
        echo "slurm: /etc/slurm/$name exists and is not ours; not touching it" >&2; exit 1
    fi
    ln -sfn "$dir/$name" "/etc/slurm/$name"
done
export SLURM_CONF="$dir/slurm.conf"

if [ ! -f /etc/munge/munge.key ]; then
    mkdir -p /etc/munge && dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
# munged runs as user munge, which cannot enter a private temporary directory: its PID file
# goes to /run/munge, named after this cluster
runuser -u munge -- /usr/sbin/munged --pid-file="/run/munge/medfold-$tag.pid" --force
cp "/run/munge/medfold-$tag.pid" "$dir/munged.pid"
slurmctld -c -i -f "$dir/slurm.conf"
if [ "$nodes" -eq 1 ]; then
    mkdir -p "$dir/spool/$host"
    slurmd -f "$dir/slurm.conf"
else
    bridge="mfbr$tag"
    ip link add "$bridge" type bridge
    ip addr add "$controller/24" dev "$bridge"
    ip link set "$bridge" up
    hosts="127.0.0.1 localhost"$'\n'"$controller $host"$'\n'
    for i in $(seq "$nodes"); do hosts+="10.77.$net.$((10 + i)) mfnode$i"$'\n'; done
    for i in $(seq "$nodes"); do
        ns="mf$tag-$i"
        ip netns add "$ns"
        ip link add "mfv$tag$i" type veth peer name eth0 netns "$ns"
        ip link set "mfv$tag$i" master "$bridge" up
        ip -n "$ns" addr add "10.77.$net.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        mkdir -p "/etc/netns/$ns" "$dir/spool/mfnode$i"
        printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
        # not `ip netns exec`: it remounts /sys, hiding the cgroup file system slurmd needs
        nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
            "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname mfnode$i && exec slurmd -N mfnode$i -f '$dir/slurm.conf'"
    done
fi
want=$(scontrol show hostnames "$names" | wc -l)
for _ in $(seq 120); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l || true)
    if [ "$idle" -eq "$want" ] && timeout 20 srun -N "$want" -n "$want" true 2>/dev/null; then
        echo "slurm: $want node(s) $names idle ($cpus CPUs, ${memory} MB, 2 fake GPUs each); SLURM_CONF=$dir/slurm.conf"
        exit 0
    fi
    sleep 0.5
done
echo "slurm: the nodes did not all become idle; logs in $dir/log" >&2
tail -20 "$dir/log/"*.log >&2 || true
stop
exit 1
