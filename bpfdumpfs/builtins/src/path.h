/* Paths in dumps (files, vmas): a per-CPU scratch buffer for bpf_d_path, and
 * the writer of a path as one field. */
#ifndef BPFDUMPFS_PATH_H
#define BPFDUMPFS_PATH_H

#define PATH_BUF 4096	/* PATH_MAX */
#define NAME_MAX 255
#define WALK_DEPTH 32
#define DELETED " (deleted)"

/* Iterator programs run with migration disabled but may be preempted, so a
 * second reader on the same CPU can run the program while the first is in the
 * middle of using the buffer: "busy" is a try-lock built from atomic adds only
 * (the owner is whoever sees the count at 1); the loser uses a stack buffer. */
struct scratch {
	__u32 busy;
	char buf[PATH_BUF];
	char walk[PATH_BUF + NAME_MAX + 1];	/* walk_path's work space */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_map SEC(".maps");

/* Writes buf[0..n-1) (n counts the NUL, as bpf_d_path returns it), or "-" if
 * there is no path. Through bpf_seq_write, not "%s": bpf_seq_printf truncates
 * string arguments to 512 bytes in all. A newline inside the path becomes '?'
 * so the dump stays one line per object. */
static __always_inline void put_path_field(struct seq_file *seq, char *buf, long n, long cap)
{
	/* unsigned, and bounded by a compare on the very register passed on: verifiers
	 * before 6.2 lose a signed bound through n - 1 ("R3 min value is negative") */
	__u32 len = n - 1;

	asm volatile("" : "+r"(len));
	if (n > 1 && len < cap) {
		for (__u32 i = 0; i < len && i < cap; i++)
			if (buf[i] == '\n')
				buf[i] = '?';
		asm volatile("" : "+r"(len));
		if (len < cap)
			bpf_seq_write(seq, buf, len);
	} else {
		bpf_seq_write(seq, "-", 1);
	}
}

/* The path of FILE found by walking its dentries and mounts up to the reading
 * task's root, or the top of its mount tree, where d_path stops too,
 * for kernels whose verifier refuses bpf_d_path on the pointer at hand (6.18.44
 * made vma->vm_file untrusted). The names are laid right to left into S->walk,
 * then copied to S->buf; returns the length counting the NUL, as bpf_d_path
 * does, or 0 when the path is deeper than WALK_DEPTH or longer than PATH_BUF.
 * " (deleted)" follows an unlinked file, as with d_path. Names that d_path would
 * generate (d_dname: "pipe:[N]", "anon_inode:[x]") are not made here: such a
 * file is not under a mount's root, and gets 0. */
static __always_inline long walk_path(struct file *file, struct scratch *s)
{
	struct dentry *d = BPF_CORE_READ(file, f_path.dentry), *leaf = d;
	struct mount *mnt = container_of(BPF_CORE_READ(file, f_path.mnt), struct mount, mnt);
	/* d_path's root is the reading task's (in a container, its root, not the mount
	 * namespace's): the walk stops there too */
	struct task_struct *me = bpf_get_current_task_btf();
	struct dentry *root = BPF_CORE_READ(me, fs, root.dentry);
	struct vfsmount *root_mnt = BPF_CORE_READ(me, fs, root.mnt);
	long off = PATH_BUF - 1, end;
	int top = 0;
	__u32 len;

	/* d_unlinked(), or a pseudo file's dentry (memfd, shmem: alone in its tree,
	 * never hashed), which d_path shows as "/NAME (deleted)" (simple_dname) */
	if (!BPF_CORE_READ(d, d_hash.pprev) && d != BPF_CORE_READ(mnt, mnt.mnt_root)) {
		off -= sizeof(DELETED) - 1;
		__builtin_memcpy(s->walk + PATH_BUF - sizeof(DELETED), DELETED, sizeof(DELETED) - 1);
	}
	end = off;
	/* each step climbs a dentry or crosses a mount: twice the depth bounds both */
	for (int i = 0; i < 2 * WALK_DEPTH && !top; i++) {
		struct dentry *parent;

		if (d == root && &mnt->mnt == root_mnt) {
			top = 1;
			break;
		}
		if (d == BPF_CORE_READ(mnt, mnt.mnt_root)) {
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

			top = up == mnt;
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		parent = BPF_CORE_READ(d, d_parent);
		len = BPF_CORE_READ(d, d_name.len);
		if ((parent == d && d != leaf) || len > NAME_MAX || off < len + 2)
			return 0;	/* a detached tree, or too long */
		top = parent == d;
		off = (off - len) & (PATH_BUF - 1);	/* the mask tells the verifier */
		bpf_probe_read_kernel(s->walk + off, len & NAME_MAX, BPF_CORE_READ(d, d_name.name));
		off = (off - 1) & (PATH_BUF - 1);
		s->walk[off] = '/';
		d = parent;
	}
	if (!top)
		return 0;	/* deeper than WALK_DEPTH */
	if (off == end)		/* the root itself */
		s->walk[--off & (PATH_BUF - 1)] = '/';
	len = PATH_BUF - off;	/* the path and its NUL */
	s->walk[PATH_BUF - 1] = 0;
	bpf_probe_read_kernel(s->buf, len & (PATH_BUF - 1), s->walk + (off & (PATH_BUF - 1)));
	return len;
}

/* Writes SEP (a one-character separator, or NULL), the path of PATH (a struct
 * path * bpf_d_path accepts: reached from the iterator's own pointers) and a
 * newline. The path goes through the per-CPU buffer when it is free, else a
 * SMALL_BUF stack buffer (the includer defines it, to fit its stack budget), and if
 * bpf_d_path refuses or it is too long even so, the dentry name of FILE.
 * With D_PATH false (a constant: the program variant for kernels that refuse
 * bpf_d_path there), the path is walked instead, through the per-CPU buffer only. */
static __always_inline void put_d_path(struct seq_file *seq, const char *sep,
				       struct path *path, struct file *file, const bool d_path)
{
	char small[SMALL_BUF];
	struct scratch *s;
	__u32 zero = 0;
	long n = 0;

	if (sep)
		bpf_seq_write(seq, sep, 1);
	s = bpf_map_lookup_elem(&scratch_map, &zero);
	if (s) {
		__sync_fetch_and_add(&s->busy, 1);
		if (s->busy == 1) {
			n = d_path ? bpf_d_path(path, s->buf, sizeof(s->buf)) : walk_path(file, s);
			if (n > 0)
				put_path_field(seq, s->buf, n, PATH_BUF);
			__sync_fetch_and_add(&s->busy, -1);
			if (n > 0)
				goto end;
		} else {
			__sync_fetch_and_add(&s->busy, -1);
		}
	}
	n = d_path ? bpf_d_path(path, small, sizeof(small)) : 0;
	if (n <= 0)
		n = bpf_probe_read_kernel_str(small, sizeof(small),
					      BPF_CORE_READ(file, f_path.dentry, d_name.name));
	put_path_field(seq, small, n, SMALL_BUF);
end:
	bpf_seq_write(seq, "\n", 1);
}

#endif
