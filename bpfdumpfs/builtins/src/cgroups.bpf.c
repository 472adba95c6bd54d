/* cgroup/cgroups: the cgroup v2 (default hierarchy) tree, one line per cgroup.
 *
 * Format: no header; "ID LEVEL PATH\n", in the iterator's order (the built-in
 * walks DESCENDANTS_PRE from the root: a parent before its children):
 *   1 0 /
 *   42 1 /system.slice
 *   57 2 /system.slice/cron.service
 * ID = cgroup id (kernfs node id = inode number of the cgroup directory),
 * LEVEL = depth below the root, PATH = names of the ancestors from the root,
 * relative to the cgroup2 mount point. Paths deeper than MAX_DEPTH levels
 * end in "/...".
 * The cgroup iterator is single-session: everything must fit in one 32 KiB
 * seq_file buffer, so lines are kept short.
 */
#include "common.h"

#define MAX_DEPTH 32

SEC("iter/cgroup")
int dump_cgroups(struct bpf_iter__cgroup *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct cgroup *cgrp = ctx->cgroup;
	struct cgroup *anc;
	int level, i;

	if (!cgrp)
		return 0;
	level = BPF_CORE_READ(cgrp, level);
	BPF_SEQ_PRINTF(seq, "%llu %d ", BPF_CORE_READ(cgrp, kn, id), level);
	if (level <= 0) {
		BPF_SEQ_PRINTF(seq, "/\n");
		return 0;
	}
	/* ancestors[0] is the root, ancestors[level] the cgroup itself */
	for (i = 1; i <= MAX_DEPTH; i++) {
		if (i > level)
			break;
		anc = NULL;
		bpf_probe_read_kernel(&anc, sizeof(anc), &cgrp->ancestors[i]);
		BPF_SEQ_PRINTF(seq, "/%s", BPF_CORE_READ(anc, kn, name));
	}
	if (level > MAX_DEPTH)
		BPF_SEQ_PRINTF(seq, "/...");
	BPF_SEQ_PRINTF(seq, "\n");
	return 0;
}
