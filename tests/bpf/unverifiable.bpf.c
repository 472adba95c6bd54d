/* Compiles, and every verifier refuses it ("invalid mem access"): ctx->task may
 * be NULL, and it is dereferenced without the check. */
#include "common.h"

SEC("iter/task")
int bad_deref(struct bpf_iter__task *ctx)
{
	BPF_SEQ_PRINTF(ctx->meta->seq, "%d\n", ctx->task->pid);
	return 0;
}
