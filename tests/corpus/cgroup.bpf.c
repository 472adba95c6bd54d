// SPDX-License-Identifier: GPL-2.0-only
/*
 * cgroup.bpf.c -- iter/cgroup: the cgroups the dumper's --cgroup and --order
 * select, one per line, between a "prologue" and an "epilogue" line:
 *     ID LEVEL NAME
 * ID is the cgroup's id (its inode number in cgroup2), NAME the last component
 * of its path. Uses <errno.h> (EFAULT), which needs the host's system include
 * dirs on the compiler's path.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/cgroup_iter.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/cgroup")
int corpus_cgroup(struct bpf_iter__cgroup *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct cgroup *cgrp = ctx->cgroup;
	struct kernfs_node *kn;
	char name[64];
	long n;

	if (!cgrp) {		/* after the last cgroup */
		BPF_SEQ_PRINTF(seq, "epilogue\n");
		return 0;
	}
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "prologue\n");
	kn = cgrp->kn;
	n = bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ(kn, name));
	if (n == -EFAULT)
		__builtin_memcpy(name, "?", 2);
	BPF_SEQ_PRINTF(seq, "%8llu %d %s\n", BPF_CORE_READ(kn, id), cgrp->level, name);
	return 0;
}
