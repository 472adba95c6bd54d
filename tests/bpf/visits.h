/* Per-session visit counts of fds, for the test dumpers that must know
 * whether the kernel runs an object again (included after fidelity.h). */
#ifndef VISITS_H
#define VISITS_H

/* Per-fd record of the session that visited the fd last, and how often. */
struct visit {
	__u64 session;
	__u32 count;
	__u32 pad;
};

#define MAX_FDS 65536

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_FDS);
	__type(key, __u32);
	__type(value, struct visit);
} visits SEC(".maps");

/* Count this visit of FD in SESSION; returns how many earlier visits FD had
 * in the same session (0 on the first), or -1 for an fd past the table. */
static __always_inline int visit(__u32 fd, __u64 session)
{
	struct visit *v = bpf_map_lookup_elem(&visits, &fd);

	if (!v)
		return -1;
	if (v->session != session) {
		v->session = session;
		v->count = 1;
		return 0;
	}
	return v->count++;
}

#endif
