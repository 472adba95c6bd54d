// SPDX-License-Identifier: GPL-2.0-only
/*
 * pid_iter.bpf.c -- iter/task_file: which processes hold which BPF objects,
 * as bpftool's `-p`/`--pids` and bpftop find them: for each open file that is
 * a BPF object of the chosen kind, one line
 *     PID OBJ_ID COMM
 * under a header. bpftool sets the kind (prog, map, link, btf) in .rodata
 * before each load and reads binary records; here the kind is chosen when the
 * source is compiled, so it needs `-D PID_ITER_OBJ=BPF_OBJ_LINK` (or _PROG,
 * _MAP, _BTF), and the records are text.
 *
 * A file is of a kind if its f_op is the kind's file_operations, as bpftool
 * checks -- where the kernel's kallsyms lists those variables (KALLSYMS_ALL);
 * elsewhere the __weak ksyms stay 0 (bpftool's own program fails to load
 * there) and the anonymous inode's name is checked instead: "bpf-prog",
 * "bpf-map", "btf", and for links "bpf_link" (made by bpf_link_prime()) or
 * "bpf-link" (bpf_link_new_fd(): BPF_OBJ_GET, BPF_LINK_GET_FD_BY_ID).
 *
 * Modeled on: bpftool, tools/bpf/bpftool/skeleton/pid_iter.bpf.c in Linux
 * (GPL-2.0-only OR BSD-2-Clause), and Netflix/bpftop's src/bpf/pid_iter.bpf.c,
 * derived from it (Apache-2.0 repository). Written here for bpfdumpfs's tests
 * (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

enum pid_iter_obj {
	BPF_OBJ_PROG = 1,
	BPF_OBJ_MAP,
	BPF_OBJ_LINK,
	BPF_OBJ_BTF,
};

#ifndef PID_ITER_OBJ
#error "pid_iter.bpf.c: give the kind of BPF object, e.g. -D PID_ITER_OBJ=BPF_OBJ_LINK"
#endif

extern const void bpf_prog_fops __ksym __weak;
extern const void bpf_map_fops __ksym __weak;
extern const void bpf_link_fops __ksym __weak;
extern const void btf_fops __ksym __weak;

static __always_inline int of_kind(struct file *file, const void *fops, const char *anon,
				   const char *anon2)
{
	char name[16];

	if (fops)
		return file->f_op == fops;
	/* anon_inode_getfile(NAME, ...) names the file's dentry NAME */
	if (bpf_probe_read_kernel_str(name, sizeof(name), file->f_path.dentry->d_name.name) < 0)
		return 0;
	return bpf_strncmp(name, sizeof(name), anon) == 0 ||
	       (anon2 && bpf_strncmp(name, sizeof(name), anon2) == 0);
}

static __always_inline __u32 obj_id(void *obj)
{
	switch (PID_ITER_OBJ) {
	case BPF_OBJ_PROG:
		return BPF_CORE_READ((struct bpf_prog *)obj, aux, id);
	case BPF_OBJ_MAP:
		return BPF_CORE_READ((struct bpf_map *)obj, id);
	case BPF_OBJ_LINK:
		return BPF_CORE_READ((struct bpf_link *)obj, id);
	case BPF_OBJ_BTF:
		return BPF_CORE_READ((struct btf *)obj, id);
	}
	return 0;
}

SEC("iter/task_file")
int corpus_pid_iter(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	int yes;

	if (!task || !file)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "     pid       id comm\n");
	switch (PID_ITER_OBJ) {
	case BPF_OBJ_PROG:
		yes = of_kind(file, &bpf_prog_fops, "bpf-prog", 0);
		break;
	case BPF_OBJ_MAP:
		yes = of_kind(file, &bpf_map_fops, "bpf-map", 0);
		break;
	case BPF_OBJ_LINK:
		yes = of_kind(file, &bpf_link_fops, "bpf_link", "bpf-link");
		break;
	case BPF_OBJ_BTF:
		yes = of_kind(file, &btf_fops, "btf", 0);
		break;
	default:
		yes = 0;
	}
	if (!yes)
		return 0;
	BPF_SEQ_PRINTF(seq, "%8d %8u %s\n", task->tgid, obj_id(file->private_data),
		       task->group_leader->comm);
	return 0;
}
