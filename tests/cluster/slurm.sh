#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (Debian's slurm-wlm and munge), for tests.
#   slurm.sh start DIR   write slurm.conf/gres.conf under DIR, start munged, slurmctld, slurmd;
#                        wait until the node is idle and a trial srun succeeds
#   slurm.sh stop DIR    stop exactly the daemons started from DIR
# The node advertises 2 fake GPUs (symbolic links to /dev/null: Slurm needs a device file per
# GPU, and drops or rejects other kinds) so that --gpus requests are scheduled for real.
set -euo pipefail
action=${1:?start or stop}; dir=$(realpath -m "${2:?state directory}")
host=$(hostname -s)

stop() {
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
}

if [ "$action" = stop ]; then
    stop
    for name in slurm.conf gres.conf; do
        [ "$(readlink "/etc/slurm/$name" 2>/dev/null)" = "$dir/$name" ] && rm -f "/etc/slurm/$name"
    done
    exit 0
fi

mkdir -p "$dir"/{spool,state,log,gpus}
for i in 0 1; do ln -sf /dev/null "$dir/gpus/nvidia$i"; done
read -r cpus sockets cores threads memory < <(slurmd -C | tr ' ' '\n' | awk -F= '
    /^CPUs=/{c=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2} /^ThreadsPerCore=/{t=$2}
    /^RealMemory=/{m=$2} END{print c, s, k, t, m}')
cat > "$dir/slurm.conf" <<CONF
ClusterName=medfold-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
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
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$host Name=gpu File=$dir/gpus/nvidia[0-1]" > "$dir/gres.conf"
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
tag=$(echo "$dir" | md5sum | cut -c1-12)
runuser -u munge -- /usr/sbin/munged --pid-file="/run/munge/medfold-$tag.pid" --force
cp "/run/munge/medfold-$tag.pid" "$dir/munged.pid"
slurmctld -c -i -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 120); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    if [ "$state" = idle ] && timeout 20 srun -n1 true 2>/dev/null; then
        echo "slurm: node $host idle ($cpus CPUs, ${memory} MB, 2 fake GPUs); SLURM_CONF=$dir/slurm.conf"
        exit 0
    fi
    sleep 0.5
done
echo "slurm: the node did not become idle; logs in $dir/log" >&2
tail -20 "$dir/log/"*.log >&2 || true
stop
exit 1
