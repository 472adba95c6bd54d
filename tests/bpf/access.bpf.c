/* task: 40 fixed lines, "A 0000 for access tests" on, once per seq_file
 * (tests/test_access.py: expected()). */
#include "common.h"

SEC("iter/task")
int dump_access(struct bpf_iter__task *ctx)
{
	if (!ctx->task || ctx->meta->seq_num != 0)
		return 0;
	for (int i = 0; i < 40; i++)
		BPF_SEQ_PRINTF(ctx->meta->seq, "A %04d for access tests\n", i);
	return 0;
}
