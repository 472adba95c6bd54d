/* task_vma/vmas: /proc/PID/maps of every process, prefixed with the PID.
 *
 * Format: no header; one line per mapping, processes in pid order:
 *   PID start-end perms offset major:minor inode[ path]
 *   "%d %08lx-%08lx %c%c%c%c %08llx %02x:%02x %lu" [" " path] "\n"
 * Columns 2-7 are those of /proc/PID/maps (single-space separated, no padding
 * before the path). PID is the process's id in the pid namespace the seq_file
 * was made in; only thread-group leaders are printed. The path is:
 *  - file mappings: bpf_d_path of the file ("/usr/lib/x.so", "/x (deleted)");
 *    a newline in a path is printed as '?' (/proc prints "\012"); if d_path
 *    fails, the file name, or "-";
 *  - special mappings ([vdso], [vvar], ...): the vm_special_mapping name;
 *  - [heap], [stack] and [anon:NAME]/[anon_shmem:NAME] as in fs/proc/task_mmu.c;
 *  - otherwise nothing (the line ends after the inode).
 * Not shown (unlike /proc/PID/maps): the [vsyscall] gate area, which is not a
 * VMA of the process, and kernel threads (no mm).
 * Differs from /proc: for files mmapped through overlayfs (a "backing file"),
 * /proc shows the overlay path, dev and inode (file_user_path/file_user_inode);
 * here they are those of the underlying layer's file, because bpf_d_path only
 * accepts the trusted vm_file->f_path.
 *
 * Two variants, tried in this order: dump_vmas takes paths from bpf_d_path;
 * dump_vmas_walk, for kernels whose verifier holds vm_file untrusted (6.18.44 and
 * other stable kernels with that fix), walks the dentries itself (path.h).
 */
#include "common.h"

#define VM_READ     0x1
#define VM_WRITE    0x2
#define VM_EXEC     0x4
#define VM_MAYSHARE 0x80
#define PAGE_SHIFT  12		/* x86 */
#define MINORBITS   20

#define SMALL_BUF 200
#include "path.h"	/* after SMALL_BUF, which it uses */

/* Present only with CONFIG_ANON_VMA_NAME. Before 6.2 it shared a union with
 * "shared" (the file mapping's interval tree node), so it is a name only for a
 * VMA without a file: CO-RE finds that kernel by the two fields' offsets. */
struct vm_area_struct___named {
	struct anon_vma_name *anon_name;
	struct {
		struct rb_node rb;
	} shared;
} __attribute__((preserve_access_index));


#define VMA_FMT "%d %08lx-%08lx %c%c%c%c %08llx %02x:%02x %lu"
#define VMA_ARGS pid, start, end, \
	flags & VM_READ ? 'r' : '-', flags & VM_WRITE ? 'w' : '-', \
	flags & VM_EXEC ? 'x' : '-', flags & VM_MAYSHARE ? 's' : 'p', \
	pgoff, dev >> MINORBITS, dev & ((1U << MINORBITS) - 1), ino

static __always_inline int dump_vma(struct bpf_iter__task_vma *ctx, const bool d_path)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct vm_area_struct *vma = ctx->vma;
	struct vm_area_struct___named *named = (void *)vma;
	struct anon_vma_name *anon_name = NULL;
	unsigned long start, end, flags, ino = 0;
	unsigned long long pgoff = 0;
	unsigned int dev = 0;
	struct file *file;
	struct path *path = NULL;
	struct mm_struct *mm;
	int pid;

	if (!task || !vma)
		return 0;
	if (BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid))
		return 0;
	pid = tgid_in(task, seq_pid_ns(seq));

	start = BPF_CORE_READ(vma, vm_start);
	end = BPF_CORE_READ(vma, vm_end);
	flags = BPF_CORE_READ(vma, vm_flags);
	mm = BPF_CORE_READ(vma, vm_mm);
	file = d_path ? vma->vm_file : BPF_CORE_READ(vma, vm_file); /* bpf_d_path: a BTF pointer */
	if (bpf_core_field_exists(named->anon_name) &&
	    !(file && bpf_core_field_exists(named->shared) &&
	      bpf_core_field_offset(named->anon_name) == bpf_core_field_offset(named->shared)))
		anon_name = BPF_CORE_READ(named, anon_name);

	if (file) {
		struct inode *inode;

		path = (struct path *)&file->f_path;
		inode = BPF_CORE_READ(file, f_inode);
		dev = BPF_CORE_READ(inode, i_sb, s_dev);
		ino = BPF_CORE_READ(inode, i_ino);
		pgoff = (unsigned long long)BPF_CORE_READ(vma, vm_pgoff) << PAGE_SHIFT;

		if (anon_name) {
			BPF_SEQ_PRINTF(seq, VMA_FMT " [anon_shmem:%s]\n", VMA_ARGS, anon_name->name);
			return 0;
		}

		BPF_SEQ_PRINTF(seq, VMA_FMT, VMA_ARGS);
		put_d_path(seq, " ", path, file, d_path);
		return 0;
	}

	/* Special mappings ([vdso], [vvar], [uprobes], ...): the only vm_ops with
	 * a ->name are special_mapping_vmops, whose private data is the
	 * struct vm_special_mapping. */
	if (BPF_CORE_READ(vma, vm_ops, name)) {
		struct vm_special_mapping *sm = BPF_CORE_READ(vma, vm_private_data);
		const char *name = BPF_CORE_READ(sm, name);

		if (name) {
			BPF_SEQ_PRINTF(seq, VMA_FMT " %s\n", VMA_ARGS, name);
			return 0;
		}
	}
	if (mm && start < BPF_CORE_READ(mm, brk) && end > BPF_CORE_READ(mm, start_brk)) {
		BPF_SEQ_PRINTF(seq, VMA_FMT " [heap]\n", VMA_ARGS);
		return 0;
	}
	if (mm && start <= BPF_CORE_READ(mm, start_stack) && end >= BPF_CORE_READ(mm, start_stack)) {
		BPF_SEQ_PRINTF(seq, VMA_FMT " [stack]\n", VMA_ARGS);
		return 0;
	}
	if (anon_name) {
		BPF_SEQ_PRINTF(seq, VMA_FMT " [anon:%s]\n", VMA_ARGS, anon_name->name);
		return 0;
	}
	BPF_SEQ_PRINTF(seq, VMA_FMT "\n", VMA_ARGS);
	return 0;
}

SEC("iter/task_vma")
int dump_vmas(struct bpf_iter__task_vma *ctx)
{
	return dump_vma(ctx, true);
}

SEC("iter/task_vma")
int dump_vmas_walk(struct bpf_iter__task_vma *ctx)
{
	return dump_vma(ctx, false);
}
