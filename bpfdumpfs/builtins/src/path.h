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

#endif
