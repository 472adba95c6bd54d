/* The body of the cgroup test dumpers (fid_cgroup_*.bpf.c define PAD_LEN):
 * one line per cgroup, "cgroup ID level LEVEL " + PAD_LEN filler bytes + "\n".
 * With PAD_LEN 4,000 a dozen cgroups are more than the 32 KiB seq_file
 * buffer, and the cgroup iterator fails the second read with EOPNOTSUPP;
 * with 700 they fit in one buffer (about 9 KiB for 13 cgroups). */
#include "fidelity.h"

SEC("iter/cgroup")
int fid_cgroup(struct bpf_iter__cgroup *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct cgroup *cgrp = ctx->cgroup;

	if (!cgrp)
		return 0;
	BPF_SEQ_PRINTF(seq, "cgroup %llu level %d ", cgrp->kn->id, cgrp->level);
	bpf_seq_write(seq, (void *)filler, PAD_LEN);
	bpf_seq_write(seq, "\n", 1);
	return 0;
}
