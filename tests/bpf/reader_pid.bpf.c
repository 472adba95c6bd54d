/* task: "tgid PID" of the current task, which depends on who runs the program. */
#include "common.h"

SEC("iter/task")
int print_reader_pid(struct bpf_iter__task *ctx)
{
	if (ctx->task && ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(ctx->meta->seq, "tgid %d\n", (int)(bpf_get_current_pid_tgid() >> 32));
	return 0;
}
