/* Shared by every built-in dumper: kernel types from the running kernel's BTF
 * (CO-RE keeps the objects portable) and libbpf's helper declarations. */
#ifndef BPFDUMPFS_COMMON_H
#define BPFDUMPFS_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

/* The pid namespace a task, task_file or task_vma seq_file was made in: the
 * iterator keeps it first in its private data (struct bpf_iter_seq_task_common,
 * kernel/bpf/task_iter.c), and iterates over the tasks it holds. */
static __always_inline struct pid_namespace *seq_pid_ns(struct seq_file *seq)
{
	struct pid_namespace *ns = NULL;

	bpf_probe_read_kernel(&ns, sizeof(ns), BPF_CORE_READ(seq, private));
	return ns;
}

/* PID's number in NS, as pid_nr_ns() gives it (and /proc there shows it): 0 if
 * PID is not in NS, as the parent of a namespace's init is not. */
static __always_inline int pid_nr_in(struct pid *pid, struct pid_namespace *ns)
{
	unsigned int level;
	struct upid upid = {};

	if (!pid || !ns)
		return 0;
	level = BPF_CORE_READ(ns, level);
	if (level > BPF_CORE_READ(pid, level))
		return 0;
	bpf_probe_read_kernel(&upid, sizeof(upid), &pid->numbers[level]);
	return upid.ns == ns ? upid.nr : 0;
}

/* TASK's thread-group id in NS */
static __always_inline int tgid_in(struct task_struct *task, struct pid_namespace *ns)
{
	return pid_nr_in(BPF_CORE_READ(task, group_leader, thread_pid), ns);
}

#endif
