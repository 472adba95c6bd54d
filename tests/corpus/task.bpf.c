// SPDX-License-Identifier: GPL-2.0-only
/*
 * task.bpf.c -- iter/task: one line per thread, TGID TID COMM, between a
 * header line and an END line, as the kernel selftest prints its tasks.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_task.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/task")
int corpus_task(struct bpf_iter__task *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *t = ctx->task;

	if (!t) {		/* after the last task */
		BPF_SEQ_PRINTF(seq, "    === END ===\n");
		return 0;
	}
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "    tgid      tid comm\n");
	BPF_SEQ_PRINTF(seq, "%8d %8d %s\n", t->tgid, t->pid, t->comm);
	return 0;
}
