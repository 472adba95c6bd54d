/* task: 200 fixed lines, "A 0000 fixed output of program A" on, once per seq_file
 * (helpers.fixed_output("A")). Self-contained: tests copy it into a config dir
 * and have bpfdumpfs compile it there. */
#include "common.h"

SEC("iter/task")
int dump_a(struct bpf_iter__task *ctx)
{
	struct seq_file *seq = ctx->meta->seq;

	if (!ctx->task || ctx->meta->seq_num != 0)
		return 0;
	for (int i = 0; i < 200; i++)
		BPF_SEQ_PRINTF(seq, "A %04d fixed output of program A\n", i);
	return 0;
}
