/* Paths in dumps (files, vmas): a per-CPU scratch buffer for bpf_d_path, and
 * the writer of a path as one field. */
#ifndef BPFDUMPFS_PATH_H
#define BPFDUMPFS_PATH_H

#define PATH_BUF 4096	/* PATH_MAX */

/* Iterator programs run with migration disabled but may be preempted, so a
 * second reader on the same CPU can run the program while the first is in the
 * middle of using the buffer: "busy" is a try-lock built from atomic adds only
 * (the owner is whoever sees the count at 1); the loser uses a stack buffer. */
struct scratch {
	__u32 busy;
	char buf[PATH_BUF];
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
	if (n > 1 && n <= cap) {
		for (long i = 0; i < n - 1 && i < cap; i++)
			if (buf[i] == '\n')
				buf[i] = '?';
		bpf_seq_write(seq, buf, n - 1);
	} else {
		bpf_seq_write(seq, "-", 1);
	}
}

/* Writes SEP (a one-character separator, or NULL), the path of PATH (a struct
 * path * bpf_d_path accepts: reached from the iterator's own pointers) and a
 * newline. The path goes through the per-CPU buffer when it is free, else a
 * SMALL_BUF stack buffer (the includer defines it, to fit its stack budget), and if
 * bpf_d_path refuses or it is too long even so, the dentry name of FILE. */
static __always_inline void put_d_path(struct seq_file *seq, const char *sep,
				       struct path *path, struct file *file)
{
	char small[SMALL_BUF];
	struct scratch *s;
	__u32 zero = 0;
	long n;

	if (sep)
		bpf_seq_write(seq, sep, 1);
	s = bpf_map_lookup_elem(&scratch_map, &zero);
	if (s) {
		__sync_fetch_and_add(&s->busy, 1);
		if (s->busy == 1) {
			n = bpf_d_path(path, s->buf, sizeof(s->buf));
			if (n > 0)
				put_path_field(seq, s->buf, n, PATH_BUF);
			__sync_fetch_and_add(&s->busy, -1);
			if (n > 0)
				goto end;
		} else {
			__sync_fetch_and_add(&s->busy, -1);
		}
	}
	n = bpf_d_path(path, small, sizeof(small));
	if (n <= 0)
		n = bpf_probe_read_kernel_str(small, sizeof(small),
					      BPF_CORE_READ(file, f_path.dentry, d_name.name));
	put_path_field(seq, small, n, SMALL_BUF);
end:
	bpf_seq_write(seq, "\n", 1);
}

#endif
