// SPDX-License-Identifier: GPL-2.0-only
/*
 * task_vma.bpf.c -- iter/task_vma: /proc/PID/maps-like lines, one per VMA:
 *     START-END PERMS OFFSET MAJ:MIN INODE<tab>NAME
 * NAME is the mapped file's last path component (the original uses
 * bpf_d_path(), which kernels that hold vm_file untrusted refuse, 6.18.44
 * among them). Uses <limits.h> (NAME_MAX) and <errno.h> (EFAULT), which need
 * the host's system include dirs on the compiler's path.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_task_vma.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <errno.h>
#include <limits.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* include/linux/mm.h and kdev_t.h: macros, so not in vmlinux.h */
#define CORPUS_VM_READ		0x1
#define CORPUS_VM_WRITE		0x2
#define CORPUS_VM_EXEC		0x4
#define CORPUS_VM_MAYSHARE	0x80
#define CORPUS_MINORBITS	20

/* one name per CPU: NAME_MAX + 1 bytes would crowd the 512-byte stack */
struct name_buf {
	char s[NAME_MAX + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct name_buf);
} names SEC(".maps");

unsigned long unreadable_names;	/* names bpf_probe_read_kernel_str() faulted on */

SEC("iter/task_vma")
int corpus_task_vma(struct bpf_iter__task_vma *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct vm_area_struct *vma = ctx->vma;
	struct file *file;
	struct name_buf *name;
	char perms[5] = "----";
	__u32 zero = 0, dev;
	long n;

	if (!ctx->task || !vma)
		return 0;
	name = bpf_map_lookup_elem(&names, &zero);
	if (!name)
		return 0;

	if (vma->vm_flags & CORPUS_VM_READ)
		perms[0] = 'r';
	if (vma->vm_flags & CORPUS_VM_WRITE)
		perms[1] = 'w';
	if (vma->vm_flags & CORPUS_VM_EXEC)
		perms[2] = 'x';
	perms[3] = vma->vm_flags & CORPUS_VM_MAYSHARE ? 's' : 'p';
	BPF_SEQ_PRINTF(seq, "%08lx-%08lx %s ", vma->vm_start, vma->vm_end, perms);

	file = vma->vm_file;
	if (!file) {
		BPF_SEQ_PRINTF(seq, "%08lx 00:00 0\n", 0UL);
		return 0;
	}
	dev = file->f_inode->i_sb->s_dev;
	n = bpf_probe_read_kernel_str(name->s, sizeof(name->s),
				      file->f_path.dentry->d_name.name);
	if (n == -EFAULT) {
		__sync_fetch_and_add(&unreadable_names, 1);
		name->s[0] = '?';
		name->s[1] = '\0';
	}
	BPF_SEQ_PRINTF(seq, "%08lx %02x:%02x %lu\t%s\n", vma->vm_pgoff << 12,
		       dev >> CORPUS_MINORBITS, dev & ((1U << CORPUS_MINORBITS) - 1),
		       file->f_inode->i_ino, name->s);
	return 0;
}
