/* A built-in's program as an earlier bpfdumpfs might have shipped it: the name of
 * task/tasks' program (dump_tasks), other code. */
#include "common.h"

SEC("iter/task")
int dump_tasks(struct bpf_iter__task *ctx)
{
	if (ctx->task && ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(ctx->meta->seq, "an older task/tasks\n");
	return 0;
}
