// SPDX-License-Identifier: GPL-2.0-only
/*
 * task_file.bpf.c -- iter/task_file: every open file of every process, as
 * TGID TID FD INODE NAME. The original prints the file's f_op pointer; this
 * prints the inode number and the dentry's name instead, which mean something
 * to a reader and are the same from one read to the next.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_task_file.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/task_file")
int corpus_task_file(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;

	if (!task || !file)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "    tgid      tid       fd    inode name\n");
	BPF_SEQ_PRINTF(seq, "%8d %8d %8u %8lu %s\n", task->tgid, task->pid, ctx->fd,
		       file->f_inode->i_ino, file->f_path.dentry->d_name.name);
	return 0;
}
